"""Element-wise activations and Clip: the transposed model applies the same function.

Each activation runs with the forward node's attributes, the ONNX defaults filled in where the node omits
them. The same torch functions serve the forward executor, so both directions compute one definition.
"""
from __future__ import annotations

import functools
import math

from onnx import TensorProto

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, Unsupported, activation_input
from onnxmark.rules.registry import register

FLOAT_TENSOR_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}

# Attribute defaults of the element-wise activations, as in the ONNX operator specification (opsets 6-22).
ATTRIBUTE_DEFAULTS: dict[str, dict] = {
    "Relu": {},
    "LeakyRelu": {"alpha": 0.01},
    "Sigmoid": {},
    "Tanh": {},
    "Elu": {"alpha": 1.0},
    "Selu": {"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875},
    "Celu": {"alpha": 1.0},
    "HardSigmoid": {"alpha": 0.2, "beta": 0.5},
    "HardSwish": {},
    "ThresholdedRelu": {"alpha": 1.0},
    "Gelu": {"approximate": "none"},
    "Erf": {},
    "Softplus": {},
    "Softsign": {},
    "Mish": {},
}

# Gelu entered the default domain at opset 20, after the transposed graph's opset, so it is emitted as
# the formula of its `approximate` form.
GELU_TANH_COEFFICIENT = 0.044715


def activation_attributes(node: Node) -> dict:
    """Return the node's activation attributes with the ONNX defaults filled in."""
    defaults = ATTRIBUTE_DEFAULTS[node.op_type]
    return {name: node.attrs.get(name, default) for name, default in defaults.items()}


def apply_activation(op_type: str, x, attrs: dict):
    """Apply the ONNX activation `op_type` with the given attributes to a torch tensor."""
    return _torch_functions()[op_type](x, **attrs)


@functools.cache
def _torch_functions() -> dict:
    # Built on first use so that importing the rules (as extraction does) does not import torch.
    import torch
    import torch.nn.functional as F

    def hard_sigmoid(x, alpha, beta):
        return torch.clamp(alpha * x + beta, 0.0, 1.0)

    def thresholded_relu(x, alpha):
        return torch.where(x > alpha, x, torch.zeros_like(x))

    return {
        "Relu": F.relu,
        "LeakyRelu": lambda x, alpha: F.leaky_relu(x, alpha),
        "Sigmoid": torch.sigmoid,
        "Tanh": torch.tanh,
        "Elu": lambda x, alpha: F.elu(x, alpha),
        "Selu": lambda x, alpha, gamma: gamma * F.elu(x, alpha),
        "Celu": lambda x, alpha: F.celu(x, alpha),
        "HardSigmoid": hard_sigmoid,
        "HardSwish": F.hardswish,
        "ThresholdedRelu": thresholded_relu,
        "Gelu": lambda x, approximate: F.gelu(x, approximate=approximate),
        "Erf": torch.erf,
        "Softplus": F.softplus,
        "Softsign": F.softsign,
        "Mish": F.mish,
    }


class ActivationStep(Step):
    def run_torch(self, y, weights):
        return apply_activation(self.node.op_type, y, self.attrs)

    def emit_onnx(self, builder, y):
        if self.node.op_type == "Gelu":
            return _emit_gelu(builder, y, self.attrs["approximate"])
        return builder.add(self.node.op_type, [y], **self.attrs)


def _emit_gelu(builder, y: str, approximate: str) -> str:
    """Add Gelu as its formula: 0.5 * y * (1 + erf(y / sqrt(2))), or the tanh approximation."""
    if approximate == "tanh":
        cube = builder.add("Mul", [builder.add("Mul", [y, y]), y])
        cubic = builder.add("Mul", [cube, builder.constant(GELU_TANH_COEFFICIENT, "float32", "gelu_cubic")])
        inner = builder.add("Mul", [builder.add("Add", [y, cubic]),
                                    builder.constant(math.sqrt(2.0 / math.pi), "float32", "gelu_tanh_scale")])
        curve = builder.add("Tanh", [inner])
    else:
        curve = builder.add("Erf", [builder.add("Div", [y, builder.constant(math.sqrt(2.0), "float32", "sqrt2")])])
    one_plus = builder.add("Add", [curve, builder.constant(1.0, "float32", "one")])
    return builder.add("Mul", [builder.add("Mul", [y, one_plus]), builder.constant(0.5, "float32", "half")])


class PReluStep(Step):
    """PRelu with the forward node's slope tensor: y where y >= 0, slope * y elsewhere."""

    def run_torch(self, y, weights):
        import torch

        return torch.where(y < 0, y * weights[self.weights[0]], y)

    def emit_onnx(self, builder, y):
        return builder.add("PRelu", [y, builder.weight(self.weights[0])])


class ClipStep(Step):
    """Clip with the forward node's bounds, read once at planning. A missing bound is None."""

    def run_torch(self, y, weights):
        import torch

        return torch.clamp(y, self.attrs["min"], self.attrs["max"])

    def emit_onnx(self, builder, y):
        bounds = [builder.constant(self.attrs[name], "float32", f"clip_{name}") if self.attrs[name] is not None
                  else "" for name in ("min", "max")]
        return builder.add("Clip", [y, *bounds])


class IdentityStep(Step):
    def run_torch(self, y, weights):
        return y

    def emit_onnx(self, builder, y):
        return y


@register(*ATTRIBUTE_DEFAULTS)
def plan_activation(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    attrs = activation_attributes(node)
    shapes = (graph.shapes[source], graph.shapes[node.outputs[0]])

    if node.op_type == "Gelu" and attrs["approximate"] not in ("none", "tanh"):
        raise Unsupported(f"its approximate attribute '{attrs['approximate']}' is not 'none' or 'tanh'")
    if node.op_type == "Celu" and attrs["alpha"] == 0:
        # Celu divides by alpha, so alpha 0 defines no function and the transposed step passes y through.
        return IdentityStep(node, *shapes)
    return ActivationStep(node, *shapes, attrs=attrs)


@register("PRelu")
def plan_prelu(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its activation is the slope input")
    return PReluStep(node, graph.shapes[source], graph.shapes[node.outputs[0]], (node.inputs[1],))


@register("Clip")
def plan_clip(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its activation is not the first input")
    low, high = clip_bounds(node, graph)
    return ClipStep(node, graph.shapes[source], graph.shapes[node.outputs[0]], attrs={"min": low, "max": high})


# Clip before opset 11 stores missing bounds as the float32 limits.
FLOAT32_MAX = 3.4028234663852886e38


def clip_bounds(node: Node, graph: ModelGraph) -> tuple[float | None, float | None]:
    """Return Clip's (min, max): attributes before opset 11, optional scalar inputs from opset 11 on."""
    if "min" in node.attrs or "max" in node.attrs or len(node.inputs) == 1:
        low, high = node.attrs.get("min"), node.attrs.get("max")
    else:
        low, high = (_scalar_input(node, graph, index) for index in (1, 2))

    low = None if low is not None and low <= -FLOAT32_MAX else low
    high = None if high is not None and high >= FLOAT32_MAX else high
    return low, high


def _scalar_input(node: Node, graph: ModelGraph, index: int) -> float | None:
    if len(node.inputs) <= index or not node.inputs[index]:
        return None
    value = graph.constant_value(node.inputs[index])
    if value.size != 1:
        raise Unsupported(f"its bound '{node.inputs[index]}' has shape {list(value.shape)}, not a scalar")
    return float(value.reshape(()))


@register("Cast")
def plan_cast(node: Node, graph: ModelGraph) -> Step:
    # A cast between float types changes only the precision, so the transposed step passes y through.
    if node.attrs.get("to") not in FLOAT_TENSOR_TYPES:
        raise Unsupported(f"it casts an activation to the non-float type {node.attrs.get('to')}")
    source = activation_input(node, graph)
    return IdentityStep(node, graph.shapes[source], graph.shapes[node.outputs[0]])


@register("Dropout", "Identity")
def plan_identity(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    return IdentityStep(node, graph.shapes[source], graph.shapes[node.outputs[0]])
