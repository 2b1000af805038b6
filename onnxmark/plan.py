"""The transposition plan: the transposed layers of a model, from its logits back to its input."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

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
    """Transposed steps in execution order, from the logits back to the input.

    The steps form a graph of their own: each step consumes the transposed value of its `target` tensor
    and adds its results into the values of its `sources`. Where a forward tensor feeds several nodes,
    the transposed contributions are summed. Where a forward node has several activation inputs, the
    rule follows one and reads the others as frozen tensors.
    """

    steps: list[Step]
    logits_name: str
    input_name: str
    issues: list[PlanIssue] = field(default_factory=list)
    frozen_values: dict = field(default_factory=dict)   # frozen tensor name -> recorded mean (from the key)

    @property
    def layer_indices(self) -> list[int]:
        return [i for i, step in enumerate(self.steps) if step.is_layer]

    def weight_names(self) -> list[str]:
        names: list[str] = []
        for step in self.steps:
            names.extend(name for name in step.weights if name not in names)
        return names

    def frozen_names(self) -> list[str]:
        names: list[str] = []
        for step in self.steps:
            names.extend(name for name in step.frozen if name not in names)
        return names

    def signature(self, graph: ModelGraph) -> list[dict]:
        return [step.signature(graph) for step in self.steps]

    def as_networkx(self) -> nx.DiGraph:
        """Return the plan as a graph with one node per step and an edge wherever one step feeds another."""
        steps = nx.DiGraph()
        consumer_of = {step.target: i for i, step in enumerate(self.steps)}
        for i, step in enumerate(self.steps):
            steps.add_node(i, op_type=step.node.op_type, forward_node=step.node.name, is_layer=step.is_layer,
                           frozen=list(step.frozen))
        for i, step in enumerate(self.steps):
            for source in step.sources:
                if source in consumer_of:
                    steps.add_edge(i, consumer_of[source], tensor=source)
        return steps


def build_plan(graph: ModelGraph, strict: bool = True) -> Plan:
    """Plan a transposed step for every node between the logits and the input, visiting nodes in reverse order.

    With `strict`, any node without a usable rule raises one OnnxmarkError that lists all of them.
    Without it, the walk goes on through every activation input of such a node, so that one run finds
    every node that has no rule.
    """
    graph.transposable = _transposable_tensors(graph)
    steps: list[Step] = []
    issues: list[PlanIssue] = []
    reached = {graph.logits_name}

    for node in reversed(graph.nodes):
        targets = [name for name in node.outputs if name in reached]
        if not targets:
            continue
        if len(targets) > 1:
            issues.append(PlanIssue(node, graph.opset, "more than one of its outputs leads to the logits"))
            reached.update(_activation_inputs(node, graph))
            continue

        step, reason = _plan_node(node, graph)
        if step is None:
            issues.append(PlanIssue(node, graph.opset, reason))
            reached.update(_activation_inputs(node, graph))
            continue
        step.target = targets[0]
        if not step.sources:
            step.sources = tuple(name for name in _activation_inputs(node, graph) if name not in step.frozen)
        steps.append(step)
        reached.update(step.sources)

    if graph.input_name not in reached:
        raise OnnxmarkError(f"{graph.path}: the logits '{graph.logits_name}' are not connected to the input "
                            f"'{graph.input_name}'")
    plan = Plan(steps, graph.logits_name, graph.input_name, issues)
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


def _transposable_tensors(graph: ModelGraph) -> set[str]:
    """Return the tensors whose every transposed source leads back to the input through planned steps.

    Branch rules read this set so that they follow an operand the plan can transpose and freeze the other.
    """
    graph.transposable = transposable = {graph.input_name}
    for node in graph.nodes:
        data_inputs = _activation_inputs(node, graph)
        if not any(name in transposable for name in data_inputs):
            continue
        step, _ = _plan_node(node, graph)
        if step is None:
            continue
        sources = step.sources or [name for name in data_inputs if name not in step.frozen]
        if all(name in transposable for name in sources):
            transposable.update(node.outputs)
    return transposable


def _activation_inputs(node: Node, graph: ModelGraph) -> list[str]:
    return [name for name in node.inputs if name and graph.is_data(name)]


# Steps that pass an activation through unchanged, which optimizers and converters add or remove freely.
PASS_THROUGH_OPS = {"Identity", "Dropout", "Cast"}
LINEAR_OPS = {"Gemm", "MatMul"}
SHAPE_OPS = {"Flatten": "Reshape"}


def structural_form(signature: list[dict]) -> list[dict]:
    """Reduce a plan signature to the structure that survives rewrites which keep a model's function.

    Identity-like steps are dropped. Gemm and MatMul become one "linear" entry described by its input and
    output shapes, because a MatMul's weight is the transpose of a Gemm's. A constant bias Add right after a
    linear layer or a Conv is folded into that layer, as Gemm and Conv carry their bias themselves.
    """
    return [entry for _, entry in _indexed_form(signature)]


def _indexed_form(signature: list[dict]) -> list[tuple[int, dict]]:
    """Build the structural form, each entry with the index of the signature step it describes."""
    form: list[tuple[int, dict]] = []
    for index, entry in enumerate(signature):
        op = entry["op"]
        if op in PASS_THROUGH_OPS:
            continue
        if op in LINEAR_OPS or op == "Conv":
            if form and _is_bias_add(form[-1][1], entry):
                form.pop()
            reduced = {"op": "linear" if op in LINEAR_OPS else op,
                       "input_shape": entry["input_shape"], "output_shape": entry["output_shape"]}
            if op == "Conv":
                reduced["weight_shapes"] = entry["weight_shapes"][:1]
            form.append((index, reduced))
            continue
        form.append((index, {**entry, "op": SHAPE_OPS.get(op, op)}))
    return form


def surplus_steps(expected: list[dict], actual: list[dict], optional: set[int]) -> set[int]:
    """Return the optional steps of `actual` that it has and `expected` lacks, when dropping them makes both match.

    Returns an empty set when the two match as they are, or when no such choice makes them match (then
    check_signature reports what differs).
    """
    target = structural_form(expected)
    surplus: set[int] = set()
    matched = 0
    for index, entry in _indexed_form(actual):
        if matched < len(target) and target[matched] == entry:
            matched += 1
        elif index in optional:
            surplus.add(index)
        else:
            return set()
    return surplus if matched == len(target) else set()


def _is_bias_add(previous: dict, layer: dict) -> bool:
    """Return whether `previous` (the next step forward) adds one constant to this layer's output."""
    return (previous["op"] == "Add" and len(previous["weight_shapes"]) == 1
            and previous["input_shape"] == layer["output_shape"]
            and int(np.prod(previous["weight_shapes"][0])) == layer["output_shape"][0]
            and "frozen_shapes" not in previous)


def check_signature(expected: list[dict], actual: list[dict], suspect: str) -> None:
    """Raise OnnxmarkError when a suspect's plan does not have the structure the key was made for."""
    expected, actual = structural_form(expected), structural_form(actual)
    if len(expected) != len(actual):
        raise OnnxmarkError(
            f"The key does not fit {suspect}: the key expects {len(expected)} transposed layers, "
            f"the suspect has {len(actual)} (both counted without Identity, Dropout and Cast steps and with a "
            "bias Add as part of its layer). It is another architecture; compare it with the model the key "
            "was made for.")
    for index, (want, have) in enumerate(zip(expected, actual)):
        if want != have:
            raise OnnxmarkError(
                f"The key does not fit {suspect}: transposed layer {index} should be {_describe(want)}, "
                f"the suspect has {_describe(have)}.")


def _describe(entry: dict) -> str:
    weights = f" with weights {entry['weight_shapes']}" if entry.get("weight_shapes") else ""
    return f"{entry['op']} {entry['output_shape']} -> {entry['input_shape']}{weights}"
