"""Canonical float form of a suspect model, undoing the rewrites that keep a model useful but change its nodes.

Quantization to int8 (QDQ, QOperator and dynamic forms), onnxruntime's fused operators, fp16 weights,
batch norms folded into convolutions and a replaced classification head all change the nodes of a model
while the layers that carry the watermark stay. Extraction rewrites an internal copy of the suspect into
plain float operators before planning, so that the transposed model is built from the same layers as the
model the key was made for. The user's file is never changed.

This module must stay free of torch: extraction imports it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxmark.errors import OnnxmarkError

log = logging.getLogger(__name__)

MICROSOFT_DOMAIN = "com.microsoft"
NCHWC_DOMAIN = "com.microsoft.nchwc"
# Suffix of the name of every Relu that the rewrite restores after a quantized output without negative values.
RESTORED_RELU_SUFFIX = "/clamp"
WIDE_FLOAT_TYPES = {TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


@dataclass
class CanonicalModel:
    """The rewritten internal copy and one note per rewrite for the person reading the evidence."""

    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)


def canonical_model(model: onnx.ModelProto, batch_norms: list[dict] | None = None,
                    head: list[np.ndarray] | None = None, unrestored: frozenset[str] = frozenset()) -> CanonicalModel:
    """Return a float copy of `model` with quantized, fused and folded layers written as standard operators.

    `batch_norms` (from the key) restores batch norms that were folded into convolutions. `head` (from the
    key) replaces a classification head that was trained anew. `unrestored` names restored ReLUs (see
    RESTORED_RELU_SUFFIX) to leave out: a quantizer's zero point at the type's minimum also appears where
    a layer's output was merely never negative on the quantizer's calibration data.
    """
    rewriter = _Rewriter(model, unrestored)
    rewriter.rewrite_nodes()
    rewriter.widen_float_types()
    notes = rewriter.notes

    canonical = rewriter.build()
    from onnxmark.restore import restore_batch_norms, restore_head

    if batch_norms:
        notes += restore_batch_norms(canonical, batch_norms)
    if head is not None:
        notes += restore_head(canonical, head, batch_norms)
    return CanonicalModel(canonical, notes)


class _Rewriter:
    """Rewrites the node list of one model; tensors that a removed node passed through become aliases."""

    def __init__(self, model: onnx.ModelProto, unrestored: frozenset[str] = frozenset()):
        self.model = model
        self.unrestored = unrestored
        self.constants: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init)
                                                 for init in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_node_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value
        self.new_constants: dict[str, np.ndarray] = {}
        self.aliases: dict[str, str] = {}
        self.producers = {output: node for node in model.graph.node for output in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.nodes: list[onnx.NodeProto] = []
        self.skipped: set[int] = set()
        self.counts: dict[str, int] = {}
        self.notes: list[str] = []

    # Helpers.

    def resolve(self, name: str) -> str:
        while name in self.aliases:
            name = self.aliases[name]
        return name

    def constant(self, name: str) -> np.ndarray | None:
        name = self.resolve(name)
        if name in self.new_constants:
            return self.new_constants[name]
        return self.constants.get(name)

    def add_constant(self, name: str, value: np.ndarray) -> str:
        self.new_constants[name] = np.asarray(value)
        return name

    def emit(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))

    def emit_relu(self, source: str, output: str, name: str) -> None:
        """Emit a restored ReLU, or make `output` an alias of `source` when that ReLU is one to leave out."""
        name = f"{name}{RESTORED_RELU_SUFFIX}"
        if name in self.unrestored:
            self.aliases[output] = source
            self.count("relu_left_out")
            return
        self.emit("Relu", [source], [output], name)
        self.count("relu_restored")

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    # The pass over all nodes.

    def rewrite_nodes(self) -> None:
        nchwc = [node.name or node.op_type for node in self.model.graph.node if node.domain == NCHWC_DOMAIN]
        if nchwc:
            raise OnnxmarkError(
                f"{len(nchwc)} node(s) use onnxruntime's NCHWc layout ({', '.join(nchwc[:3])}), which the "
                "optimizer writes for one CPU type only. Check the file before that optimisation, or one "
                "optimised at the 'extended' level or below.")

        for node in self.model.graph.node:
            if id(node) in self.skipped:
                continue
            handler = _HANDLERS.get((op_domain(node), node.op_type))
            if handler is None:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                self.nodes.append(copy)
                continue
            handler(self, node)

        for node in self.nodes:
            node.input[:] = [self.resolve(name) if name else name for name in node.input]
        for output in self.model.graph.output:
            resolved = self.resolve(output.name)
            if resolved != output.name:
                self.emit("Identity", [resolved], [output.name], f"onnxmark/output/{output.name}")
        self._describe_counts()

    def _describe_counts(self) -> None:
        descriptions = {
            "dequantized": "int8 weights dequantized with their scales and zero points",
            "quantize_removed": "quantize/dequantize steps on activations read as identity",
            "fused": "onnxruntime fused operators written as their standard operators",
            "relu_restored": "ReLUs restored where a quantized output cannot be negative",
            "relu_left_out": "ReLUs not restored where the key's model has none, as no calibration value "
                             "was negative there",
        }
        for kind, text in descriptions.items():
            if self.counts.get(kind):
                self.notes.append(f"{text} ({self.counts[kind]})")

    def widen_float_types(self) -> None:
        """Make every float tensor float32: fp16 or double weights, casts and inputs."""
        widened = 0
        for name, value in list(self.constants.items()) + list(self.new_constants.items()):
            if value.dtype in (np.float16, np.float64):
                widened += 1
        for node in self.nodes:
            if node.op_type == "Cast":
                for attribute in node.attribute:
                    if attribute.name == "to" and attribute.i in WIDE_FLOAT_TYPES:
                        attribute.i = TensorProto.FLOAT
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value" and attribute.t.data_type in WIDE_FLOAT_TYPES:
                        value = numpy_helper.to_array(attribute.t).astype(np.float32)
                        attribute.t.CopyFrom(numpy_helper.from_array(value, attribute.t.name))
        if widened:
            self.notes.append(f"fp16 or double weights read as float32 ({widened})")

    def build(self) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        del graph.node[:]
        graph.node.extend(_live_nodes(self.nodes, [output.name for output in graph.output]))
        used = {name for node in graph.node for name in node.input}

        values = {**{name: value for name, value in self.constants.items()
                     if name in {init.name for init in self.model.graph.initializer}}, **self.new_constants}
        del graph.initializer[:]
        for name, value in values.items():
            if name in used:
                graph.initializer.append(numpy_helper.from_array(_float32(value), name))

        # Initializers listed as graph inputs (IR version 3) are listed again by graph import.
        original_initializers = {init.name for init in self.model.graph.initializer}
        data_inputs = [info for info in graph.input if info.name not in original_initializers]
        del graph.input[:]
        graph.input.extend(data_inputs)
        for info in list(graph.input) + list(graph.output):
            if info.type.tensor_type.elem_type in WIDE_FLOAT_TYPES:
                info.type.tensor_type.elem_type = TensorProto.FLOAT
        del graph.value_info[:]
        return model


def op_domain(node: onnx.NodeProto) -> str:
    return "" if node.domain == "ai.onnx" else node.domain


def _float32(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    return value.astype(np.float32) if value.dtype in (np.float16, np.float64) else value


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
    return None


def _live_nodes(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """Return the nodes that some graph output depends on, in their order."""
    needed = set(outputs)
    live = []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(name for name in node.input if name)
    return list(reversed(live))


def attributes(node: onnx.NodeProto) -> dict:
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _dequantized(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """Return (values - zero_point) * scale, per tensor or per slice along `axis` as DequantizeLinear does."""
    values = values.astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.zeros_like(scale) if zero_point is None else np.asarray(zero_point, dtype=np.float32)
    if scale.size > 1:
        shape = [1] * values.ndim
        shape[axis] = scale.size
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return ((values - zero_point) * scale).astype(np.float32)


def _clamps_at_zero(zero_point: np.ndarray | None) -> bool:
    """Return whether a quantized output's zero point is its type's minimum, so it cannot hold negative values."""
    if zero_point is None:
        return False
    zero_point = np.asarray(zero_point)
    if zero_point.dtype == np.uint8:
        return bool(np.all(zero_point == 0))
    if zero_point.dtype == np.int8:
        return bool(np.all(zero_point == -128))
    return False


def node_input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


# Quantize and dequantize steps.

# Producers whose output may be negative: a quantized copy of their output whose zero point is the type's
# minimum cannot hold negative values, so the quantization acts as a ReLU that the quantizer fused away.
SIGNED_PRODUCERS = {"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "BatchNormalization"}


def _rewrite_quantize(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    producer = rewriter.producers.get(node.input[0])
    zero_point = rewriter.constant(node_input(node, 2)) if node_input(node, 2) else None
    if producer is not None and producer.op_type in SIGNED_PRODUCERS and _clamps_at_zero(zero_point):
        rewriter.emit_relu(node.input[0], node.output[0], node.name)
    else:
        rewriter.aliases[node.output[0]] = node.input[0]
    rewriter.count("quantize_removed")


def _rewrite_dequantize(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    source = rewriter.resolve(node.input[0])
    value = rewriter.constant(source)
    if value is not None and np.issubdtype(value.dtype, np.integer):
        scale = rewriter.constant(node.input[1])
        zero_point = rewriter.constant(node_input(node, 2)) if node_input(node, 2) else None
        axis = attributes(node).get("axis", 1)
        rewriter.add_constant(node.output[0], _dequantized(value, scale, zero_point, axis))
        rewriter.count("dequantized")
        return
    rewriter.aliases[node.output[0]] = source
    rewriter.count("quantize_removed")


def _rewrite_dynamic_quantize(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    # Outputs: quantized x, its scale, its zero point. The scale and zero point only feed the integer
    # layers' rescaling, which the rewrite of those layers drops.
    rewriter.aliases[node.output[0]] = node.input[0]
    rewriter.count("quantize_removed")


def _rewrite_integer_layer(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    """MatMulInteger / ConvInteger -> Cast -> Mul(scale) becomes one float MatMul / Conv."""
    weight = rewriter.constant(node.input[1])
    cast = _single_consumer(rewriter, node.output[0], "Cast")
    rescale = _single_consumer(rewriter, cast.output[0], "Mul") if cast is not None else None
    weight_scale = _weight_scale(rewriter, rescale, cast) if rescale is not None else None
    if weight is None or weight_scale is None:
        raise OnnxmarkError(f"Node '{node.name}' ({node.op_type}) is not followed by the Cast and Mul that "
                            "rescale its output, so its weights cannot be dequantized")

    zero_point = rewriter.constant(node_input(node, 3)) if node_input(node, 3) else None
    axis = 0 if node.op_type == "ConvInteger" else weight.ndim - 1
    name = rewriter.add_constant(f"{node.input[1]}/dequantized", _dequantized(weight, weight_scale, zero_point, axis))
    op_type = "Conv" if node.op_type == "ConvInteger" else "MatMul"
    attrs = attributes(node) if op_type == "Conv" else {}
    rewriter.emit(op_type, [node.input[0], name], [rescale.output[0]], node.name, **attrs)
    rewriter.skipped.update({id(cast), id(rescale)})
    rewriter.count("dequantized")


def _single_consumer(rewriter: _Rewriter, tensor: str, op_type: str) -> onnx.NodeProto | None:
    consumers = rewriter.consumers.get(tensor, [])
    return consumers[0] if len(consumers) == 1 and consumers[0].op_type == op_type else None


def _weight_scale(rewriter: _Rewriter, rescale: onnx.NodeProto, cast: onnx.NodeProto) -> np.ndarray | None:
    """Find the weight's scale: the constant factor of the Mul that computes input scale * weight scale."""
    scale_name = next(name for name in rescale.input if name != cast.output[0])
    producer = next((node for node in rewriter.model.graph.node if scale_name in node.output), None)
    if producer is None or producer.op_type != "Mul":
        return rewriter.constant(scale_name)
    for name in producer.input:
        value = rewriter.constant(name)
        if value is not None:
            return value
    return None


# QOperator layers.

def _qlinear_weight(rewriter: _Rewriter, node: onnx.NodeProto, indices: tuple[int, int, int], axis: int) -> str:
    values, scale, zero_point = (rewriter.constant(node.input[i]) if node_input(node, i) else None for i in indices)
    if values is None or scale is None:
        raise OnnxmarkError(f"Node '{node.name}' ({node.op_type}) has a weight that is not a constant")
    return rewriter.add_constant(f"{node.input[indices[0]]}/dequantized",
                                 _dequantized(values, scale, zero_point, axis))


def _qlinear_bias(rewriter: _Rewriter, node: onnx.NodeProto, index: int, scales: tuple[int, int]) -> list[str]:
    """Dequantize an int32 bias, whose scale is the product of the input's and the weight's scales."""
    if not node_input(node, index):
        return []
    bias = rewriter.constant(node.input[index])
    scale = np.float32(rewriter.constant(node.input[scales[0]])) * rewriter.constant(node.input[scales[1]])
    return [rewriter.add_constant(f"{node.input[index]}/dequantized", bias.astype(np.float32) * scale)]


def _emit_with_clamp(rewriter: _Rewriter, node: onnx.NodeProto, op_type: str, inputs: list[str],
                     zero_point_index: int, **attrs) -> None:
    """Emit the float operator; a Relu follows when the quantized output could not hold negative values."""
    output = node.output[0]
    zero_point = rewriter.constant(node.input[zero_point_index]) if node_input(node, zero_point_index) else None
    if _clamps_at_zero(zero_point):
        rewriter.emit(op_type, inputs, [f"{output}/float"], node.name, **attrs)
        rewriter.emit_relu(f"{output}/float", output, node.name)
    else:
        rewriter.emit(op_type, inputs, [output], node.name, **attrs)
    rewriter.count("dequantized")


def _rewrite_qlinear_conv(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    # Inputs: x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B.
    weight = _qlinear_weight(rewriter, node, (3, 4, 5), axis=0)
    bias = _qlinear_bias(rewriter, node, 8, (1, 4))
    _emit_with_clamp(rewriter, node, "Conv", [node.input[0], weight, *bias], 7, **attributes(node))


def _rewrite_qlinear_matmul(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    # Inputs: a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point.
    weight = _qlinear_weight(rewriter, node, (3, 4, 5), axis=1)
    _emit_with_clamp(rewriter, node, "MatMul", [node.input[0], weight], 7)


def _rewrite_qgemm(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    # Inputs: A, a_scale, a_zero_point, B, b_scale, b_zero_point, C, y_scale, y_zero_point.
    attrs = attributes(node)
    weight = _qlinear_weight(rewriter, node, (3, 4, 5), axis=0 if attrs.get("transB", 0) else 1)
    bias = _qlinear_bias(rewriter, node, 6, (1, 4))
    gemm_attrs = {name: attrs[name] for name in ("alpha", "transA", "transB") if name in attrs}
    _emit_with_clamp(rewriter, node, "Gemm", [node.input[0], weight, *bias], 8, **gemm_attrs)


def _rewrite_qlinear_binary(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    # Inputs: A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point.
    operands = []
    for value_index, scale_index, zero_index in ((0, 1, 2), (3, 4, 5)):
        value = rewriter.constant(node.input[value_index])
        if value is not None and np.issubdtype(value.dtype, np.integer):
            operands.append(_qlinear_weight(rewriter, node, (value_index, scale_index, zero_index), axis=0))
        else:
            operands.append(node.input[value_index])
    op_type = node.op_type.removeprefix("QLinear")
    _emit_with_clamp(rewriter, node, op_type, operands, 7)


def _rewrite_qlinear_unary(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    # Inputs: X, X_scale, X_zero_point, Y_scale, Y_zero_point.
    attrs = {name: value for name, value in attributes(node).items() if name != "channels_last"}
    if attributes(node).get("channels_last"):
        raise OnnxmarkError(f"Node '{node.name}' ({node.op_type}) works on channels-last tensors, which is not "
                            "supported")
    rewriter.emit(node.op_type.removeprefix("QLinear"), [node.input[0]], [node.output[0]], node.name, **attrs)
    rewriter.count("dequantized")


def _rewrite_qlinear_concat(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    # Inputs: Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) per part.
    parts = list(node.input[2::3])
    rewriter.emit("Concat", parts, [node.output[0]], node.name, axis=attributes(node)["axis"])
    rewriter.count("dequantized")


# onnxruntime's fused operators.

def _rewrite_fused_conv(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    attrs = attributes(node)
    activation = attrs.pop("activation", None)
    params = attrs.pop("activation_params", [])
    inputs = [name for name in node.input[:3]]
    while inputs and not inputs[-1]:
        inputs.pop()
    output = node.output[0]
    current = f"{output}/conv"
    rewriter.emit("Conv", inputs, [current], node.name, **attrs)
    if node_input(node, 3):
        rewriter.emit("Add", [current, node.input[3]], [f"{output}/sum"], f"{node.name}/sum")
        current = f"{output}/sum"
    _emit_activation(rewriter, node, current, output, activation, list(params))


def _rewrite_fused_gemm(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    attrs = attributes(node)
    activation = attrs.pop("activation", None)
    params = [attrs.pop(name) for name in ("activation_alpha", "activation_beta", "activation_gamma")
              if name in attrs]
    gemm_attrs = {name: attrs[name] for name in ("alpha", "beta", "transA", "transB") if name in attrs}
    current = f"{node.output[0]}/gemm"
    rewriter.emit("Gemm", list(node.input), [current], node.name, **gemm_attrs)
    _emit_activation(rewriter, node, current, node.output[0], activation, params)


def _rewrite_fused_matmul(rewriter: _Rewriter, node: onnx.NodeProto) -> None:
    attrs = attributes(node)
    left, right = node.input[0], node.input[1]
    if attrs.get("transA", 0) or attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        raise OnnxmarkError(f"Node '{node.name}' (FusedMatMul) transposes its first input or a batch axis, "
                            "which is not supported")
    if attrs.get("transB", 0):
        transposed = f"{node.output[0]}/right_transposed"
        rank = len(rewriter.constant(right).shape) if rewriter.constant(right) is not None else 2
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        rewriter.emit("Transpose", [right], [transposed], f"{node.name}/transpose", perm=perm)
        right = transposed
    alpha = attrs.get("alpha", 1.0)
    if alpha == 1.0:
        rewriter.emit("MatMul", [left, right], [node.output[0]], node.name)
    else:
        product = f"{node.output[0]}/product"
        rewriter.emit("MatMul", [left, right], [product], node.name)
        factor = rewriter.add_constant(f"{node.output[0]}/alpha", np.float32(alpha))
        rewriter.emit("Mul", [product, factor], [node.output[0]], f"{node.name}/alpha")
    rewriter.count("fused")


def _emit_activation(rewriter: _Rewriter, node: onnx.NodeProto, source: str, output: str,
                     activation: bytes | str | None, params: list[float]) -> None:
    activation = activation.decode() if isinstance(activation, bytes) else activation
    name = f"{node.name}/{(activation or 'identity').lower()}"
    if not activation:
        rewriter.emit("Identity", [source], [output], name)
    elif activation in ("Relu", "Sigmoid", "Tanh"):
        rewriter.emit(activation, [source], [output], name)
    elif activation == "LeakyRelu":
        rewriter.emit("LeakyRelu", [source], [output], name, alpha=params[0] if params else 0.01)
    elif activation == "HardSigmoid":
        alpha, beta = (params + [0.2, 0.5][len(params):])[:2]
        rewriter.emit("HardSigmoid", [source], [output], name, alpha=alpha, beta=beta)
    elif activation == "Clip":
        low, high = (params + [-np.inf, np.inf][len(params):])[:2]
        bounds = [rewriter.add_constant(f"{output}/clip_{bound}", np.float32(value))
                  for bound, value in (("min", low), ("max", high))]
        rewriter.emit("Clip", [source, *bounds], [output], name)
    else:
        raise OnnxmarkError(f"Node '{node.name}' ({node.op_type}) fuses the activation '{activation}', "
                            "which is not supported")
    rewriter.count("fused")


_HANDLERS = {
    ("", "QuantizeLinear"): _rewrite_quantize,
    ("", "DequantizeLinear"): _rewrite_dequantize,
    ("", "DynamicQuantizeLinear"): _rewrite_dynamic_quantize,
    ("", "MatMulInteger"): _rewrite_integer_layer,
    ("", "ConvInteger"): _rewrite_integer_layer,
    ("", "QLinearConv"): _rewrite_qlinear_conv,
    ("", "QLinearMatMul"): _rewrite_qlinear_matmul,
    (MICROSOFT_DOMAIN, "QuantizeLinear"): _rewrite_quantize,
    (MICROSOFT_DOMAIN, "DequantizeLinear"): _rewrite_dequantize,
    (MICROSOFT_DOMAIN, "QGemm"): _rewrite_qgemm,
    (MICROSOFT_DOMAIN, "QLinearAdd"): _rewrite_qlinear_binary,
    (MICROSOFT_DOMAIN, "QLinearMul"): _rewrite_qlinear_binary,
    (MICROSOFT_DOMAIN, "QLinearGlobalAveragePool"): _rewrite_qlinear_unary,
    (MICROSOFT_DOMAIN, "QLinearAveragePool"): _rewrite_qlinear_unary,
    (MICROSOFT_DOMAIN, "QLinearLeakyRelu"): _rewrite_qlinear_unary,
    (MICROSOFT_DOMAIN, "QLinearSigmoid"): _rewrite_qlinear_unary,
    (MICROSOFT_DOMAIN, "QLinearConcat"): _rewrite_qlinear_concat,
    (MICROSOFT_DOMAIN, "FusedConv"): _rewrite_fused_conv,
    (MICROSOFT_DOMAIN, "FusedGemm"): _rewrite_fused_gemm,
    (MICROSOFT_DOMAIN, "FusedMatMul"): _rewrite_fused_matmul,
}
