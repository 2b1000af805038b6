"""Frozen tensors: branches the transposed model does not follow, fixed to their mean over real inputs.

A residual `c = a + b` is transposed as `a = c - mean(b)`. The mean is recorded once, from the model the
watermark is embedded into, and stored in the key, so that extraction rebuilds the same transposed model
from a suspect's weights without needing any data.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxmark.errors import OnnxmarkError
from onnxmark.graph import ModelGraph, runtime_session
from onnxmark.plan import Plan

# Inputs per onnxruntime run when the model's batch dimension is dynamic.
RECORDING_BATCH = 128
# At most this many inputs are averaged.
RECORDING_LIMIT = 2048


def record_frozen(plan: Plan, graph: ModelGraph, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Return the mean over `inputs` (model layout and value range) of every frozen tensor of the plan.

    Each mean has the tensor's shape without the batch dimension.
    """
    names = plan.frozen_names()
    if not names:
        return {}
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    session = runtime_session(model.SerializeToString())

    batch = graph.recorded_batch if _batch_is_fixed(graph) else RECORDING_BATCH
    inputs = inputs[:RECORDING_LIMIT].astype(graph.input_dtype)
    if len(inputs) < batch:
        raise OnnxmarkError(f"{graph.path}: too few training inputs ({len(inputs)}) to record the frozen branches; "
                            f"at least {batch} are needed, so pass more images with --data")
    sums = [np.zeros(graph.shapes[name], np.float64) for name in names]
    count = 0
    for start in range(0, len(inputs) - batch + 1, batch):
        outputs = session.run(names, {graph.input_name: inputs[start:start + batch]})
        for total, value in zip(sums, outputs):
            total += value.astype(np.float64).sum(axis=0)
        count += batch
    return {name: (total / count).astype(np.float32) for name, total in zip(names, sums)}


def _batch_is_fixed(graph: ModelGraph) -> bool:
    for info in graph.model.graph.input:
        if info.name == graph.input_name:
            first = info.type.tensor_type.shape.dim[0]
            return first.HasField("dim_value") and first.dim_value > 0
    return False
