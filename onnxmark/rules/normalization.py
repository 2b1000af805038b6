"""BatchNormalization: inverted as if its statistics were mean 0 and variance 1.

Forward (inference) y = scale * (x - mean) / sqrt(var + epsilon) + bias.
Inverse              x = (y - bias) * sqrt(1 + epsilon) / scale, with the same scale and bias tensors.
The running statistics take no part, so the transposed model stays valid while they change.
"""
from __future__ import annotations

import math

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, Unsupported, activation_input, channel_view_shape
from onnxmark.rules.registry import register

DEFAULT_EPSILON = 1e-5


class BatchNormStep(Step):
    def run_torch(self, y, weights):
        scale, bias = weights[self.weights[0]], weights[self.weights[1]]
        view = channel_view_shape(scale.shape[0], y.dim())
        return (y - bias.reshape(view)) * self.attrs["gain"] / scale.reshape(view)

    def emit_onnx(self, builder, y):
        view = builder.constant(channel_view_shape(-1, len(self.output_shape) + 1)[1:], "int64", "shape")
        scale = builder.add("Reshape", [builder.weight(self.weights[0]), view])
        bias = builder.add("Reshape", [builder.weight(self.weights[1]), view])
        centred = builder.add("Sub", [y, bias])
        gained = builder.add("Mul", [centred, builder.constant(self.attrs["gain"], "float32", "gain")])
        return builder.add("Div", [gained, scale])


@register("BatchNormalization")
def plan_batch_norm(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its activation is not the first input")
    epsilon = float(node.attrs.get("epsilon", DEFAULT_EPSILON))
    return BatchNormStep(node, graph.shapes[source], graph.shapes[node.outputs[0]], tuple(node.inputs[1:3]),
                         attrs={"gain": math.sqrt(1.0 + epsilon)})
