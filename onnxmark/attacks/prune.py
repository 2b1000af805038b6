"""Pruning attacks: global magnitude pruning, and fine-pruning (pruning, then fine-tuning with the pruned weights held at zero)."""
from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxmark.attacks.base import TRAINING_LR, AttackContext, Attacked, LabelledInputs, check_labels, register
from onnxmark.attacks.finetune import fine_tune
from onnxmark.errors import OnnxmarkError
from onnxmark.graph import ModelGraph
from onnxmark.writeback import write_back

log = logging.getLogger(__name__)

# Operators whose weight tensors are pruned. Biases (1-D) and normalisation parameters are left alone, as is
# usual in magnitude pruning of conv and linear layers.
PRUNED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
DEFAULT_LEVEL = 0.5
FINEPRUNE_EPOCHS = 1


@register("prune", "Set the fraction --level of all conv and linear weights with the smallest magnitude to zero.",
          defaults={"level": DEFAULT_LEVEL})
def prune(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    pruned, masks = magnitude_pruned(context.graph, context.options.level)
    return Attacked(write_back(original, pruned), _pruning_details(masks, context.options.level))


@register("fineprune", "Prune like prune, then fine-tune for --epochs at --lr with the pruned weights kept at zero.",
          defaults={"level": DEFAULT_LEVEL, "epochs": FINEPRUNE_EPOCHS, "lr": TRAINING_LR, "train_data": None},
          needs_data=True)
def fineprune(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    pruned, masks = magnitude_pruned(context.graph, context.options.level)
    data = context.training()
    labels = check_labels(data, context.class_count)
    values = fine_tune(context.graph, LabelledInputs(data.inputs, labels, data.source), context, start=pruned,
                       masks=masks)
    details = _pruning_details(masks, context.options.level)
    details.update({"epochs": context.options.epochs, "lr": context.options.lr, "train_images": len(data.inputs),
                    "train_data": data.source})
    return Attacked(write_back(original, values), details)


def pruned_weight_names(graph: ModelGraph) -> list[str]:
    """Return the float initializers with two or more dims that a Conv, ConvTranspose, Gemm or MatMul node reads."""
    trainable = set(graph.float_initializer_names())
    names: list[str] = []
    for node in graph.nodes:
        if node.op_type not in PRUNED_OPS:
            continue
        for name in node.inputs:
            if name in trainable and graph.constants[name].ndim >= 2 and name not in names:
                names.append(name)
    return names


def magnitude_pruned(graph: ModelGraph, level: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Zero the fraction `level` of all pruned weights with the smallest absolute value, ranked over all layers.

    Returns the pruned weights and their masks (True where a weight is kept), by initializer name.
    Exactly round(level * count) weights are zeroed, and ties at the threshold go by position.
    """
    if not 0.0 <= level <= 1.0:
        raise OnnxmarkError(f"Invalid pruning level {level}: it must be a fraction from 0 to 1")
    names = pruned_weight_names(graph)
    if not names:
        raise OnnxmarkError(f"{graph.path} has no Conv, ConvTranspose, Gemm or MatMul weights to prune")

    weights = {name: np.asarray(graph.constants[name], dtype=np.float32) for name in names}
    magnitudes = np.concatenate([np.abs(value).ravel() for value in weights.values()])
    count = int(round(level * magnitudes.size))
    keep = np.ones(magnitudes.size, dtype=bool)
    if count > 0:
        keep[np.argpartition(magnitudes, count - 1)[:count]] = False

    pruned, masks, offset = {}, {}, 0
    for name, value in weights.items():
        mask = keep[offset:offset + value.size].reshape(value.shape)
        offset += value.size
        masks[name] = mask
        pruned[name] = np.where(mask, value, 0.0).astype(np.float32)
    log.info("Pruned %d of %d weights in %d tensors", count, magnitudes.size, len(names))
    return pruned, masks


def _pruning_details(masks: dict[str, np.ndarray], level: float) -> dict:
    total = sum(mask.size for mask in masks.values())
    zeroed = sum(int((~mask).sum()) for mask in masks.values())
    return {"level": level, "pruned_weights": zeroed, "prunable_weights": total, "pruned_tensors": sorted(masks)}
