"""Extraction: rebuild the transposed model from a suspect's weights and run the key through onnxruntime.

This module and everything it imports must stay free of torch and onnx2torch.
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont

from onnxmark.calibration import (COMBINATION_METHOD, DEFAULT_NULL_KEYS, DEFAULT_NULL_SEED, Calibration, calibrate,
                                  check_key_range, draw_null_keys)
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
    calibration: Calibration | None = None   # None when extracted without random keys

    def summary(self, image_paths: list[str] | None = None) -> dict:
        """Return the scores as `extract --json` prints them, with None in the calibration fields without random keys."""
        keys = []
        for index in range(len(self.ssim)):
            entry = {"index": index, "ssim": float(self.ssim[index]), "mse": float(self.mse[index])}
            if self.calibration is not None:
                entry.update(self.calibration.key_entry(index))
            entry["image"] = image_paths[index] if image_paths else None
            keys.append(entry)

        calibration = self.calibration
        return {"model": self.model, "model_sha256": self.model_sha256,
                "ssim_mean": float(self.ssim.mean()), "ssim_min": float(self.ssim.min()),
                "p_value": None if calibration is None else calibration.p_value,
                "p_value_method": None if calibration is None else COMBINATION_METHOD,
                "null_keys": 0 if calibration is None else calibration.null_keys,
                "null_seed": None if calibration is None else calibration.null_seed,
                "keys": keys}


def extract(suspect: str | Path, key: Key, model: onnx.ModelProto | None = None,
            null_keys: int = DEFAULT_NULL_KEYS, null_seed: int = DEFAULT_NULL_SEED) -> Extraction:
    """Extract the key's images from a suspect file (or an already loaded model of that file).

    With `null_keys` above 0, that many random keys drawn with `null_seed` go through the same transposed
    model, and their images calibrate each key's SSIM (see onnxmark.calibration).
    """
    model = model if model is not None else load_onnx(suspect)
    graph = import_graph(suspect, model)
    plan = build_plan(graph)
    check_signature(key.signature, plan.signature(graph), str(suspect))
    plan.frozen_values = _frozen_by_position(plan, graph, key)

    random_keys = draw_null_keys(null_keys, key.keys.shape[1], null_seed)
    if null_keys:
        check_key_range(key.keys)
    transposed = build_transposed_model(plan, graph)
    values = run_transposed(transposed, np.concatenate([key.keys, random_keys]))
    pixels = key.preprocessing.to_pixels(from_layout(values, key.input_spec))
    all_images = np.clip(pixels, 0.0, 1.0).astype(np.float32)
    images, null_images = all_images[:len(key.keys)].copy(), all_images[len(key.keys):]

    calibration = calibrate(images, null_images, key.secrets, null_seed) if null_keys else None
    return Extraction(model=str(suspect), model_sha256=model_sha256(model),
                      images=images, secrets=key.secrets,
                      ssim=ssim_batch(images, key.secrets), mse=mse_batch(images, key.secrets),
                      calibration=calibration)


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
