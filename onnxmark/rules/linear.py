"""Gemm and MatMul with a constant weight: the transposed layer multiplies by the transposed weight.

Forward  y = alpha * x @ B' + beta * C, with B' = B or B transposed (transB).
Inverse  x = alpha * (y - beta * C) @ B'^T, using the same B and C tensors.
"""
from __future__ import annotations

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, Unsupported, activation_input
from onnxmark.rules.branch import plan_frozen_operand
from onnxmark.rules.registry import register


class GemmStep(Step):
    def run_torch(self, y, weights):
        alpha, beta, trans_b = self.attrs["alpha"], self.attrs["beta"], self.attrs["transB"]
        if len(self.weights) == 2:
            y = y - beta * weights[self.weights[1]]
        weight = weights[self.weights[0]]            # [out, in] when transB, else [in, out]
        product = y @ weight if trans_b else y @ weight.T
        return product * alpha if alpha != 1.0 else product

    def emit_onnx(self, builder, y):
        alpha, beta, trans_b = self.attrs["alpha"], self.attrs["beta"], self.attrs["transB"]
        if len(self.weights) == 2:
            bias = builder.weight(self.weights[1])
            if beta != 1.0:
                bias = builder.add("Mul", [bias, builder.constant(beta, "float32", "beta")])
            y = builder.add("Sub", [y, bias])
        return builder.add("Gemm", [y, builder.weight(self.weights[0])], alpha=alpha, transB=0 if trans_b else 1)


class MatMulStep(Step):
    def run_torch(self, y, weights):
        return y @ weights[self.weights[0]].transpose(-1, -2)

    def emit_onnx(self, builder, y):
        weight_t = builder.add("Transpose", [builder.weight(self.weights[0])], perm=[1, 0])
        return builder.add("MatMul", [y, weight_t])


@register("Gemm")
def plan_gemm(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its activation is input B; only an activation as input A is supported")
    if node.attrs.get("transA", 0):
        raise Unsupported("transA=1 is not supported")
    weights = tuple(name for name in node.inputs[1:3] if name)
    attrs = {"alpha": float(node.attrs.get("alpha", 1.0)), "beta": float(node.attrs.get("beta", 1.0)),
             "transB": int(node.attrs.get("transB", 0))}
    return GemmStep(node, graph.shapes[source], graph.shapes[node.outputs[0]], weights, is_layer=True, attrs=attrs)


@register("MatMul")
def plan_matmul(node: Node, graph: ModelGraph) -> Step:
    if sum(1 for name in node.inputs if name and graph.is_data(name)) == 2:
        return plan_frozen_operand(node, graph)   # attention: one operand frozen
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its activation is the second operand; only activation @ weight is supported")
    weight = node.inputs[1]
    if graph.constant_value(weight).ndim != 2:
        raise Unsupported(f"its weight '{weight}' is not a matrix")
    return MatMulStep(node, graph.shapes[source], graph.shapes[node.outputs[0]], (weight,), is_layer=True)
