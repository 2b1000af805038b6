"""Add, Sub, Mul and Div with one constant operand (biases, input scaling): inverted exactly.

With two activation operands, the rule in branch.py freezes one of them.
"""
from __future__ import annotations

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, Unsupported, activation_input
from onnxmark.rules.branch import plan_frozen_operand
from onnxmark.rules.registry import register

# (op type, activation is the first operand) -> inverse op and whether the constant comes first in it.
INVERSES = {
    ("Add", True): ("Sub", False),    # y = x + c  ->  x = y - c
    ("Add", False): ("Sub", False),   # y = c + x  ->  x = y - c
    ("Sub", True): ("Add", False),    # y = x - c  ->  x = y + c
    ("Sub", False): ("Sub", True),    # y = c - x  ->  x = c - y
    ("Mul", True): ("Div", False),    # y = x * c  ->  x = y / c
    ("Mul", False): ("Div", False),   # y = c * x  ->  x = y / c
    ("Div", True): ("Mul", False),    # y = x / c  ->  x = y * c
}


class ConstantOperandStep(Step):
    def run_torch(self, y, weights):
        constant = weights[self.weights[0]]
        op, constant_first = self.attrs["inverse"], self.attrs["constant_first"]
        left, right = (constant, y) if constant_first else (y, constant)
        if op == "Sub":
            return left - right
        if op == "Add":
            return left + right
        if op == "Mul":
            return left * right
        # NOTE: a zero in a Mul constant gives inf here, as it would in the ONNX graph.
        return left / right

    def emit_onnx(self, builder, y):
        constant = builder.weight(self.weights[0])
        inputs = [constant, y] if self.attrs["constant_first"] else [y, constant]
        return builder.add(self.attrs["inverse"], inputs)


@register("Add", "Sub", "Mul", "Div")
def plan_constant_operand(node: Node, graph: ModelGraph) -> Step:
    if sum(1 for name in node.inputs if name and graph.is_data(name)) == 2:
        return plan_frozen_operand(node, graph)
    source = activation_input(node, graph)
    activation_first = node.inputs[0] == source
    key = (node.op_type, activation_first)
    if key not in INVERSES:
        raise Unsupported("a constant divided by an activation has no inverse")
    constant = node.inputs[1] if activation_first else node.inputs[0]
    inverse, constant_first = INVERSES[key]
    return ConstantOperandStep(node, graph.shapes[source], graph.shapes[node.outputs[0]], (constant,),
                               attrs={"inverse": inverse, "constant_first": constant_first})
