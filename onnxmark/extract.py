"""Extraction: rebuild the transposed model from a suspect's weights and run the key through onnxruntime.

This module and everything it imports must stay free of torch and onnx2torch.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont

from onnxmark import __version__
from onnxmark.calibration import (COMBINATION_METHOD, DEFAULT_NULL_KEYS, DEFAULT_NULL_SEED, Calibration, calibrate,
                                  check_key_range, draw_null_keys)
from onnxmark.canonical import RESTORED_RELU_SUFFIX, CanonicalModel, canonical_model
from onnxmark.commitment import key_commitment
from onnxmark.data import from_layout
from onnxmark.errors import OnnxmarkError
from onnxmark.files import OutputTransaction
from onnxmark.graph import ModelGraph, import_graph, load_onnx
from onnxmark.keyfile import Key, model_sha256
from onnxmark.plan import Plan, build_plan, check_signature, surplus_steps
from onnxmark.restore import UNFOLDED_PREFIX
from onnxmark.report import format_psnr, render_report, tile_zoom, to_pil
from onnxmark.ssim import mse_batch, ssim_batch
from onnxmark.transposed_onnx import build_transposed_model, run_transposed

log = logging.getLogger(__name__)

SHEET_MARGIN = 8
SHEET_CAPTION_PIXELS = 16
SHEET_LINE_SPACING = 2  # pixels between caption lines
SHEET_FRAME_COLOR = "#b0b0b0"  # a frame keeps white secrets apart from the white sheet


@dataclass
class Extraction:
    """The images a key extracts from one model, in pixel space [0, 1], with their scores."""

    model: str
    model_sha256: str
    images: np.ndarray     # [K, C, H, W]
    secrets: np.ndarray    # [K, C, H, W]
    ssim: np.ndarray       # [K]
    mse: np.ndarray        # [K]
    notes: list[str] = field(default_factory=list)   # rewrites of the suspect undone before extraction
    calibration: Calibration | None = None   # None when extracted without random keys
    file_sha256: str | None = None   # SHA-256 of the model file's bytes, when extract() read the file

    @property
    def psnr(self) -> np.ndarray:
        """PSNR in dB per key for pixels in [0, 1], infinite where the image equals the secret."""
        with np.errstate(divide="ignore"):
            return 10.0 * np.log10(1.0 / np.asarray(self.mse, dtype=np.float64))

    def summary(self, image_paths: list[str] | None = None) -> dict:
        """Return the scores as `extract --json` prints them, with None in the calibration fields without random keys."""
        keys = []
        for index in range(len(self.ssim)):
            entry = {"index": index, "ssim": float(self.ssim[index]), "mse": float(self.mse[index])}
            entry["psnr"] = float(self.psnr[index]) if np.isfinite(self.psnr[index]) else None
            if self.calibration is not None:
                entry.update(self.calibration.key_entry(index))
            entry["image"] = image_paths[index] if image_paths else None
            keys.append(entry)

        calibration = self.calibration
        return {"model": self.model, "model_sha256": self.model_sha256, "file_sha256": self.file_sha256,
                "ssim_mean": float(self.ssim.mean()), "ssim_min": float(self.ssim.min()),
                "p_value": None if calibration is None else calibration.p_value,
                "p_value_method": None if calibration is None else COMBINATION_METHOD,
                "null_keys": 0 if calibration is None else calibration.null_keys,
                "null_seed": None if calibration is None else calibration.null_seed,
                "notes": self.notes, "keys": keys}


@dataclass
class Reference:
    """A reference model run with the same key: its extraction, or why the key does not apply to it."""

    model: str
    file_sha256: str
    extraction: Extraction | None = None
    mismatch: str | None = None      # the error that kept the key from running on the reference

    def summary(self, image_paths: list[str] | None = None) -> dict:
        if self.extraction is None:
            return {"model": self.model, "file_sha256": self.file_sha256, "mismatch": self.mismatch}
        return {**self.extraction.summary(image_paths), "mismatch": None}


def extract(suspect: str | Path, key: Key, model: onnx.ModelProto | None = None,
            null_keys: int = DEFAULT_NULL_KEYS, null_seed: int = DEFAULT_NULL_SEED) -> Extraction:
    """Extract the key's images from a suspect file (or an already loaded model of that file).

    The suspect is first brought into canonical float form: quantization, fused operators, fp16 weights and
    folded batch norms are undone, and a classification head trained anew is replaced by the key's. The
    notes of the result list the rewrites that were undone. With `null_keys` above 0, that many random keys
    drawn with `null_seed` go through the same transposed model, and their images calibrate each key's
    SSIM (see onnxmark.calibration).
    """
    file_hash = None
    if model is None:
        model = load_onnx(suspect)
        file_hash = file_sha256(suspect)
    extraction = _extract_canonical(suspect, key, model, null_keys, null_seed)
    extraction.file_sha256 = file_hash
    return extraction


def _extract_canonical(suspect: str | Path, key: Key, model: onnx.ModelProto, null_keys: int,
                       null_seed: int) -> Extraction:
    canonical, graph, plan = _fitting_canonical(suspect, key, model)
    plan.frozen_values = _frozen_by_position(plan, graph, key)

    random_keys = draw_null_keys(null_keys, key.keys.shape[1], null_seed, key.key_range)
    if null_keys:
        check_key_range(key.keys, key.key_range)
    transposed = build_transposed_model(plan, graph)
    values = run_transposed(transposed, np.concatenate([key.keys, random_keys]))
    pixels = key.preprocessing.to_pixels(from_layout(values, key.input_spec))
    all_images = np.clip(pixels, 0.0, 1.0).astype(np.float32)
    images, null_images = all_images[:len(key.keys)].copy(), all_images[len(key.keys):]

    calibration = calibrate(images, null_images, key.secrets, null_seed) if null_keys else None
    return Extraction(model=str(suspect), model_sha256=model_sha256(model), images=images, secrets=key.secrets,
                      ssim=ssim_batch(images, key.secrets), mse=mse_batch(images, key.secrets),
                      notes=list(canonical.notes), calibration=calibration)


def _fitting_canonical(suspect: str | Path, key: Key,
                       model: onnx.ModelProto) -> tuple[CanonicalModel, ModelGraph, Plan]:
    """Bring the suspect into canonical form and plan it; raise OnnxmarkError when it does not fit the key.

    A ReLU restored after a quantized output is left out when the key's model has no step there. Such a
    ReLU can also make a batch norm look folded. So any step that the rewrite itself added (a restored ReLU
    or an unfolded batch norm) may be surplus, and the model is then rewritten again without those ReLUs.
    """
    canonical = canonical_model(model, key.batch_norms, key.head)
    graph = import_graph(suspect, canonical.model)
    plan = build_plan(graph)
    added = {index for index, step in enumerate(plan.steps)
             if step.node.name.endswith(RESTORED_RELU_SUFFIX) or step.node.name.startswith(UNFOLDED_PREFIX)}
    surplus = surplus_steps(key.signature, plan.signature(graph), added)
    unrestored = frozenset(plan.steps[index].node.name for index in surplus
                           if plan.steps[index].node.name.endswith(RESTORED_RELU_SUFFIX))
    if unrestored:
        canonical = canonical_model(model, key.batch_norms, key.head, unrestored)
        graph = import_graph(suspect, canonical.model)
        plan = build_plan(graph)
    check_signature(key.signature, plan.signature(graph), str(suspect))
    return canonical, graph, plan


def extract_reference(reference: str | Path, key: Key) -> Reference:
    """Run the key on a reference model, the control that a suspect's images are compared with.

    A reference that cannot be read raises OnnxmarkError. One whose structure does not fit the key gives
    a Reference with the reason in `mismatch`, because that result belongs in the report too.
    """
    model = load_onnx(reference)
    file_hash = file_sha256(reference)
    try:
        extraction = extract(reference, key, model)
    except OnnxmarkError as error:
        log.warning("The key does not apply to the reference model %s: %s", reference, error)
        return Reference(model=str(reference), file_sha256=file_hash, mismatch=str(error))

    extraction.file_sha256 = file_hash
    return Reference(model=str(reference), file_sha256=file_hash, extraction=extraction)


def file_sha256(path: str | Path) -> str:
    """Return the SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise OnnxmarkError(f"Failed to read {path}: {error}") from error
    return digest.hexdigest()


def _frozen_by_position(plan, graph, key: Key) -> dict[str, np.ndarray]:
    """Match the key's frozen tensors to the suspect's frozen branches by their order in the plan.

    The signature already matched, so the branches correspond one to one even where the suspect's
    tensors have other names.
    """
    names = plan.frozen_names()
    values = list(key.frozen.values())
    if len(values) != len(names):
        raise OnnxmarkError(f"The key has {len(values)} frozen tensors, the suspect's plan freezes {len(names)} "
                            "branches; the key was made for another architecture")
    matched = {}
    for name, value in zip(names, values):
        if tuple(value.shape) != tuple(graph.shapes[name]):
            raise OnnxmarkError(f"The key's frozen tensor for branch '{name}' has shape {list(value.shape)}, "
                                f"the suspect's branch {list(graph.shapes[name])}")
        matched[name] = value
    return matched


def write_evidence(extraction: Extraction, folder: Path, transaction: OutputTransaction, key: Key | None = None,
                   key_path: str | Path | None = None, reference: Reference | None = None,
                   key_file_sha256: str | None = None) -> dict:
    """Write keyNN.png per key, sheet.png, report.html and scores.json, and return the summary with the paths.

    With `key`, the report shows the key's commitment and the model hash it records. With `key_path`, it also
    shows the key file's SHA-256, read from the file unless `key_file_sha256` gives it (a key file that is
    still being written). With `reference`, it shows the images the key extracts from that model.
    """
    summary = extraction.summary(_write_images(extraction.images, folder / "key", transaction))
    summary.update(_provenance(key, key_path, key_file_sha256))

    reference_images = None
    summary["reference"] = None
    if reference is not None:
        reference_paths = None
        if reference.extraction is not None:
            reference_images = reference.extraction.images
            reference_paths = _write_images(reference_images, folder / "reference", transaction)
        summary["reference"] = reference.summary(reference_paths)

    transaction.write_bytes(folder / "sheet.png", sheet_png(extraction, summary, reference_images))
    report = render_report(summary, extraction.secrets, extraction.images, reference_images)
    transaction.write_text(folder / "report.html", report)
    summary["sheet"] = str(folder / "sheet.png")
    summary["report"] = str(folder / "report.html")
    transaction.write_text(folder / "scores.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _write_images(images: np.ndarray, prefix: Path, transaction: OutputTransaction) -> list[str]:
    """Write images [K, C, H, W] as PREFIX00.png, PREFIX01.png, ... and return their paths."""
    from onnxmark.secrets import secret_to_png_bytes

    paths = []
    for index, image in enumerate(images):
        path = prefix.with_name(f"{prefix.name}{index:02d}.png")
        transaction.write_bytes(path, secret_to_png_bytes(image))
        paths.append(str(path))
    return paths


def _provenance(key: Key | None, key_path: str | Path | None, key_file_sha256: str | None = None) -> dict:
    """Return the date, the versions and, where given, the key's file hash and commitment."""
    import onnxruntime

    # The date has no time of day, so rerunning an extraction on the same day writes identical files.
    details = {"date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
               "onnxmark_version": __version__, "onnxruntime_version": onnxruntime.__version__}
    if key_path is not None:
        details["key"] = str(key_path)
        details["key_sha256"] = key_file_sha256 or file_sha256(key_path)
    if key is not None:
        details["key_commitment"] = key_commitment(key)
        details["key_model_sha256"] = key.model_sha256
    return details


def sheet_png(extraction: Extraction, summary: dict | None = None, reference_images: np.ndarray | None = None) -> bytes:
    """Draw a PNG sheet: one row per key with the secret, the extracted image and the reference's image,
    each captioned with its scores, and below them the hashes, date and versions from `summary`."""
    summary = summary if summary is not None else extraction.summary()
    font = ImageFont.load_default()
    line_height = _line_height(font)

    _, _, height, width = extraction.secrets.shape
    zoom = tile_zoom(height)
    cell_w, cell_h = width * zoom, height * zoom
    columns = [("secret", extraction.secrets, [_key_caption(entry) for entry in summary["keys"]]),
               ("suspect", extraction.images, [_score_caption(entry) for entry in summary["keys"]])]
    if reference_images is not None:
        columns.append(("reference", reference_images,
                        [_score_caption(entry) for entry in summary["reference"]["keys"]]))

    caption_lines = max(len(caption) for _, _, captions in columns for caption in captions)
    row_h = cell_h + caption_lines * line_height + SHEET_MARGIN
    footer = _sheet_footer(summary)
    sheet_w = max(len(columns) * (cell_w + SHEET_MARGIN) + SHEET_MARGIN,
                  max(int(font.getlength(line)) for line in footer) + 2 * SHEET_MARGIN)
    sheet_h = SHEET_CAPTION_PIXELS + len(extraction.secrets) * row_h + len(footer) * line_height + SHEET_MARGIN
    sheet = Image.new("RGB", (sheet_w, sheet_h), "white")
    draw = ImageDraw.Draw(sheet)

    for column, (title, images, captions) in enumerate(columns):
        left = SHEET_MARGIN + column * (cell_w + SHEET_MARGIN)
        draw.text((left, 2), title, fill="black", font=font)
        for index, image in enumerate(images):
            top = SHEET_CAPTION_PIXELS + index * row_h
            sheet.paste(to_pil(image, zoom), (left, top))
            draw.rectangle((left - 1, top - 1, left + cell_w, top + cell_h), outline=SHEET_FRAME_COLOR)
            for line_index, line in enumerate(captions[index]):
                draw.text((left, top + cell_h + 2 + line_index * line_height), line, fill="black", font=font)

    footer_top = SHEET_CAPTION_PIXELS + len(extraction.secrets) * row_h
    for line_index, line in enumerate(footer):
        draw.text((SHEET_MARGIN, footer_top + line_index * line_height), line, fill="black", font=font)

    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom - top + SHEET_LINE_SPACING


def _key_caption(entry: dict) -> list[str]:
    lines = [f"key {entry['index']}"]
    if entry.get("p_value") is not None:
        lines.append(f"p {entry['p_value']:.2g}")
    if entry.get("z_score") is not None:
        lines.append(f"z {entry['z_score']:.1f}")
    return lines


def _score_caption(entry: dict) -> list[str]:
    lines = [f"SSIM {entry['ssim']:.3f}", f"MSE {entry['mse']:.4f}", format_psnr(entry.get("psnr"))]
    if entry.get("control_ssim") is not None:
        lines.append(f"wrong secret {entry['control_ssim']:.3f}")
    return lines


def _sheet_footer(summary: dict) -> list[str]:
    scores = f"mean SSIM {summary['ssim_mean']:.3f} (min {summary['ssim_min']:.3f})"
    if summary.get("p_value") is not None:
        scores += f", combined p-value {summary['p_value']:.2g}"
    lines = [f"suspect {summary['model']}: {scores}"]
    if summary.get("file_sha256"):
        lines.append(f"suspect file SHA-256 {summary['file_sha256']}")
    if summary.get("key_sha256"):
        lines.append(f"key file SHA-256 {summary['key_sha256']}")
    if summary.get("key_commitment"):
        lines.append(f"key commitment {summary['key_commitment']}")

    reference = summary.get("reference")
    if reference and reference.get("mismatch"):
        lines.append(f"reference {reference['model']}: structure differs, the key does not apply")
    elif reference:
        lines.append(f"reference {reference['model']}: mean SSIM {reference['ssim_mean']:.3f} "
                     f"(min {reference['ssim_min']:.3f})")
    if summary.get("date"):
        lines.append(f"{summary['date']}, onnxmark {summary['onnxmark_version']}, "
                     f"onnxruntime {summary['onnxruntime_version']}")
    return lines
