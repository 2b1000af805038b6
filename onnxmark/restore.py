"""Parts of the watermarked model that the key stores so that a verifier can undo a thief's rewrites.

Folding a batch norm into the Conv before it changes that Conv's weights, and a new classification head
replaces the last layer. The key keeps the batch norms' values and the head, and extraction puts them back
into its internal copy of the suspect.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxmark.canonical import attributes, node_input, op_domain

LAYER_OPS = ("Conv", "Gemm", "MatMul")
BATCH_NORM_ARRAYS = ("scale", "bias", "mean", "variance")
# Prefix of the name of every node and initializer that undoing a folded batch norm adds.
UNFOLDED_PREFIX = "onnxmark/unfolded/"

# Relative L2 distance between the suspect's head weight and the key's above which the suspect's head
# counts as a new one.
HEAD_REPLACED_DISTANCE = 0.5

# Nodes that pass one activation through to the logits without weights, so that a walk back from the output
# to the classification head may step over them.
HEAD_PASS_THROUGH = {"Softmax", "LogSoftmax", "Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Cast",
                     "BatchNormalization"}


# Layers that a batch norm right after them can be folded into.
FOLDING_LAYERS = ("Conv", "Gemm")


def batch_norm_records(model: onnx.ModelProto) -> list[dict]:
    """Record each batch norm right after a Conv or Gemm: the layer's position and the batch norm's values.

    The key stores these records so that a verifier can undo the folding of a batch norm into its layer.
    """
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    records = []
    for index, layer in enumerate(folding_layers(model)):
        consumers = [node for node in model.graph.node if layer.output[0] in node.input]
        if len(consumers) != 1 or consumers[0].op_type != "BatchNormalization":
            continue
        norm = consumers[0]
        values = [constants.get(name) for name in norm.input[1:5]]
        if any(value is None for value in values):
            continue
        scale, bias, mean, variance = (np.asarray(value, dtype=np.float32) for value in values)
        records.append({"layer_index": index, "scale": scale, "bias": bias, "mean": mean, "variance": variance,
                        "epsilon": float(attributes(norm).get("epsilon", 1e-5))})
    return records


def folding_layers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Return the Conv and Gemm nodes in a stable topological order (file order where that is one already)."""
    produced_by = {output: index for index, node in enumerate(model.graph.node) for output in node.output}
    nodes = list(model.graph.node)
    pending = {index: {produced_by[name] for name in node.input if name in produced_by}
               for index, node in enumerate(nodes)}
    ordered, done = [], set()
    while len(done) < len(nodes):
        ready = [index for index in range(len(nodes)) if index not in done and pending[index] <= done]
        if not ready:
            break
        done.add(ready[0])
        ordered.append(nodes[ready[0]])
    return [node for node in ordered if node.op_type in FOLDING_LAYERS and op_domain(node) == ""]


def restore_batch_norms(model: onnx.ModelProto, records: list[dict]) -> list[str]:
    """Undo the folding of recorded batch norms into their layers, in place; return a note when any was undone.

    A folded layer computes W' = W * s and b' = (b - mean) * s + beta per output channel, with
    s = gamma / sqrt(variance + eps). Dividing by s gives W and b back, and a BatchNormalization node with
    the key's values follows the layer again.
    """
    layers = folding_layers(model)
    restored = 0
    for record in records:
        index = record["layer_index"]
        if index < len(layers) and _unfold(model, layers[index], record):
            restored += 1
    if not restored:
        return []
    return [f"{restored} batch norm(s) folded into the layer before them were restored with the values "
            "stored in the key"]


def _unfold(model: onnx.ModelProto, layer: onnx.NodeProto, record: dict) -> bool:
    consumers = [node for node in model.graph.node if layer.output[0] in node.input]
    if any(node.op_type == "BatchNormalization" for node in consumers):
        return False
    initializers = {init.name: init for init in model.graph.initializer}
    weight_init = initializers.get(layer.input[1])
    if weight_init is None:
        return False
    weight = numpy_helper.to_array(weight_init).astype(np.float32)
    # The output channels are axis 0 of a Conv weight [M, C/group, k...] and of a Gemm weight with transB.
    channel_axis = 1 if layer.op_type == "Gemm" and not attributes(layer).get("transB", 0) else 0
    if weight.shape[channel_axis] != len(record["scale"]):
        return False

    scale = record["scale"] / np.sqrt(record["variance"] + record["epsilon"])
    shape = [1] * weight.ndim
    shape[channel_axis] = len(scale)
    # NOTE: a weight that several layers share is divided once per record, which is only right when one
    # of them was folded.
    weight_init.CopyFrom(numpy_helper.from_array(weight / scale.reshape(shape), weight_init.name))

    bias_name = node_input(layer, 2)
    bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float32) if bias_name in initializers \
        else np.zeros(len(scale), np.float32)
    folded_output = layer.output[0]
    prefix = f"{UNFOLDED_PREFIX}{folded_output}"
    model.graph.initializer.append(numpy_helper.from_array(
        ((bias - record["bias"]) / scale + record["mean"]).astype(np.float32), f"{prefix}/layer_bias"))
    if bias_name:
        layer.input[2] = f"{prefix}/layer_bias"
    else:
        layer.input.append(f"{prefix}/layer_bias")

    layer.output[0] = f"{prefix}/layer_output"
    names = []
    for part in BATCH_NORM_ARRAYS:
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(record[part], np.float32),
                                                               f"{prefix}/{part}"))
        names.append(f"{prefix}/{part}")
    norm = helper.make_node("BatchNormalization", [layer.output[0], *names], [folded_output],
                            name=f"{prefix}/batch_norm", epsilon=record["epsilon"])
    model.graph.node.insert(list(model.graph.node).index(layer) + 1, norm)
    return True


def head_layer(model: onnx.ModelProto) -> tuple[onnx.NodeProto | None, list[str]]:
    """Return the classification head's layer and the names of its weight (and bias) initializers.

    The walk goes back from the first graph output over nodes without weights (Softmax, Flatten, ...) to
    the first Conv, Gemm or MatMul. A constant Add right after a MatMul counts as its bias.
    """
    producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {init.name for init in model.graph.initializer}
    tensor = model.graph.output[0].name
    bias: list[str] = []
    while tensor in producers:
        node = producers[tensor]
        if node.op_type in LAYER_OPS and op_domain(node) == "":
            weights = [name for name in node.input[1:] if name in initializers]
            return node, weights + bias
        if node.op_type == "Add" and not bias:
            constants = [name for name in node.input if name in initializers]
            activations = [name for name in node.input if name and name not in initializers]
            if len(constants) == 1 and len(activations) == 1:
                bias = constants
                tensor = activations[0]
                continue
        if node.op_type in HEAD_PASS_THROUGH:
            tensor = node.input[0]
            continue
        break
    return None, []


def _weight_is_input_major(node: onnx.NodeProto) -> bool:
    """Return whether a 2-D head weight is stored [inputs, classes] (MatMul, Gemm without transB)."""
    return node.op_type == "MatMul" or (node.op_type == "Gemm" and not attributes(node).get("transB", 0))


def _restore_head_batch_norm(model: onnx.ModelProto, layer: onnx.NodeProto, records: list[dict]) -> None:
    layers = folding_layers(model)
    if layer not in layers:
        return
    record = next((r for r in records if r["layer_index"] == layers.index(layer)), None)
    norm = next((node for node in model.graph.node if layer.output[0] in node.input), None)
    if record is None or norm is None or norm.op_type != "BatchNormalization":
        return
    initializers = {init.name: init for init in model.graph.initializer}
    names = list(norm.input[1:5])
    if not all(name in initializers for name in names):
        return
    for name, part in zip(names, BATCH_NORM_ARRAYS):
        initializers[name].CopyFrom(numpy_helper.from_array(np.asarray(record[part], np.float32), name))


def head_values(model: onnx.ModelProto) -> list[np.ndarray]:
    """Return the classification head's weight (2-D weights as [classes, inputs]) and bias, for the key."""
    node, names = head_layer(model)
    initializers = {init.name: init for init in model.graph.initializer}
    values = [numpy_helper.to_array(initializers[name]).astype(np.float32) for name in names]
    if values and values[0].ndim == 2 and _weight_is_input_major(node):
        values[0] = np.ascontiguousarray(values[0].T)
    return values


def _fits_body(own: tuple[int, ...], stored: tuple[int, ...], node: onnx.NodeProto) -> bool:
    """Return whether a stored head weight reads the suspect's features, so all axes but the class axis agree."""
    if len(own) != len(stored):
        return False
    class_axis = 1 if len(own) == 2 and _weight_is_input_major(node) else 0
    return all(a == b for axis, (a, b) in enumerate(zip(own, stored)) if axis != class_axis)


def restore_head(model: onnx.ModelProto, head: list[np.ndarray], batch_norms: list[dict] | None = None) -> list[str]:
    """Put the key's classification head into the model, in place, where the suspect's head is a new one.

    A head counts as new when its weight has another shape, or when it lies farther than
    HEAD_REPLACED_DISTANCE from the key's (relative L2 distance). Quantization and fine-tuning move a head
    by a few percent, while a head trained anew for as many classes moves it by about its own size. A batch norm
    right after the head gets the key's values back too, where `batch_norms` records it.
    """
    node, names = head_layer(model)
    if node is None or len(names) != len(head):
        return []
    initializers = {init.name: init for init in model.graph.initializer}
    head = [np.asarray(value, dtype=np.float32) for value in head]
    if head[0].ndim == 2 and _weight_is_input_major(node):
        head[0] = np.ascontiguousarray(head[0].T)
    shapes = [tuple(initializers[name].dims) for name in names]
    if not _fits_body(shapes[0], head[0].shape, node):
        return []
    reason = "it has another shape"
    if shapes[0] == head[0].shape:
        own = numpy_helper.to_array(initializers[names[0]]).astype(np.float32)
        distance = float(np.linalg.norm(own - head[0]) / max(np.linalg.norm(head[0]), 1e-12))
        if distance <= HEAD_REPLACED_DISTANCE:
            return []
        reason = f"it lies {distance:.2f} (relative L2 distance) from the key's, so it was trained anew"

    for name, value in zip(names, head):
        initializers[name].CopyFrom(numpy_helper.from_array(value, name))
    _restore_head_batch_norm(model, node, batch_norms or [])
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    return [f"checked with the classification head stored in the key (weight {list(head[0].shape)}) in place "
            f"of the suspect's own (weight {list(shapes[0])}), because {reason}"]
