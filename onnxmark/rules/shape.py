"""Layout operators: the transposed model reshapes or permutes back to the forward input's layout."""
from __future__ import annotations

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, Unsupported, activation_input
from onnxmark.rules.registry import register


class ReshapeBackStep(Step):
    """Inverse of Flatten, Reshape, Squeeze and Unsqueeze: reshape to the forward input's shape."""

    def run_torch(self, y, weights):
        return y.reshape(y.shape[0], *self.input_shape)

    def emit_onnx(self, builder, y):
        shape = builder.constant([-1, *self.input_shape], "int64", "shape")
        return builder.add("Reshape", [y, shape])


class PermuteBackStep(Step):
    """Inverse of Transpose: the inverse permutation."""

    def run_torch(self, y, weights):
        return y.permute(*self.attrs["inverse"])

    def emit_onnx(self, builder, y):
        return builder.add("Transpose", [y], perm=self.attrs["inverse"])


@register("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def plan_reshape(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its activation is not the first input")
    return ReshapeBackStep(node, graph.shapes[source], graph.shapes[node.outputs[0]])


@register("Transpose")
def plan_transpose(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    rank = len(graph.shapes[source]) + 1
    perm = list(node.attrs.get("perm", reversed(range(rank))))
    if perm[0] != 0:
        raise Unsupported(f"its permutation {perm} moves the batch axis")
    inverse = [perm.index(axis) for axis in range(rank)]
    return PermuteBackStep(node, graph.shapes[source], graph.shapes[node.outputs[0]], attrs={"inverse": inverse})
