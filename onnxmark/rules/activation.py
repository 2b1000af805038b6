"""Element-wise activations: the transposed model applies the same function."""
from __future__ import annotations

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, activation_input
from onnxmark.rules.registry import register


class ActivationStep(Step):
    def run_torch(self, y, weights):
        import torch
        import torch.nn.functional as F

        op = self.node.op_type
        if op == "Relu":
            return F.relu(y)
        if op == "LeakyRelu":
            return F.leaky_relu(y, self.node.attrs.get("alpha", 0.01))
        if op == "Sigmoid":
            return torch.sigmoid(y)
        return torch.tanh(y)

    def emit_onnx(self, builder, y):
        attrs = {"alpha": self.node.attrs.get("alpha", 0.01)} if self.node.op_type == "LeakyRelu" else {}
        return builder.add(self.node.op_type, [y], **attrs)


class IdentityStep(Step):
    def run_torch(self, y, weights):
        return y

    def emit_onnx(self, builder, y):
        return y


@register("Relu", "LeakyRelu", "Sigmoid", "Tanh")
def plan_activation(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    return ActivationStep(node, graph.shapes[source], graph.shapes[node.outputs[0]])


@register("Dropout", "Identity")
def plan_identity(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    return IdentityStep(node, graph.shapes[source], graph.shapes[node.outputs[0]])
