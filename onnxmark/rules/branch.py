"""Nodes with several activation inputs: residual Add/Sub/Mul/Div, MatMul of two activations, and Concat.

An element-wise node or MatMul of two activations follows one operand back and reads the other as a
frozen tensor (its mean over real inputs, stored in the key): `c = a + b` becomes `a = c - mean(b)`.
The followed operand is the one the plan can transpose back to the input. Where both can be, a
convolutional block whose shortcut is the identity follows the shortcut, which carries the key past the
block unchanged. Following every residual branch instead shrank the key's part of ResNet-34's image from
0.46 to 1.5e-7. Elsewhere the followed operand is the branch with more conv/linear layers since the two
branches parted. That is the residual branch of a downsampling block, because its strided 1x1 shortcut
would leave gaps in the image, and of a transformer block, because attention alone mixes the tokens.

Concat is split back into its parts, and each part goes back along its own branch. Where the branches
meet again, the transposed model adds their contributions.
"""
from __future__ import annotations

import networkx as nx

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, Unsupported
from onnxmark.rules.registry import register

LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# A frozen divisor is kept at least this far from zero.
MIN_DIVISOR = 1e-6


def choose_branch(node: Node, graph: ModelGraph) -> tuple[str, str]:
    """Return (followed, frozen) for a node with exactly two activation inputs."""
    first, second = [name for name in node.inputs if name and graph.is_data(name)]
    if first == second:
        raise Unsupported("both operands are the same activation")
    if graph.transposable is not None and (first in graph.transposable) != (second in graph.transposable):
        return (first, second) if first in graph.transposable else (second, first)

    first_nodes, second_nodes = _upstream_nodes(first, graph), _upstream_nodes(second, graph)
    first_layers = _layer_count(first_nodes - second_nodes, graph)
    second_layers = _layer_count(second_nodes - first_nodes, graph)
    if first_layers != second_layers:
        if first_layers == 0 and _has_conv(second_nodes - first_nodes, graph):
            return first, second
        if second_layers == 0 and _has_conv(first_nodes - second_nodes, graph):
            return second, first
        return (first, second) if first_layers > second_layers else (second, first)

    # No layers decide it: follow the operand the other one is computed from (x in x - mean(x)).
    second_producer = graph.producer(second)
    if second_producer is not None and second_producer.name in first_nodes:
        return second, first
    return first, second


def _upstream_nodes(tensor: str, graph: ModelGraph) -> set[str]:
    producer = graph.producer(tensor)
    if producer is None:
        return set()
    return nx.ancestors(graph.graph, producer.name) | {producer.name}


def _layer_count(node_names: set[str], graph: ModelGraph) -> int:
    return sum(1 for name in node_names if graph.graph.nodes[name].get("op_type") in LAYER_OPS)


def _has_conv(node_names: set[str], graph: ModelGraph) -> bool:
    return any(graph.graph.nodes[name].get("op_type") == "Conv" for name in node_names)


class FrozenOperandStep(Step):
    """Inverse of `y = a op b` for the followed operand `a`, with `b` frozen.

    attrs["form"] names the inverse: "y-b", "y+b", "b-y", "y/b", "y*b", "y@bT" (a @ b) or "bT@y" (b @ a).
    """

    def run_torch(self, y, weights):
        import torch

        frozen = weights[self.frozen[0]]
        form = self.attrs["form"]
        if form == "y-b":
            return y - frozen
        if form == "y+b":
            return y + frozen
        if form == "b-y":
            return frozen - y
        if form == "y*b":
            return y * frozen
        if form == "y/b":
            return y / torch.where(frozen.abs() < MIN_DIVISOR, torch.full_like(frozen, MIN_DIVISOR), frozen)
        if form == "y@bT":
            return y @ frozen.transpose(-1, -2)
        return frozen.transpose(-1, -2) @ y

    def emit_onnx(self, builder, y):
        frozen = builder.frozen(self.frozen[0])
        form = self.attrs["form"]
        if form in ("y@bT", "bT@y"):
            rank = len(self.attrs["frozen_shape"]) + 1   # with the leading batch axis of 1
            frozen = builder.add("Transpose", [frozen], perm=[*range(rank - 2), rank - 1, rank - 2])
            return builder.add("MatMul", [y, frozen] if form == "y@bT" else [frozen, y])
        if form == "y/b":
            minimum = builder.constant(MIN_DIVISOR, "float32", "min_divisor")
            too_small = builder.add("Less", [builder.add("Abs", [frozen]), minimum])
            frozen = builder.add("Where", [too_small, minimum, frozen])
        op, frozen_first = {"y-b": ("Sub", False), "y+b": ("Add", False), "b-y": ("Sub", True),
                            "y*b": ("Mul", False), "y/b": ("Div", False)}[form]
        return builder.add(op, [frozen, y] if frozen_first else [y, frozen])


# (op type, followed operand is the first) -> inverse form
FORMS = {
    ("Add", True): "y-b", ("Add", False): "y-b",
    ("Sub", True): "y+b", ("Sub", False): "b-y",
    ("Mul", True): "y/b", ("Mul", False): "y/b",
    ("Div", True): "y*b",
    ("MatMul", True): "y@bT", ("MatMul", False): "bT@y",
}


def plan_frozen_operand(node: Node, graph: ModelGraph) -> Step:
    """Plan a node with two activation inputs by freezing one of them."""
    followed, frozen = choose_branch(node, graph)
    first = node.inputs[0] == followed
    form = FORMS.get((node.op_type, first))
    if form is None:
        raise Unsupported("dividing by an activation has no inverse")
    if node.op_type != "MatMul" and graph.shapes[followed] != graph.shapes[node.outputs[0]]:
        raise Unsupported(f"the operand it follows ('{followed}', shape {list(graph.shapes[followed])}) is "
                          f"broadcast to the output shape {list(graph.shapes[node.outputs[0]])}")
    return FrozenOperandStep(node, graph.shapes[followed], graph.shapes[node.outputs[0]], frozen=(frozen,),
                             sources=(followed,), attrs={"form": form, "frozen_shape": graph.shapes[frozen]})


class SplitStep(Step):
    """Inverse of Concat: a split along the same axis that drops the parts that were constants."""

    def run_torch(self, y, weights):
        import torch

        parts = torch.split(y, self.attrs["sizes"], dim=self.attrs["axis"])
        return tuple(parts[i] for i in self.attrs["data_parts"])

    def emit_onnx(self, builder, y):
        sizes = builder.constant(self.attrs["sizes"], "int64", "split")
        parts = builder.add_multi("Split", [y, sizes], len(self.attrs["sizes"]), axis=self.attrs["axis"])
        return [parts[i] for i in self.attrs["data_parts"]]

    def signature(self, graph):
        entry = super().signature(graph)
        entry["part_shapes"] = [list(graph.shapes[name]) for name in self.sources]
        return entry


@register("Concat")
def plan_concat(node: Node, graph: ModelGraph) -> Step:
    output_shape = graph.shapes[node.outputs[0]]
    rank = len(output_shape) + 1
    axis = node.attrs.get("axis", 1)
    axis = axis + rank if axis < 0 else axis
    if axis == 0:
        raise Unsupported("it concatenates along the batch axis")

    parts = [name for name in node.inputs if name]
    sizes, data_parts = [], []
    for index, name in enumerate(parts):
        if graph.is_data(name):
            shape = graph.shapes[name]
            data_parts.append(index)
        else:
            shape = graph.constant_value(name).shape[1:]
        sizes.append(int(shape[axis - 1]) if len(shape) >= axis else 0)
    sources = tuple(parts[i] for i in data_parts)
    if len(set(sources)) != len(sources):
        raise Unsupported("it concatenates the same activation more than once")
    return SplitStep(node, output_shape, output_shape, sources=sources,
                     attrs={"axis": axis, "sizes": sizes, "data_parts": data_parts})
