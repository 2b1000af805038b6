"""Layout operators: the transposed model reshapes or permutes back to the forward input's layout."""
from __future__ import annotations

import numpy as np

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, Unsupported, activation_input
from onnxmark.rules.padding import torch_pad_list
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


class ZeroFillStep(Step):
    """Inverse of Gather and Slice: put the selected values back in place and zeros everywhere else.

    attrs["restore_axis"] is the axis a scalar Gather removed (None when no axis was removed).
    attrs["begins"] and attrs["ends"] count the zeros before and after on every axis, the batch axis first.
    """

    def run_torch(self, y, weights):
        import torch.nn.functional as F

        if self.attrs["restore_axis"] is not None:
            y = y.unsqueeze(self.attrs["restore_axis"])
        return F.pad(y, torch_pad_list(self.attrs["begins"][1:], self.attrs["ends"][1:]))

    def emit_onnx(self, builder, y):
        if self.attrs["restore_axis"] is not None:
            axes = builder.constant([self.attrs["restore_axis"]], "int64", "axes")
            y = builder.add("Unsqueeze", [y, axes])
        pads = builder.constant(self.attrs["begins"] + self.attrs["ends"], "int64", "pads")
        return builder.add("Pad", [y, pads], mode="constant")


def _zero_fill(node: Node, graph: ModelGraph, source: str, restore_axis: int | None,
               margins: list[tuple[int, int, int]]) -> ZeroFillStep:
    """Build the step from (axis, zeros before, zeros after) per padded axis, axes counted with the batch."""
    rank = len(graph.shapes[source]) + 1
    begins, ends = [0] * rank, [0] * rank
    for axis, before, after in margins:
        begins[axis], ends[axis] = before, after
    return ZeroFillStep(node, graph.shapes[source], graph.shapes[node.outputs[0]],
                        attrs={"restore_axis": restore_axis, "begins": begins, "ends": ends})


@register("Gather")
def plan_gather(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its activation is the index input")
    input_shape = graph.shapes[source]
    rank = len(input_shape) + 1
    axis = node.attrs.get("axis", 0)
    axis = axis + rank if axis < 0 else axis
    if axis == 0:
        raise Unsupported("it gathers along the batch axis")

    size = input_shape[axis - 1]
    indices = np.asarray(graph.constant_value(node.inputs[1])).astype(np.int64)
    indices = np.where(indices < 0, indices + size, indices)
    if indices.ndim == 0:
        first, count, restore_axis = int(indices), 1, axis
    elif indices.ndim == 1 and len(indices) and np.array_equal(indices, np.arange(indices[0], indices[0] + len(indices))):
        first, count, restore_axis = int(indices[0]), len(indices), None
    else:
        raise Unsupported("only a scalar index or a run of consecutive indices can be put back")
    return _zero_fill(node, graph, source, restore_axis, [(axis, first, size - first - count)])


@register("Slice")
def plan_slice(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    input_shape = graph.shapes[source]
    rank = len(input_shape) + 1
    if "starts" in node.attrs:   # before opset 10 the bounds are attributes
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = _int_input(node, graph, 1), _int_input(node, graph, 2)
        axes = _int_input(node, graph, 3) or list(range(len(starts)))
        steps = _int_input(node, graph, 4) or [1] * len(starts)
    if any(step != 1 for step in steps):
        raise Unsupported(f"its steps {steps} skip elements; only step 1 can be put back")

    margins = []
    for start, end, axis in zip(starts, ends, axes):
        axis = axis + rank if axis < 0 else axis
        if axis == 0:
            raise Unsupported("it slices the batch axis")
        size = input_shape[axis - 1]
        start = min(max(start + size if start < 0 else start, 0), size)
        end = min(max(end + size if end < 0 else end, 0), size)
        margins.append((axis, start, size - max(end, start)))
    return _zero_fill(node, graph, source, None, margins)


def _int_input(node: Node, graph: ModelGraph, index: int) -> list[int] | None:
    if len(node.inputs) <= index or not node.inputs[index]:
        return None
    return [int(v) for v in np.asarray(graph.constant_value(node.inputs[index])).reshape(-1)]
