"""Conv: the transposed layer is ConvTranspose with the same weight, sized back to the conv's input.

The conv bias is subtracted first. Explicit (possibly asymmetric) pads are cropped from the full
transposed output, and rows that the forward conv never read (stride remainder) come back as zeros.
"""
from __future__ import annotations

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, Unsupported, activation_input, channel_view_shape
from onnxmark.rules.registry import register


class ConvStep(Step):
    def run_torch(self, y, weights):
        import torch.nn.functional as F

        if len(self.weights) == 2:
            bias = weights[self.weights[1]]
            y = y - bias.reshape(channel_view_shape(bias.shape[0], y.dim()))

        transpose = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[y.dim() - 2]
        full = transpose(y, weights[self.weights[0]], stride=self.attrs["strides"],
                         dilation=self.attrs["dilations"], groups=self.attrs["group"])

        # Crop the leading pads and the trailing overhang, then zero-fill what the conv skipped.
        begins, ends, output_padding = self.attrs["crop_begin"], self.attrs["crop_end"], self.attrs["output_padding"]
        index = [slice(None), slice(None)]
        index += [slice(b, full.shape[2 + i] - e) for i, (b, e) in enumerate(zip(begins, ends))]
        cropped = full[tuple(index)]
        if any(output_padding):
            pad = []
            for extra in reversed(output_padding):
                pad += [0, extra]
            cropped = F.pad(cropped, pad)
        return cropped

    def emit_onnx(self, builder, y):
        if len(self.weights) == 2:
            bias = builder.weight(self.weights[1])
            view = builder.constant(channel_view_shape(-1, len(self.output_shape) + 1)[1:], "int64", "shape")
            y = builder.add("Sub", [y, builder.add("Reshape", [bias, view])])
        return builder.add(
            "ConvTranspose", [y, builder.weight(self.weights[0])],
            strides=self.attrs["strides"], dilations=self.attrs["dilations"], group=self.attrs["group"],
            pads=self.attrs["crop_begin"] + self.attrs["crop_end"], output_padding=self.attrs["output_padding"],
        )


@register("Conv")
def plan_conv(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its weight is an activation")
    weight = graph.constant_value(node.inputs[1])
    spatial = len(weight.shape) - 2
    if spatial not in (1, 2, 3):
        raise Unsupported(f"{spatial}-D convolutions are not supported")

    strides = list(node.attrs.get("strides", [1] * spatial))
    dilations = list(node.attrs.get("dilations", [1] * spatial))
    pads = list(node.attrs.get("pads", [0] * 2 * spatial))
    in_size = graph.shapes[source][1:]
    out_size = graph.shapes[node.outputs[0]][1:]

    crop_end, output_padding = [], []
    for axis in range(spatial):
        full = strides[axis] * (out_size[axis] - 1) + dilations[axis] * (weight.shape[2 + axis] - 1) + 1
        available = full - pads[axis]
        crop_end.append(max(available - in_size[axis], 0))
        output_padding.append(max(in_size[axis] - available, 0))

    weights = tuple(name for name in node.inputs[1:3] if name)
    attrs = {"strides": strides, "dilations": dilations, "group": int(node.attrs.get("group", 1)),
             "crop_begin": pads[:spatial], "crop_end": crop_end, "output_padding": output_padding}
    return ConvStep(node, graph.shapes[source], graph.shapes[node.outputs[0]], weights, is_layer=True, attrs=attrs)
