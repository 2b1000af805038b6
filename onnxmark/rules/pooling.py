"""Pooling: the transposed model upsamples (nearest neighbour) back to the pooled input's size."""
from __future__ import annotations

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, activation_input
from onnxmark.rules.registry import register


class UpsampleStep(Step):
    def run_torch(self, y, weights):
        import torch.nn.functional as F

        # torch's "nearest" reads source index floor(i * in / out), like ONNX Resize asymmetric/floor.
        return F.interpolate(y, size=tuple(self.input_shape[1:]), mode="nearest")

    def emit_onnx(self, builder, y):
        spatial = list(self.input_shape[1:])
        sizes = builder.constant(spatial, "int64", "sizes")
        axes = list(range(2, 2 + len(spatial)))
        return builder.add("Resize", [y, "", "", sizes], mode="nearest", axes=axes,
                           coordinate_transformation_mode="asymmetric", nearest_mode="floor")


@register("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
def plan_pool(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    return UpsampleStep(node, graph.shapes[source], graph.shapes[node.outputs[0]])
