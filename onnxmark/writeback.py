"""Write trained values back into the user's model: same nodes, names and metadata, new initializer values."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxmark.errors import OnnxmarkError


def write_back(original: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Return a copy of `original` whose initializers (and Constant node tensors) named in `values` are replaced.

    Each value is cast to the dtype the original tensor had, so fp16 weights stay fp16.
    """
    model = onnx.ModelProto()
    model.CopyFrom(original)
    remaining = dict(values)

    for initializer in model.graph.initializer:
        if initializer.name in remaining:
            initializer.CopyFrom(_replacement(initializer, remaining.pop(initializer.name)))

    for node in model.graph.node:
        if node.op_type != "Constant" or node.output[0] not in remaining:
            continue
        for attribute in node.attribute:
            if attribute.name == "value":
                attribute.t.CopyFrom(_replacement(attribute.t, remaining.pop(node.output[0])))

    if remaining:
        raise OnnxmarkError(f"Cannot write back {len(remaining)} tensor(s) that the model does not contain: "
                            f"{', '.join(sorted(remaining)[:5])}")
    return model


def _replacement(tensor: onnx.TensorProto, value: np.ndarray) -> onnx.TensorProto:
    old = numpy_helper.to_array(tensor)
    if old.shape != value.shape:
        raise OnnxmarkError(f"Tensor '{tensor.name}' has shape {old.shape}, the trained value {value.shape}")
    return numpy_helper.from_array(np.asarray(value).astype(old.dtype), tensor.name)
