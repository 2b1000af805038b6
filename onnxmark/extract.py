"""Extraction: rebuild the transposed model from a suspect's weights and run the key through onnxruntime.

This module and everything it imports must stay free of torch and onnx2torch.
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont

from onnxmark.canonical import CanonicalModel, canonical_model
from onnxmark.data import from_layout
from onnxmark.errors import OnnxmarkError
from onnxmark.files import OutputTransaction
from onnxmark.graph import import_graph, load_onnx
from onnxmark.keyfile import Key, model_sha256
from onnxmark.plan import build_plan, check_signature
from onnxmark.ssim import mse_batch, ssim_batch
from onnxmark.transposed_onnx import build_transposed_model, run_transposed

log = logging.getLogger(__name__)

# Each image on the evidence sheet is scaled up (nearest neighbour) to at least this many pixels high.
SHEET_CELL_PIXELS = 112
SHEET_MARGIN = 8
SHEET_CAPTION_PIXELS = 16


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

    def summary(self, image_paths: list[str] | None = None) -> dict:
        keys = []
        for index in range(len(self.ssim)):
            entry = {"index": index, "ssim": float(self.ssim[index]), "mse": float(self.mse[index])}
            entry["image"] = image_paths[index] if image_paths else None
            keys.append(entry)
        return {"model": self.model, "model_sha256": self.model_sha256,
                "ssim_mean": float(self.ssim.mean()), "ssim_min": float(self.ssim.min()), "notes": self.notes,
                "keys": keys}


def extract(suspect: str | Path, key: Key, model: onnx.ModelProto | None = None) -> Extraction:
    """Extract the key's images from a suspect file (or an already loaded model of that file).

    The suspect is first brought into canonical float form: quantization, fused operators, fp16 weights and
    folded batch norms are undone, and a classification head trained anew is replaced by the key's. The
    notes of the result say which rewrites were undone.
    """
    model = model if model is not None else load_onnx(suspect)
    canonical = canonical_model(model, key.batch_norms, key.head)
    return _extract_canonical(suspect, key, canonical, model_sha256(model))


def _extract_canonical(suspect: str | Path, key: Key, canonical: CanonicalModel, digest: str) -> Extraction:
    graph = import_graph(suspect, canonical.model)
    plan = build_plan(graph)
    check_signature(key.signature, plan.signature(graph), str(suspect))
    plan.frozen_values = _frozen_by_position(plan, graph, key)

    transposed = build_transposed_model(plan, graph)
    values = run_transposed(transposed, key.keys)
    pixels = key.preprocessing.to_pixels(from_layout(values, key.input_spec))
    images = np.clip(pixels, 0.0, 1.0).astype(np.float32)

    return Extraction(model=str(suspect), model_sha256=digest, images=images, secrets=key.secrets,
                      ssim=ssim_batch(images, key.secrets), mse=mse_batch(images, key.secrets),
                      notes=list(canonical.notes))


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


def write_evidence(extraction: Extraction, folder: Path, transaction: OutputTransaction) -> dict:
    """Write one PNG per key, the side-by-side sheet and scores.json; return the summary with the paths."""
    from onnxmark.secrets import secret_to_png_bytes

    image_paths = []
    for index, image in enumerate(extraction.images):
        path = folder / f"key{index:02d}.png"
        transaction.write_bytes(path, secret_to_png_bytes(image))
        image_paths.append(str(path))

    transaction.write_bytes(folder / "sheet.png", sheet_png(extraction))
    summary = extraction.summary(image_paths)
    summary["sheet"] = str(folder / "sheet.png")
    transaction.write_text(folder / "scores.json", json.dumps(summary, indent=1) + "\n")
    return summary


def sheet_png(extraction: Extraction) -> bytes:
    """Draw a PNG sheet with one row per key (secret, then extracted image) captioned with SSIM and MSE."""
    _, channels, height, width = extraction.secrets.shape
    zoom = max(1, -(-SHEET_CELL_PIXELS // height))
    cell_w, cell_h = width * zoom, height * zoom
    row_h = cell_h + SHEET_CAPTION_PIXELS + SHEET_MARGIN
    sheet = Image.new("RGB", (2 * cell_w + 3 * SHEET_MARGIN, SHEET_CAPTION_PIXELS + len(extraction.ssim) * row_h
                              + SHEET_MARGIN), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((SHEET_MARGIN, 2), "secret", fill="black", font=font)
    draw.text((2 * SHEET_MARGIN + cell_w, 2), "extracted", fill="black", font=font)

    for index in range(len(extraction.ssim)):
        top = SHEET_CAPTION_PIXELS + index * row_h
        for column, image in enumerate((extraction.secrets[index], extraction.images[index])):
            tile = _to_pil(image).resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(tile, (SHEET_MARGIN + column * (cell_w + SHEET_MARGIN), top))
        caption = f"key {index}: SSIM {extraction.ssim[index]:.3f}  MSE {extraction.mse[index]:.4f}"
        draw.text((SHEET_MARGIN, top + cell_h + 2), caption, fill="black", font=font)

    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _to_pil(image: np.ndarray) -> Image.Image:
    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    if pixels.shape[0] == 1:
        return Image.fromarray(pixels[0], "L").convert("RGB")
    return Image.fromarray(pixels[:3].transpose(1, 2, 0), "RGB")
