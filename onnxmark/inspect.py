"""`onnxmark inspect`: the graph in layers, the plan and every node the plan cannot transpose."""
from __future__ import annotations

from pathlib import Path

import networkx as nx

from onnxmark.graph import import_graph
from onnxmark.plan import build_plan


def inspect_model(path: str | Path) -> dict:
    graph = import_graph(path)
    plan = build_plan(graph, strict=False)
    planned = {step.node.name: step for step in plan.steps}
    problems = {issue.node.name: issue.reason for issue in plan.issues}

    frozen_nodes = set()
    for name in plan.frozen_names():
        producer = graph.producer(name)
        if producer is not None:
            frozen_nodes |= nx.ancestors(graph.graph, producer.name) | {producer.name}

    nodes = []
    for node in graph.nodes:
        if not any(graph.is_data(out) for out in node.outputs):
            continue
        if node.name in planned:
            step = planned[node.name]
            status = "transposed" + (" (layer)" if step.is_layer else "")
            if step.frozen:
                status += f", frozen branch {', '.join(step.frozen)}"
        elif node.name in problems:
            status = f"NO RULE: {problems[node.name]}"
        elif graph.logits_name in node.inputs:
            status = "skipped (after the logits)"
        elif node.name in frozen_nodes:
            status = "in a frozen branch (its mean value is stored in the key)"
        else:
            status = "not on the path from input to logits"
        nodes.append({"name": node.name, "op_type": node.op_type, "status": status})

    return {
        "model": str(path),
        "opset": graph.original_opset,
        "input": graph.input_name,
        "input_shape": list(graph.input_dims),
        "logits": graph.logits_name,
        "nodes": nodes,
        "plan": plan.signature(graph),
        "frozen": [{"node": step.node.name, "tensor": name, "shape": list(graph.shapes[name])}
                   for step in plan.steps for name in step.frozen],
        "unsupported": [issue.message() for issue in plan.issues],
    }
