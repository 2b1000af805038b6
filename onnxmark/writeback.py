"""Write trained values back into the user's model: same nodes, names and metadata, new initializer values."""
from __future__ import annotations

import tempfile
from pathlib import Path

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


# Tensors below this many bytes stay inside the .onnx file when the weights go to an external data file.
EXTERNAL_DATA_THRESHOLD = 1024


def uses_external_data(path: str | Path) -> bool:
    """Return whether any initializer of the model file keeps its values in an external data file."""
    model = onnx.load(str(path), load_external_data=False)
    return any(initializer.data_location == onnx.TensorProto.EXTERNAL for initializer in model.graph.initializer)


def model_files(model: onnx.ModelProto, path: Path, external: bool) -> dict[Path, bytes]:
    """Serialise a model for writing at `path`: the .onnx bytes, plus `<name>.data` next to it when `external`."""
    if not external:
        return {path: model.SerializeToString()}

    location = f"{path.name}.data"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with tempfile.TemporaryDirectory() as folder:
        onnx.save_model(copy, str(Path(folder) / path.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=location, size_threshold=EXTERNAL_DATA_THRESHOLD)
        files = {path: (Path(folder) / path.name).read_bytes()}
        data = Path(folder) / location
        if data.exists():
            files[path.parent / location] = data.read_bytes()
    return files
