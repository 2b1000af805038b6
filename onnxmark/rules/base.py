"""The transposed counterpart of one forward node, runnable in torch and exportable to ONNX."""
from __future__ import annotations

from dataclasses import dataclass, field

from onnxmark.graph import ModelGraph, Node


class Unsupported(Exception):
    """A node that a registered rule still cannot transpose, with the reason."""


@dataclass
class Step:
    """One layer of the transposed model.

    `input_shape` is the shape of the forward node's activation input, which this step produces.
    `output_shape` is the shape of the forward node's output, which this step consumes. Both exclude the batch.
    `weights` are the names of the constant tensors the step reads, shared with the forward model.
    `frozen` are forward tensors the step reads as fixed values recorded from real data (the key stores them).
    `target` is the forward tensor whose transposed value the step consumes; `sources` are the forward
    tensors it produces values for, in the order `run_torch` returns them (one tensor, or a tuple for
    several). The planner fills both in for steps with one activation input.
    """

    node: Node
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weights: tuple[str, ...] = ()
    is_layer: bool = False          # a conv or linear layer: dropout follows it during hardening
    attrs: dict = field(default_factory=dict)
    frozen: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    target: str = ""

    def run_torch(self, y, weights: dict):
        """Map a batch shaped like the forward output back to one shaped like the forward input.

        `weights` maps names to the model's constant tensors and to the frozen tensors.
        """
        raise NotImplementedError

    def emit_onnx(self, builder, y: str) -> str:
        """Add the same computation to an ONNX graph; return the produced tensor's name (a list for several)."""
        raise NotImplementedError

    def signature(self, graph: ModelGraph) -> dict:
        """Structure of this step that a suspect must share: op type, shapes and weight shapes."""
        entry = {
            "op": self.node.op_type,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "weight_shapes": [list(graph.constant_value(name).shape) for name in self.weights],
        }
        if self.frozen:
            entry["frozen_shapes"] = [list(graph.shapes[name]) for name in self.frozen]
        return entry


def activation_input(node: Node, graph: ModelGraph) -> str:
    """Return the single activation input of a node, or raise Unsupported when there is not exactly one."""
    data_inputs = [name for name in node.inputs if name and graph.is_data(name)]
    if len(data_inputs) != 1:
        raise Unsupported(f"it has {len(data_inputs)} activation inputs; only nodes with one are supported")
    return data_inputs[0]


def channel_view_shape(length: int, rank: int) -> list[int]:
    """Shape that broadcasts a per-channel vector over a batch of rank `rank` in NC... layout."""
    return [1, length] + [1] * (rank - 2)
