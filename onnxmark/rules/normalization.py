"""Normalizations, inverted as if the statistics they divide by were mean 0 and variance 1.

BatchNormalization (inference) y = scale * (x - mean) / sqrt(var + epsilon) + bias.
Inverse                         x = (y - bias) * sqrt(1 + epsilon) / scale, with the same scale and bias tensors.
The running statistics take no part, so the transposed model stays valid while they change.
LayerNormalization gets the same inverse. MeanVarianceNormalization has no weights and gets the identity.
"""
from __future__ import annotations

import math

import numpy as np

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


class LayerNormStep(Step):
    """x = (y - bias) * sqrt(1 + epsilon) / scale, where scale and bias broadcast over the normalized axes."""

    def run_torch(self, y, weights):
        if len(self.weights) == 2:
            y = y - weights[self.weights[1]]
        return y * self.attrs["gain"] / weights[self.weights[0]]

    def emit_onnx(self, builder, y):
        if len(self.weights) == 2:
            y = builder.add("Sub", [y, builder.weight(self.weights[1])])
        gained = builder.add("Mul", [y, builder.constant(self.attrs["gain"], "float32", "gain")])
        return builder.add("Div", [gained, builder.weight(self.weights[0])])


class MeanVarianceStep(Step):
    """Identity: with unit statistics, (x - mean) / std is x itself.

    A fixed rescale would need the mean and variance, which MeanVarianceNormalization computes from each
    batch at run time and the model does not store. The identity is the inverse under the mean-0,
    variance-1 assumption that the BatchNormalization rule makes too.
    """

    def run_torch(self, y, weights):
        return y

    def emit_onnx(self, builder, y):
        return y


@register("BatchNormalization")
def plan_batch_norm(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its activation is not the first input")
    epsilon = float(node.attrs.get("epsilon", DEFAULT_EPSILON))
    return BatchNormStep(node, graph.shapes[source], graph.shapes[node.outputs[0]], tuple(node.inputs[1:3]),
                         attrs={"gain": math.sqrt(1.0 + epsilon)})


@register("LayerNormalization")
def plan_layer_norm(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its activation is not the first input")
    input_shape = graph.shapes[source]
    weights = tuple(name for name in node.inputs[1:3] if name)

    batch_shape = (graph.recorded_batch, *input_shape)
    for name in weights:
        shape = graph.constant_value(name).shape
        try:
            broadcast = np.broadcast_shapes(shape, batch_shape)
        except ValueError:
            broadcast = None
        if broadcast != batch_shape:
            raise Unsupported(f"its weight '{name}' of shape {list(shape)} does not broadcast to the input "
                              f"shape {list(batch_shape)}")

    epsilon = float(node.attrs.get("epsilon", DEFAULT_EPSILON))
    return LayerNormStep(node, input_shape, graph.shapes[node.outputs[0]], weights,
                         attrs={"gain": math.sqrt(1.0 + epsilon)})


@register("MeanVarianceNormalization")
def plan_mean_variance(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    return MeanVarianceStep(node, graph.shapes[source], graph.shapes[node.outputs[0]])
