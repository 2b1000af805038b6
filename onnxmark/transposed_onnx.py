"""Export a transposition plan as an ONNX graph and run it with onnxruntime (no torch needed)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxmark.errors import OnnxmarkError
from onnxmark.graph import ModelGraph, runtime_session
from onnxmark.plan import Plan

# The transposed graph is our own, so it uses one recent opset whatever the suspect's opset is
# (Resize with an `axes` attribute needs 18).
TRANSPOSED_OPSET = 18
KEY_INPUT = "key"
IMAGE_OUTPUT = "image"
# Keys per onnxruntime call when many keys go through the transposed model at once.
TRANSPOSED_BATCH = 32


class OnnxBuilder:
    """Collects the nodes and initializers of the transposed graph."""

    def __init__(self, graph: ModelGraph, frozen: dict[str, np.ndarray]):
        self.graph = graph
        self.frozen_values = frozen
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"onnxmark/{hint}_{self.count}"

    def add(self, op_type: str, inputs: list[str], **attrs) -> str:
        output = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def add_multi(self, op_type: str, inputs: list[str], count: int, **attrs) -> list[str]:
        outputs = [self.fresh(op_type.lower()) for _ in range(count)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=outputs[0], **attrs))
        return outputs

    def constant(self, value, dtype: str, hint: str) -> str:
        name = self.fresh(hint)
        self.initializers[name] = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return name

    def weight(self, name: str) -> str:
        """Add one of the model's own constant tensors, as float32, under its own name."""
        if name not in self.initializers:
            value = np.asarray(self.graph.constant_value(name))
            if np.issubdtype(value.dtype, np.floating):
                value = value.astype(np.float32)
            self.initializers[name] = numpy_helper.from_array(value, name)
        return name

    def frozen(self, name: str) -> str:
        """Add a frozen tensor from the key, with a leading batch axis of 1, under a name of its own."""
        initializer = f"onnxmark/frozen/{name}"
        if initializer not in self.initializers:
            value = np.asarray(self.frozen_values[name], dtype=np.float32)[None]
            self.initializers[initializer] = numpy_helper.from_array(value, initializer)
        return initializer


def build_transposed_model(plan: Plan, graph: ModelGraph,
                           frozen: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Build the ONNX graph of the transposed model: key vectors in, images in the model's input layout out.

    `frozen` maps forward tensor names to the plan's frozen tensors (from the key). The plan's own
    `frozen_values` are the default.
    """
    builder = OnnxBuilder(graph, _checked_frozen(plan, plan.frozen_values if frozen is None else frozen))
    logits_shape = list(plan.steps[0].output_shape)
    key = KEY_INPUT
    if len(logits_shape) > 1:   # logits such as [classes, 1, 1] after a global pooling
        key = builder.add("Reshape", [key, builder.constant([-1, *logits_shape], "int64", "logits_shape")])
    values = {plan.logits_name: key}
    for step in plan.steps:
        produced = step.emit_onnx(builder, values.pop(step.target))
        produced = [produced] if isinstance(produced, str) else produced
        for source, tensor in zip(step.sources, produced):
            values[source] = builder.add("Add", [values[source], tensor]) if source in values else tensor
    builder.nodes.append(helper.make_node("Identity", [values[plan.input_name]], [IMAGE_OUTPUT],
                                          name="onnxmark/output"))

    key_input = helper.make_tensor_value_info(KEY_INPUT, TensorProto.FLOAT, ["keys", int(np.prod(logits_shape))])
    image_output = helper.make_tensor_value_info(IMAGE_OUTPUT, TensorProto.FLOAT, ["keys", *graph.input_dims])
    onnx_graph = helper.make_graph(builder.nodes, "onnxmark_transposed", [key_input], [image_output],
                                   list(builder.initializers.values()))
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", TRANSPOSED_OPSET)],
                              producer_name="onnxmark")
    model.ir_version = min(model.ir_version, 10)
    return model


def _checked_frozen(plan: Plan, frozen: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [name for name in plan.frozen_names() if name not in frozen]
    if missing:
        raise OnnxmarkError(f"The key is missing the frozen value of the branch(es) {', '.join(missing)}; "
                            "it was made for a model with another structure")
    return frozen


def run_transposed(model: onnx.ModelProto, keys: np.ndarray, batch_size: int = TRANSPOSED_BATCH) -> np.ndarray:
    """Run the transposed graph on key vectors with onnxruntime; return images in the model's layout.

    One session runs all keys, `batch_size` keys at a time, to bound the memory of large images.
    """
    keys = np.asarray(keys, dtype=np.float32)
    keys = keys.reshape(len(keys), -1)
    session = runtime_session(model.SerializeToString())
    batches = [session.run([IMAGE_OUTPUT], {KEY_INPUT: keys[start:start + batch_size]})[0]
               for start in range(0, len(keys), batch_size)]
    return np.concatenate(batches)
