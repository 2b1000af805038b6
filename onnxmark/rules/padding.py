"""Pad: the transposed model crops the padded border away.

A negative pad crops in the forward model, so the transposed step zero-pads that border back. For
constant zero padding, the step is then the adjoint of the forward Pad. The padding mode (constant,
reflect, edge, wrap) changes only what the border contains, never the crop.
"""
from __future__ import annotations

from collections.abc import Sequence

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, Unsupported, activation_input
from onnxmark.rules.registry import register


def pad_widths(pads: Sequence[int], rank: int, axes: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Return the begin and end pad of every axis of a rank-`rank` tensor.

    `pads` is ONNX's [x1_begin, x2_begin, ..., x1_end, x2_end, ...] over `axes`, or over all axes when
    `axes` is None. Raise ValueError when the lengths do not match.
    """
    pads = [int(p) for p in pads]
    if axes is None:
        axes = list(range(rank))
    axes = [int(a) % rank for a in axes]
    if len(pads) != 2 * len(axes):
        raise ValueError(f"invalid pads {pads}: expected two values per axis of {axes}")

    begins, ends = [0] * rank, [0] * rank
    for index, axis in enumerate(axes):
        begins[axis] = pads[index]
        ends[axis] = pads[len(axes) + index]
    return begins, ends


def node_pad_widths(node: Node, graph: ModelGraph, rank: int) -> tuple[list[int], list[int]]:
    """Return the Pad node's per-axis pads: attribute `pads` (`paddings` in opset 1) before opset 11, inputs after."""
    for name in ("pads", "paddings"):
        if name in node.attrs:
            return pad_widths(node.attrs[name], rank)

    pads = graph.constant_value(node.inputs[1]).reshape(-1).tolist()
    axes = None
    if len(node.inputs) > 3 and node.inputs[3]:
        axes = graph.constant_value(node.inputs[3]).reshape(-1).tolist()
    return pad_widths(pads, rank, axes)


def torch_pad_list(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """Return F.pad's argument (last axis first) for per-axis begin and end pads."""
    pad = []
    for begin, end in zip(reversed(begins), reversed(ends)):
        pad += [begin, end]
    return pad


class CropStep(Step):
    """Cut the forward pads off each non-batch axis, and zero-pad back where the forward pad was negative."""

    def run_torch(self, y, weights):
        import torch.nn.functional as F

        index = [slice(None)]
        for begin, end, size in zip(self.attrs["begins"], self.attrs["ends"], self.output_shape):
            index.append(slice(max(begin, 0), size - max(end, 0)))
        cropped = y[tuple(index)]

        if not self._refills():
            return cropped
        refill_begins = [0] + [max(-begin, 0) for begin in self.attrs["begins"]]
        refill_ends = [0] + [max(-end, 0) for end in self.attrs["ends"]]
        return F.pad(cropped, torch_pad_list(refill_begins, refill_ends))

    def emit_onnx(self, builder, y):
        begins, ends = self.attrs["begins"], self.attrs["ends"]
        if any(b > 0 for b in begins) or any(e > 0 for e in ends):
            starts = [max(b, 0) for b in begins]
            stops = [size - max(e, 0) for e, size in zip(ends, self.output_shape)]
            axes = list(range(1, len(begins) + 1))
            slice_inputs = [builder.constant(starts, "int64", "starts"), builder.constant(stops, "int64", "ends"),
                            builder.constant(axes, "int64", "axes")]
            y = builder.add("Slice", [y, *slice_inputs])
        if self._refills():
            refill = [0] + [max(-b, 0) for b in begins] + [0] + [max(-e, 0) for e in ends]
            y = builder.add("Pad", [y, builder.constant(refill, "int64", "pads")], mode="constant")
        return y

    def _refills(self) -> bool:
        return any(b < 0 for b in self.attrs["begins"]) or any(e < 0 for e in self.attrs["ends"])


@register("Pad")
def plan_pad(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its activation is not the first input")
    input_shape, output_shape = graph.shapes[source], graph.shapes[node.outputs[0]]

    try:
        begins, ends = node_pad_widths(node, graph, len(input_shape) + 1)
    except ValueError as error:
        raise Unsupported(str(error)) from error
    if begins[0] or ends[0]:
        raise Unsupported(f"it pads the batch axis by {begins[0]}, {ends[0]}")

    begins, ends = begins[1:], ends[1:]
    expected = tuple(size + b + e for size, b, e in zip(input_shape, begins, ends))
    if expected != tuple(output_shape):
        raise Unsupported(f"its pads {begins}, {ends} turn shape {list(input_shape)} into {list(expected)}, "
                          f"but onnxruntime recorded {list(output_shape)}")
    return CropStep(node, input_shape, output_shape, attrs={"begins": begins, "ends": ends})
