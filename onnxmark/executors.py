"""Torch executors that share one parameter store: the forward model and the transposed model.

Every float initializer of the user's file is exactly one torch Parameter keyed by its ONNX name. The
forward executor runs the ONNX nodes in order on those parameters; operators with weights run as this
module's own functional code, and weight-free operators without an implementation here are converted one
node at a time by onnx2torch. The transposed executor runs the plan's steps on the same parameters.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from onnxmark.errors import OnnxmarkError
from onnxmark.graph import ModelGraph, Node
from onnxmark.plan import Plan
from onnxmark.rules.activation import activation_attributes, apply_activation
from onnxmark.rules.padding import pad_widths, torch_pad_list
from onnxmark.rules.resize import (
    axis_scales, nearest_indices, outside_positions, resize_inputs, resize_settings, resized_axes, sampling_matrix,
)

log = logging.getLogger(__name__)

# Probability of dropout after every transposed conv/linear layer but the last, during hardening.
TRANSPOSED_DROPOUT = 0.1


class ParameterStore(torch.nn.Module):
    """One torch tensor per ONNX constant; float initializers are trainable Parameters."""

    def __init__(self, graph: ModelGraph):
        super().__init__()
        self.graph = graph
        self.tensors: dict[str, torch.Tensor] = {}
        self.parameter_list = torch.nn.ParameterList()
        statistics = {name for node in graph.nodes if node.op_type == "BatchNormalization"
                      for name in node.inputs[3:5]}

        for name in graph.float_initializer_names():
            value = torch.tensor(np.asarray(graph.constants[name], dtype=np.float32))
            parameter = torch.nn.Parameter(value, requires_grad=name not in statistics)
            self.tensors[name] = parameter
            self.parameter_list.append(parameter)
        for name, value in graph.constants.items():
            if name not in self.tensors:
                self.tensors[name] = torch.from_numpy(np.array(value))

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameter_list if p.requires_grad]

    def snapshot(self) -> dict[str, np.ndarray]:
        """Current values of the user's float initializers, as float32 numpy arrays."""
        return {name: self.tensors[name].detach().cpu().numpy().copy() for name in self.graph.float_initializer_names()}

    def load(self, values: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, value in values.items():
                self.tensors[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


class GraphRunner:
    """Evaluate ONNX nodes in topological order with torch, on the parameter store."""

    def __init__(self, graph: ModelGraph, store: ParameterStore):
        self.graph = graph
        self.store = store
        self.batch_norm_training = False
        self.batch_norm_momentum: float | None = None   # overrides the nodes' momentum when set
        self._fallback_modules: dict[str, tuple] = {}

    def run(self, targets: list[str], feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        needed = self._needed_nodes(targets, set(feeds))
        env = dict(feeds)
        for node in needed:
            inputs = [self._value(name, env) for name in node.inputs]
            outputs = self._run_node(node, inputs)
            env.update(zip(node.outputs, outputs))
        return {name: self._value(name, env) for name in targets}

    def _value(self, name: str, env: dict):
        if not name:
            return None
        if name in env:
            return env[name]
        return self.store.tensors[name]

    def _needed_nodes(self, targets: list[str], known: set[str]) -> list[Node]:
        missing = {t for t in targets if t not in known and t not in self.store.tensors}
        needed = []
        for node in reversed(self.graph.nodes):
            if any(out in missing for out in node.outputs):
                needed.append(node)
                missing.update(n for n in node.inputs if n and n not in known and n not in self.store.tensors)
        return list(reversed(needed))

    def _run_node(self, node: Node, inputs: list) -> list:
        implementation = OPS.get(node.op_type)
        if implementation is not None and node.domain in ("", "ai.onnx"):
            result = implementation(self, node, inputs)
        else:
            result = self._run_fallback(node, inputs)
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def _run_fallback(self, node: Node, inputs: list):
        if node.name not in self._fallback_modules:
            self._fallback_modules[node.name] = self._convert_with_onnx2torch(node)
        module, input_names = self._fallback_modules[node.name]
        by_name = dict(zip(node.inputs, inputs))
        return module(*[by_name.get(name) for name in input_names])

    def _convert_with_onnx2torch(self, node: Node):
        from onnx2torch.node_converters import get_converter
        from onnx2torch.onnx_graph import OnnxGraph

        if not hasattr(self, "_onnx2torch_graph"):
            self._onnx2torch_graph = OnnxGraph(self.graph.model.graph)
        for candidate in self._onnx2torch_graph.nodes.values():
            if list(candidate.output_values) == node.outputs:
                break
        else:
            raise OnnxmarkError(f"{node.describe(self.graph.opset)} was not found by onnx2torch")
        try:
            converter = get_converter(operation_type=node.op_type, version=self.graph.opset, domain=node.domain)
            module, mapping = converter(candidate, self._onnx2torch_graph)
        except NotImplementedError as error:
            raise OnnxmarkError(f"{node.describe(self.graph.opset)} cannot run in torch: {error}") from error
        return module, list(mapping.inputs)

    def data_shape(self, tensor: str) -> tuple[int, ...]:
        return self.graph.shapes[tensor]


class ForwardExecutor:
    """The classifier in torch: model input (model layout and value range) to logits."""

    def __init__(self, graph: ModelGraph, store: ParameterStore):
        self.graph = graph
        self.runner = GraphRunner(graph, store)

    def __call__(self, inputs: torch.Tensor, batch_norm_training: bool = False) -> torch.Tensor:
        self.runner.batch_norm_training = batch_norm_training
        logits = self.runner.run([self.graph.logits_name], {self.graph.input_name: inputs})[self.graph.logits_name]
        if logits.dim() > 2 and all(size == 1 for size in logits.shape[2:]):
            logits = logits.flatten(1)   # [N, classes, 1, 1] after a global pooling -> [N, classes]
        return logits


class TransposedExecutor:
    """The transposed model in torch: key vectors to images in the model's input layout.

    `frozen` maps forward tensor names to the plan's frozen tensors (shape without the batch). The plan's
    own `frozen_values` are the default.
    """

    def __init__(self, graph: ModelGraph, store: ParameterStore, plan: Plan,
                 frozen: dict[str, np.ndarray] | None = None, dropout: float = TRANSPOSED_DROPOUT):
        self.graph = graph
        self.plan = plan
        self.runner = GraphRunner(graph, store)
        self.dropout = dropout
        layers = plan.layer_indices
        self.dropout_after = set(layers[:-1])
        frozen = plan.frozen_values if frozen is None else frozen
        missing = [name for name in plan.frozen_names() if name not in frozen]
        if missing:
            raise OnnxmarkError(f"Missing frozen value for the branch(es) {', '.join(missing)}")
        self.frozen = {name: torch.from_numpy(np.asarray(frozen[name], dtype=np.float32))[None]
                       for name in plan.frozen_names()}

    def __call__(self, keys: torch.Tensor, training: bool = False) -> torch.Tensor:
        weights = self.runner.run(self.plan.weight_names(), {})
        weights.update(self.frozen)
        values = {self.plan.logits_name: keys.reshape(len(keys), *self.plan.steps[0].output_shape)}
        for index, step in enumerate(self.plan.steps):
            produced = step.run_torch(values.pop(step.target), weights)
            produced = produced if isinstance(produced, tuple) else (produced,)
            for source, x in zip(step.sources, produced):
                if training and index in self.dropout_after and self.dropout > 0:
                    x = F.dropout(x, self.dropout, training=True)
                values[source] = values[source] + x if source in values else x
        return values[self.plan.input_name]


# ----- operator implementations: (runner, node, inputs) -> output or tuple of outputs -----

def _explicit_pads(node: Node, spatial: int) -> tuple[list[int], list[int]]:
    pads = list(node.attrs.get("pads", [0] * 2 * spatial))
    return pads[:spatial], pads[spatial:]


def _conv(runner, node, inputs):
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    spatial = weight.dim() - 2
    begins, ends = _explicit_pads(node, spatial)
    if any(begins) or any(ends):
        x = F.pad(x, torch_pad_list(begins, ends))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, weight, bias, stride=node.attrs.get("strides", 1), dilation=node.attrs.get("dilations", 1),
                groups=node.attrs.get("group", 1))


def _gemm(runner, node, inputs):
    a, b = inputs[0], inputs[1]
    if node.attrs.get("transA", 0):
        a = a.T
    if node.attrs.get("transB", 0):
        b = b.T
    y = node.attrs.get("alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + node.attrs.get("beta", 1.0) * inputs[2]
    return y


def _batch_norm(runner, node, inputs):
    x, scale, bias, mean, var = inputs[:5]
    momentum = 1.0 - node.attrs.get("momentum", 0.9)   # ONNX keeps `momentum` of the old value
    if runner.batch_norm_momentum is not None:
        momentum = runner.batch_norm_momentum
    return F.batch_norm(x, mean, var, scale, bias, training=runner.batch_norm_training, momentum=momentum,
                        eps=node.attrs.get("epsilon", 1e-5))


def _pool_geometry(node, x):
    spatial = x.dim() - 2
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * spatial))
    dilations = list(node.attrs.get("dilations", [1] * spatial))
    begins, ends = _explicit_pads(node, spatial)
    return spatial, kernel, strides, dilations, begins, ends


def _max_pool(runner, node, inputs):
    x = inputs[0]
    spatial, kernel, strides, dilations, begins, ends = _pool_geometry(node, x)
    if any(begins) or any(ends):
        x = F.pad(x, torch_pad_list(begins, ends), value=float("-inf"))
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
    return pool(x, kernel, strides, 0, dilations, ceil_mode=bool(node.attrs.get("ceil_mode", 0)))


def _average_pool(runner, node, inputs):
    x = inputs[0]
    spatial, kernel, strides, _, begins, ends = _pool_geometry(node, x)
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    ceil_mode = bool(node.attrs.get("ceil_mode", 0))
    if not any(begins) and not any(ends):
        return pool(x, kernel, strides, 0, ceil_mode=ceil_mode)
    padded = F.pad(x, torch_pad_list(begins, ends))
    total = pool(padded, kernel, strides, 0, ceil_mode=ceil_mode)
    if node.attrs.get("count_include_pad", 0):
        return total
    ones = F.pad(torch.ones_like(x[:1, :1]), torch_pad_list(begins, ends))
    return total / pool(ones, kernel, strides, 0, ceil_mode=ceil_mode)


def _global_average_pool(runner, node, inputs):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _reshape(runner, node, inputs):
    x = inputs[0]
    output = node.outputs[0]
    if runner.graph.is_data(output):
        # Batch-preserving reshape to the recorded shape, so fixed batch-1 exports train in batches.
        return x.reshape(x.shape[0], *runner.data_shape(output))
    shape = [int(v) for v in inputs[1].tolist()]
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _flatten(runner, node, inputs):
    x = inputs[0]
    axis = node.attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    leading = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(leading, -1)


def _axes(node, inputs, rank):
    if "axes" in node.attrs:
        axes = list(node.attrs["axes"])
    elif len(inputs) > 1 and inputs[1] is not None:
        axes = [int(v) for v in inputs[1].tolist()]
    else:
        return None
    return [a + rank if a < 0 else a for a in axes]


def _squeeze(runner, node, inputs):
    x = inputs[0]
    axes = _axes(node, inputs, x.dim())
    if axes is None:
        return x.squeeze()
    for axis in sorted(axes, reverse=True):
        x = x.squeeze(axis)
    return x


def _unsqueeze(runner, node, inputs):
    x = inputs[0]
    axes = _axes(node, inputs, x.dim() + len(node.attrs.get("axes", inputs[1] if len(inputs) > 1 else [])))
    for axis in sorted(axes):
        x = x.unsqueeze(axis)
    return x


def _gather(runner, node, inputs):
    data, indices = inputs
    axis = node.attrs.get("axis", 0)
    axis = axis + data.dim() if axis < 0 else axis
    indices = indices.long()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    flat = torch.index_select(data, axis, indices.reshape(-1))
    return flat.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1:]))


def _concat(runner, node, inputs):
    tensors = [t for t in inputs if t is not None and t.numel() > 0] or inputs[:1]
    return torch.cat(tensors, dim=node.attrs["axis"])


def _softmax(runner, node, inputs):
    return F.softmax(inputs[0], dim=node.attrs.get("axis", -1 if runner.graph.opset >= 13 else 1))


def _log_softmax(runner, node, inputs):
    return F.log_softmax(inputs[0], dim=node.attrs.get("axis", -1 if runner.graph.opset >= 13 else 1))


def _cast(runner, node, inputs):
    import onnx

    dtype = onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])
    x = inputs[0]
    if np.issubdtype(dtype, np.floating) and x.is_floating_point():
        return x   # float casts keep training in float32
    return x.to(torch.from_numpy(np.zeros(0, dtype=dtype)).dtype)


def _identity(runner, node, inputs):
    return inputs[0]


def _activation(runner, node, inputs):
    return apply_activation(node.op_type, inputs[0], activation_attributes(node))



def _clip(runner, node, inputs):
    x = inputs[0]
    if "min" in node.attrs or "max" in node.attrs:
        return torch.clamp(x, node.attrs.get("min"), node.attrs.get("max"))
    # The bounds are detached, so they stay fixed in training, as the transposed Clip reads them once at planning.
    low, high = (inputs[i].detach() if len(inputs) > i and inputs[i] is not None else None for i in (1, 2))
    return torch.clamp(x, low, high)

def _prelu(runner, node, inputs):
    x, slope = inputs
    return torch.where(x < 0, x * slope, x)


def _layer_norm(runner, node, inputs):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = node.attrs.get("axis", -1)
    axis = axis + x.dim() if axis < 0 else axis
    dims = tuple(range(axis, x.dim()))

    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    inverse_std = torch.rsqrt((centred * centred).mean(dim=dims, keepdim=True) + node.attrs.get("epsilon", 1e-5))
    y = centred * inverse_std * scale
    if bias is not None:
        y = y + bias
    return y, mean, inverse_std      # outputs Y, Mean and InvStdDev, of which a node lists those it uses


# Added to the standard deviation by MeanVarianceNormalization's ONNX function body, so that a constant
# input gives 0 rather than a division by zero.
MVN_EPSILON = 1e-9


def _mean_variance_normalization(runner, node, inputs):
    x = inputs[0]
    axes = [a + x.dim() if a < 0 else a for a in node.attrs.get("axes", [0, 2, 3])]
    mean = x.mean(dim=axes, keepdim=True)
    centred = x - mean
    std = torch.sqrt((centred * centred).mean(dim=axes, keepdim=True))
    return centred / (std + MVN_EPSILON)


# torch's F.pad name of each ONNX Pad mode other than constant.
TORCH_PAD_MODES = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(runner, node, inputs):
    x = inputs[0]
    attribute = "pads" if "pads" in node.attrs else "paddings"
    if attribute in node.attrs:
        begins, ends = pad_widths(node.attrs[attribute], x.dim())
        value = float(node.attrs.get("value", 0.0))
    else:
        axes = inputs[3].tolist() if len(inputs) > 3 and inputs[3] is not None else None
        begins, ends = pad_widths(inputs[1].tolist(), x.dim(), axes)
        has_value = len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() > 0
        value = float(inputs[2].reshape(-1)[0]) if has_value else 0.0

    mode = node.attrs.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, torch_pad_list(begins, ends), value=value)
    if mode not in TORCH_PAD_MODES:
        raise OnnxmarkError(f"{node.describe(runner.graph.opset)} uses the unknown Pad mode '{mode}'")

    # Negative pads crop first, because F.pad takes negative pads in constant mode only.
    x = F.pad(x, torch_pad_list([min(b, 0) for b in begins], [min(e, 0) for e in ends]))
    begins, ends = [max(b, 0) for b in begins], [max(e, 0) for e in ends]
    padded = [axis for axis in range(x.dim()) if begins[axis] or ends[axis]]
    if not padded:
        return x
    # F.pad fills 1 to 3 trailing axes in these modes, and at least all axes after batch and channel.
    count = max(x.dim() - padded[0], x.dim() - 2, 1)
    if count > 3:
        raise OnnxmarkError(f"{node.describe(runner.graph.opset)}: torch cannot run {mode} padding of axis "
                            f"{padded[0]} of a rank-{x.dim()} tensor; it pads at most the last 3 axes in this mode")
    return F.pad(x, torch_pad_list(begins[-count:], ends[-count:]), mode=TORCH_PAD_MODES[mode])


def _resize(runner, node, inputs):
    x = inputs[0]
    opset = runner.graph.opset
    settings = resize_settings(node, opset)
    values = [None] + [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t for t in inputs[1:]]
    roi, scales, sizes = resize_inputs(node, opset, values)
    input_shape = list(x.shape)
    # Sizes were written for the recorded batch, and a training step's batch may differ.
    recorded_shape = [runner.graph.recorded_batch, *input_shape[1:]]
    try:
        scale_per_axis = axis_scales(settings, recorded_shape, scales, sizes)
    except ValueError as error:
        raise OnnxmarkError(f"{node.describe(opset)} cannot run in torch: {error}") from error
    if scales is not None and scale_per_axis[0] != 1.0:
        raise OnnxmarkError(f"{node.describe(opset)} resizes the batch axis by {scale_per_axis[0]}, which "
                            "torch training cannot follow")

    output_shape = _resize_output_shape(runner, node, input_shape, scale_per_axis, settings, sizes)
    rois = _resize_rois(roi, settings, x.dim())
    for axis in range(1, x.dim()):
        in_size, out_size, scale = input_shape[axis], output_shape[axis], scale_per_axis[axis]
        if in_size == out_size and scale == 1.0 and settings.coordinate_transformation_mode != "tf_crop_and_resize":
            continue
        try:
            x = _resize_axis(x, axis, in_size, out_size, scale, settings, rois[axis])
        except ValueError as error:
            raise OnnxmarkError(f"{node.describe(opset)} cannot run in torch: {error}") from error
    return x


def _resize_axis(x, axis, in_size, out_size, scale, settings, roi):
    if settings.mode == "nearest":
        index = nearest_indices(in_size, out_size, scale, settings, roi)
        resized = torch.index_select(x, axis, torch.from_numpy(index).to(x.device))
    else:
        matrix = torch.from_numpy(sampling_matrix(in_size, out_size, scale, settings, roi))
        moved = torch.movedim(x, axis, -1) @ matrix.to(x.device, x.dtype).T
        resized = torch.movedim(moved, -1, axis)

    if settings.coordinate_transformation_mode == "tf_crop_and_resize":
        mask_shape = [1] * x.dim()
        mask_shape[axis] = out_size
        outside = torch.from_numpy(outside_positions(in_size, out_size, scale, settings, roi))
        resized = torch.where(outside.reshape(mask_shape).to(x.device),
                              torch.full_like(resized, settings.extrapolation_value), resized)
    return resized


def _resize_output_shape(runner, node, input_shape, scale_per_axis, settings, sizes) -> list[int]:
    output = node.outputs[0]
    if output in runner.graph.shapes:
        return [input_shape[0], *runner.data_shape(output)]
    if sizes is not None and settings.keep_aspect_ratio_policy == "stretch":
        rank = len(input_shape)
        shape = list(input_shape)
        for axis, size in zip(resized_axes(settings, rank), sizes):
            shape[axis] = int(size)
        return shape
    # NOTE: onnxruntime records every activation's shape, so this branch only runs for a Resize of a
    # constant. It rounds down for scales, as the spec does, and to nearest for keep_aspect_ratio_policy.
    rounding = np.floor if sizes is None else np.round
    return [int(rounding(size * scale)) for size, scale in zip(input_shape, scale_per_axis)]


def _resize_rois(roi, settings, rank) -> list[tuple[float, float]]:
    """Return (start, end) of the region of interest of every axis. Only tf_crop_and_resize reads it."""
    rois = [(0.0, 1.0)] * rank
    if roi is None or settings.coordinate_transformation_mode != "tf_crop_and_resize":
        return rois
    axes = resized_axes(settings, rank)
    for index, axis in enumerate(axes):
        rois[axis] = (float(roi[index]), float(roi[len(axes) + index]))
    return rois


OPS = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda r, n, i: i[0] @ i[1],
    "Add": lambda r, n, i: i[0] + i[1],
    "Sub": lambda r, n, i: i[0] - i[1],
    "Mul": lambda r, n, i: i[0] * i[1],
    "Div": lambda r, n, i: i[0] / i[1],
    "BatchNormalization": _batch_norm,
    "Relu": lambda r, n, i: F.relu(i[0]),
    "LeakyRelu": lambda r, n, i: F.leaky_relu(i[0], n.attrs.get("alpha", 0.01)),
    "Sigmoid": lambda r, n, i: torch.sigmoid(i[0]),
    "Tanh": lambda r, n, i: torch.tanh(i[0]),
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": lambda r, n, i: i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda r, n, i: i[0].permute(*n.attrs.get("perm", reversed(range(i[0].dim())))),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Shape": lambda r, n, i: torch.tensor(i[0].shape, dtype=torch.int64),
    "Gather": _gather,
    "Concat": _concat,
    "Cast": _cast,
    "Identity": _identity,
    "Dropout": _identity,     # inference behaviour: the forward model trains without its own dropout
    "Softmax": _softmax,
    "LogSoftmax": _log_softmax,
    # Weights that training must reach: read from the parameter store, not copied by onnx2torch.
    "PRelu": _prelu,
    "LayerNormalization": _layer_norm,
    # onnx2torch 1.5 lacks converters for these at some opsets from 7 to 22. It has none for Gelu, Mish,
    # ThresholdedRelu, MeanVarianceNormalization and Upsample, and none for the opset-18+ Pad and Resize
    # or the opset-22 activations. Its Resize also rounds nearest down whatever the node's nearest_mode.
    "Elu": _activation,
    "Selu": _activation,
    "HardSigmoid": _activation,
    "HardSwish": _activation,
    "ThresholdedRelu": _activation,
    "Gelu": _activation,
    "Softplus": _activation,
    "Softsign": _activation,
    "Mish": _activation,
    "MeanVarianceNormalization": _mean_variance_normalization,
    "Pad": _pad,
    "Resize": _resize,
    "Clip": _clip,            # onnx2torch rejects an omitted min input
    "Upsample": _resize,
}
