"""The transposition plan: the transposed layers of a model, from its logits back to its input."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import networkx as nx

from onnxmark.errors import OnnxmarkError
from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, Unsupported
from onnxmark.rules.registry import rule_for, supported_op_types

log = logging.getLogger(__name__)


@dataclass
class PlanIssue:
    """A node on the activation path that the plan cannot transpose."""

    node: Node
    opset: int
    reason: str

    def message(self) -> str:
        return f"{self.node.describe(self.opset)}: {self.reason}"


@dataclass
class Plan:
    """Transposed steps in execution order: the first step consumes the logits."""

    steps: list[Step]
    issues: list[PlanIssue] = field(default_factory=list)

    @property
    def layer_indices(self) -> list[int]:
        return [i for i, step in enumerate(self.steps) if step.is_layer]

    def weight_names(self) -> list[str]:
        names: list[str] = []
        for step in self.steps:
            names.extend(name for name in step.weights if name not in names)
        return names

    def signature(self, graph: ModelGraph) -> list[dict]:
        return [step.signature(graph) for step in self.steps]

    def as_networkx(self) -> nx.DiGraph:
        """Return the plan as a chain graph with one node per step and edges in execution order."""
        chain = nx.DiGraph()
        for i, step in enumerate(self.steps):
            chain.add_node(i, op_type=step.node.op_type, forward_node=step.node.name, is_layer=step.is_layer)
            if i:
                chain.add_edge(i - 1, i)
        return chain


def build_plan(graph: ModelGraph, strict: bool = True) -> Plan:
    """Walk from the logits back to the input and plan a transposed step for every node on the way.

    With `strict`, any node without a usable rule raises one OnnxmarkError that lists all of them.
    """
    steps: list[Step] = []
    issues: list[PlanIssue] = []
    tensor = graph.logits_name
    visited = set()

    while tensor != graph.input_name:
        node = graph.producer(tensor)
        if node is None or tensor in visited:
            raise OnnxmarkError(f"{graph.path}: tensor '{tensor}' is not connected to the input "
                                f"'{graph.input_name}'")
        visited.add(tensor)

        step, reason = _plan_node(node, graph)
        if step is not None:
            steps.append(step)
        else:
            issues.append(PlanIssue(node, graph.opset, reason))

        tensor = _next_activation(node, graph)

    plan = Plan(steps, issues)
    if strict and issues:
        raise OnnxmarkError(unsupported_message(graph, issues))
    return plan


def require_layers(plan: Plan, graph: ModelGraph) -> None:
    """Raise OnnxmarkError when the plan has no layer with weights that a watermark could live in."""
    if not plan.layer_indices:
        raise OnnxmarkError(f"{graph.path}: no Conv, Gemm or MatMul layer with weights lies between the input "
                            "and the logits, so there is nothing to watermark")


def unsupported_message(graph: ModelGraph, issues: list[PlanIssue]) -> str:
    lines = [f"{graph.path}: {len(issues)} node(s) cannot be transposed:"]
    lines += [f"  {issue.message()}" for issue in issues]
    lines.append(f"Supported op types: {', '.join(supported_op_types())}")
    return "\n".join(lines)


def _plan_node(node: Node, graph: ModelGraph) -> tuple[Step | None, str]:
    rule = rule_for(node.op_type, node.domain)
    if rule is None:
        return None, "no transposition rule for this op type"
    try:
        return rule(node, graph), ""
    except Unsupported as reason:
        return None, str(reason)


def _next_activation(node: Node, graph: ModelGraph) -> str:
    data_inputs = [name for name in node.inputs if name and graph.is_data(name)]
    if not data_inputs:
        raise OnnxmarkError(f"{graph.path}: {node.describe(graph.opset)} has no activation input")
    return data_inputs[0]


def check_signature(expected: list[dict], actual: list[dict], suspect: str) -> None:
    """Raise OnnxmarkError when a suspect's plan does not have the structure the key was made for."""
    if len(expected) != len(actual):
        raise OnnxmarkError(
            f"The key does not fit {suspect}: the key expects {len(expected)} transposed layers, "
            f"the suspect has {len(actual)}. It is another architecture; compare it with the model the key "
            "was made for.")
    for index, (want, have) in enumerate(zip(expected, actual)):
        if want != have:
            raise OnnxmarkError(
                f"The key does not fit {suspect}: transposed layer {index} should be {_describe(want)}, "
                f"the suspect has {_describe(have)}.")


def _describe(entry: dict) -> str:
    return (f"{entry['op']} {entry['output_shape']} -> {entry['input_shape']} "
            f"with weights {entry['weight_shapes']}")
