"""The evidence report: one self-contained HTML file that shows each secret next to the extracted images.

Images are embedded as PNG data URIs and the style sheet is inline, so the file opens anywhere, offline,
and prints as it looks on screen. The report reads its text from the extraction summary; optional fields (p-values,
a reference model) appear only when the summary has them.
"""
from __future__ import annotations

import base64
import html
import io
import math

import numpy as np
from PIL import Image

# Images in the report and on the sheet are scaled up (nearest neighbour) to at least this many pixels high.
TILE_MIN_PIXELS = 112

_STYLE = """
body { font-family: "DejaVu Sans", Arial, sans-serif; color: #000; background: #fff; margin: 2em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.5em; }
table { border-collapse: collapse; }
th, td { padding: 0.25em 0.6em; vertical-align: top; }
table.facts th { text-align: left; font-weight: normal; color: #333; white-space: nowrap; }
table.images th, table.images td { border: 1px solid #888; text-align: center; }
table.images tr { break-inside: avoid; page-break-inside: avoid; }
img { display: block; margin: 0 auto 0.3em; image-rendering: pixelated; border: 1px solid #ccc; }
.hash { font-family: "DejaVu Sans Mono", monospace; word-break: break-all; }
.scores { font-size: 0.85em; white-space: nowrap; }
.note { font-size: 0.9em; color: #333; max-width: 48em; }
.warning { font-weight: bold; }
@page { margin: 12mm; }
@media print { body { margin: 0; } }
"""


def tile_zoom(height: int) -> int:
    """Return the integer zoom that makes an image of `height` pixels at least TILE_MIN_PIXELS high."""
    return max(1, -(-TILE_MIN_PIXELS // height))


def to_pil(image: np.ndarray, zoom: int = 1) -> Image.Image:
    """Convert a [C, H, W] image in [0, 1] to an RGB picture scaled up `zoom` times (nearest neighbour)."""
    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    if pixels.shape[0] == 1:
        picture = Image.fromarray(pixels[0], "L").convert("RGB")
    else:
        picture = Image.fromarray(pixels[:3].transpose(1, 2, 0), "RGB")
    if zoom > 1:
        picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
    return picture


def format_psnr(psnr: float | None) -> str:
    """Format a PSNR in dB, where None means identical images (MSE 0)."""
    return "PSNR inf (identical)" if psnr is None else f"PSNR {psnr:.1f} dB"


def render_report(summary: dict, secrets: np.ndarray, images: np.ndarray,
                  reference_images: np.ndarray | None = None) -> str:
    """Render the HTML report of one extraction.

    `summary` is the dictionary that `write_evidence` stores in scores.json. `secrets` and `images`
    are [K, C, H, W] in [0, 1], and `reference_images` has the same shape when a reference model was run.
    """
    zoom = tile_zoom(secrets.shape[2])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>onnxmark evidence: {_text(summary['model'])}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>Watermark extraction report</h1>",
        f"<p>{_verdict(summary)}</p>",
        _facts_table(summary),
        "<h2>Images per key</h2>",
        _legend(reference_images is not None),
        _images_table(summary, secrets, images, reference_images, zoom),
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _verdict(summary: dict) -> str:
    text = (f"Mean SSIM {summary['ssim_mean']:.3f} (min {summary['ssim_min']:.3f}) between the secrets and "
            f"the images extracted from the suspect, over {len(summary['keys'])} keys.")
    if summary.get("p_value") is not None:
        text += f" Combined p-value {_number(summary['p_value'])}."
    return _text(text)


def _facts_table(summary: dict) -> str:
    rows = [("Suspect model", _text(summary["model"]))]
    if summary.get("file_sha256"):
        rows.append(("Suspect file SHA-256", _hash(summary["file_sha256"])))
    rows.append(("Suspect model SHA-256 (weights inline)", _hash(summary["model_sha256"])))
    if summary.get("key_model_sha256"):
        same = summary["key_model_sha256"] == summary["model_sha256"]
        note = " (the suspect is this model)" if same else " (the suspect differs from this model)"
        rows.append(("Watermarked model SHA-256 recorded in the key", _hash(summary["key_model_sha256"]) + note))
    if summary.get("key"):
        rows.append(("Key file", _text(summary["key"])))
    if summary.get("key_sha256"):
        rows.append(("Key file SHA-256", _hash(summary["key_sha256"])))
    if summary.get("key_commitment"):
        rows.append(("Key commitment", _hash(summary["key_commitment"])))

    reference = summary.get("reference")
    if reference:
        rows.append(("Reference model", _text(reference["model"])))
        rows.append(("Reference file SHA-256", _hash(reference["file_sha256"])))
        if reference.get("mismatch"):
            rows.append(("Reference result", '<span class="warning">structure differs: the key does not apply '
                                             f"to this model.</span> {_text(reference['mismatch'])}"))
        else:
            rows.append(("Reference result", _text(f"mean SSIM {reference['ssim_mean']:.3f} "
                                                   f"(min {reference['ssim_min']:.3f})")))

    rows.append(("Date (UTC)", _text(summary.get("date", ""))))
    rows.append(("Versions", _text(f"onnxmark {summary.get('onnxmark_version', '?')}, "
                                   f"onnxruntime {summary.get('onnxruntime_version', '?')}")))
    lines = [f"<tr><th>{_text(name)}</th><td>{value}</td></tr>" for name, value in rows]
    return '<table class="facts">\n' + "\n".join(lines) + "\n</table>"


def _legend(with_reference: bool) -> str:
    text = ("Secret: the image embedded with the key. Suspect: the image the same key extracts from the "
            "suspect's weights. ")
    if with_reference:
        text += "Reference: the image it extracts from the reference model. "
    text += ("SSIM is 1 for identical images and near 0 for unrelated ones. MSE and PSNR compare pixels in "
             "[0, 1] with the secret.")
    return f'<p class="note">{_text(text)}</p>'


def _images_table(summary: dict, secrets: np.ndarray, images: np.ndarray,
                  reference_images: np.ndarray | None, zoom: int) -> str:
    headings = ["Key", "Secret", "Suspect"] + (["Reference"] if reference_images is not None else [])
    lines = ['<table class="images">',
             "<thead><tr>" + "".join(f"<th>{name}</th>" for name in headings) + "</tr></thead>",
             "<tbody>"]
    reference_keys = summary["reference"]["keys"] if reference_images is not None else None

    for index, entry in enumerate(summary["keys"]):
        cells = [_key_cell(entry),
                 _image_cell(secrets[index], zoom, f"key {index}: secret", ""),
                 _image_cell(images[index], zoom, f"key {index}: image extracted from the suspect",
                             _scores(entry))]
        if reference_images is not None:
            cells.append(_image_cell(reference_images[index], zoom, f"key {index}: image extracted from the reference",
                                     _scores(reference_keys[index])))
        lines.append("<tr>" + "".join(cells) + "</tr>")

    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def _key_cell(entry: dict) -> str:
    lines = [f"<b>{_text(entry['index'])}</b>"]
    if entry.get("p_value") is not None:
        lines.append(_text(f"p-value {_number(entry['p_value'])}"))
    if entry.get("z_score") is not None:
        lines.append(_text(f"z-score {entry['z_score']:.1f}"))
    return '<td class="scores">' + "<br>".join(lines) + "</td>"


def _image_cell(image: np.ndarray, zoom: int, alt: str, caption: str) -> str:
    buffer = io.BytesIO()
    to_pil(image, zoom).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    size = f'width="{image.shape[2] * zoom}" height="{image.shape[1] * zoom}"'
    return (f'<td><img src="data:image/png;base64,{data}" {size} alt="{_text(alt)}">'
            f'<div class="scores">{caption}</div></td>')


def _scores(entry: dict) -> str:
    lines = [f"SSIM {entry['ssim']:.3f}", f"MSE {entry['mse']:.4f}", format_psnr(entry.get("psnr"))]
    if entry.get("control_ssim") is not None:
        lines.append(f"SSIM with a wrong secret {entry['control_ssim']:.3f}")
    return "<br>".join(_text(line) for line in lines)


def _number(value: float) -> str:
    """Format a probability: fixed point down to 0.001, scientific notation below."""
    return f"{value:.3f}" if value >= 1e-3 or value == 0 or not math.isfinite(value) else f"{value:.2e}"


def _hash(value: str) -> str:
    return f'<span class="hash">{_text(value)}</span>'


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)
