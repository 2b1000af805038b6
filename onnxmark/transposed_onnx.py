"""Export a transposition plan as an ONNX graph and run it with onnxruntime (no torch needed)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxmark.graph import ModelGraph
from onnxmark.plan import Plan

# The transposed graph is our own, so it uses one recent opset whatever the suspect's opset is
# (Resize with an `axes` attribute needs 18).
TRANSPOSED_OPSET = 18
KEY_INPUT = "key"
IMAGE_OUTPUT = "image"


class OnnxBuilder:
    """Collects the nodes and initializers of the transposed graph."""

    def __init__(self, graph: ModelGraph):
        self.graph = graph
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


def build_transposed_model(plan: Plan, graph: ModelGraph) -> onnx.ModelProto:
    """Build the ONNX graph of the transposed model: key vectors in, images in the model's input layout out."""
    builder = OnnxBuilder(graph)
    tensor = KEY_INPUT
    for step in plan.steps:
        tensor = step.emit_onnx(builder, tensor)
    builder.nodes.append(helper.make_node("Identity", [tensor], [IMAGE_OUTPUT], name="onnxmark/output"))

    logits_shape = list(plan.steps[0].output_shape)
    key_input = helper.make_tensor_value_info(KEY_INPUT, TensorProto.FLOAT, ["keys", *logits_shape])
    image_output = helper.make_tensor_value_info(IMAGE_OUTPUT, TensorProto.FLOAT, ["keys", *graph.input_dims])
    onnx_graph = helper.make_graph(builder.nodes, "onnxmark_transposed", [key_input], [image_output],
                                   list(builder.initializers.values()))
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", TRANSPOSED_OPSET)],
                              producer_name="onnxmark")
    model.ir_version = min(model.ir_version, 10)
    return model


def run_transposed(model: onnx.ModelProto, keys: np.ndarray) -> np.ndarray:
    """Run the transposed graph on key vectors with onnxruntime; return images in the model's layout."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (images,) = session.run([IMAGE_OUTPUT], {KEY_INPUT: np.asarray(keys, dtype=np.float32)})
    return images
