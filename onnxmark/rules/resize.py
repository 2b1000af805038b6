"""Resize and Upsample: the transposed model resizes back to the forward input's spatial size.

The transposed step samples with one fixed convention, whatever the forward node used: nearest with
asymmetric coordinates and floor rounding, or, where the forward node interpolated (linear or cubic),
linear with half_pixel coordinates. These are the conventions of torch's F.interpolate
(align_corners=False), so the torch and ONNX transposed models compute the same values. After an
integer-factor nearest upsampling, resizing back returns the forward input exactly.

The module also contains the ONNX Resize sampling rules that the forward torch executor uses: per resized
axis, a matrix that maps input positions to output positions (numpy only, so the rules stay free of torch).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from onnxmark.graph import ModelGraph, Node
from onnxmark.rules.base import Step, Unsupported, activation_input
from onnxmark.rules.registry import register

# Opset at which Resize gained roi, sizes and the coordinate transformation modes. Before it, Resize and
# Upsample sample with asymmetric coordinates and truncate to the nearest index.
RESIZE_11 = 11

# Taps of the cubic kernel around the source coordinate's floor: floor-1 .. floor+2.
CUBIC_TAP_OFFSETS = np.arange(-1, 3)


@dataclass(frozen=True)
class ResizeSettings:
    """Attributes of one Resize or Upsample node, with the defaults of its opset filled in."""

    mode: str = "nearest"
    coordinate_transformation_mode: str = "half_pixel"
    nearest_mode: str = "round_prefer_floor"
    cubic_coeff_a: float = -0.75
    exclude_outside: bool = False
    extrapolation_value: float = 0.0
    antialias: bool = False
    keep_aspect_ratio_policy: str = "stretch"
    axes: tuple[int, ...] | None = None


def resize_settings(node: Node, opset: int) -> ResizeSettings:
    """Read a Resize or Upsample node's attributes. Upsample and Resize-10 get their fixed sampling rules."""
    attrs = node.attrs
    mode = attrs.get("mode", "nearest")
    if mode in ("bilinear", "trilinear"):     # experimental Upsample-1 names
        mode = "linear"
    if node.op_type == "Upsample" or opset < RESIZE_11:
        return ResizeSettings(mode=mode, coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    axes = attrs.get("axes")
    return ResizeSettings(
        mode=mode,
        coordinate_transformation_mode=attrs.get("coordinate_transformation_mode", "half_pixel"),
        nearest_mode=attrs.get("nearest_mode", "round_prefer_floor"),
        cubic_coeff_a=float(attrs.get("cubic_coeff_a", -0.75)),
        exclude_outside=bool(attrs.get("exclude_outside", 0)),
        extrapolation_value=float(attrs.get("extrapolation_value", 0.0)),
        antialias=bool(attrs.get("antialias", 0)),
        keep_aspect_ratio_policy=attrs.get("keep_aspect_ratio_policy", "stretch"),
        axes=tuple(int(a) for a in axes) if axes is not None else None,
    )


def resize_inputs(node: Node, opset: int, values: list) -> tuple:
    """Return (roi, scales, sizes) as flat numpy arrays or None, from the node's input values.

    `values` lines up with `node.inputs` and contains None for inputs that are missing or not known.
    Upsample-7 keeps its scales in an attribute; Upsample-9 and Resize-10 take them as the second input.
    """
    def flat(index: int):
        if index >= len(values) or values[index] is None:
            return None
        array = np.asarray(values[index]).reshape(-1)
        return array if array.size else None

    if node.op_type == "Upsample" and "scales" in node.attrs:
        return None, np.asarray(node.attrs["scales"], dtype=np.float32), None
    if node.op_type == "Upsample" or opset < RESIZE_11:
        return None, flat(1), None
    return flat(1), flat(2), flat(3)


def resized_axes(settings: ResizeSettings, rank: int) -> list[int]:
    """Return the axes that the scales, sizes and roi inputs list, as non-negative indices."""
    if settings.axes is None:
        return list(range(rank))
    return [axis % rank for axis in settings.axes]


def axis_scales(settings: ResizeSettings, input_shape: list[int], scales, sizes) -> list[float]:
    """Return the scale (output length / input length, as ONNX defines it) of every axis."""
    rank = len(input_shape)
    axes = resized_axes(settings, rank)
    result = [1.0] * rank
    if scales is not None:
        for axis, scale in zip(axes, scales):
            result[axis] = float(np.float32(scale))
        return result
    if sizes is None:
        raise ValueError("missing input: Resize needs scales or sizes")

    ratios = {axis: float(np.float32(size) / np.float32(input_shape[axis])) for axis, size in zip(axes, sizes)}
    if settings.keep_aspect_ratio_policy == "not_larger":
        ratios = dict.fromkeys(ratios, min(ratios.values()))
    elif settings.keep_aspect_ratio_policy == "not_smaller":
        ratios = dict.fromkeys(ratios, max(ratios.values()))
    for axis, ratio in ratios.items():
        result[axis] = ratio
    return result


def source_coordinates(in_size: int, out_size: int, scale: float, settings: ResizeSettings,
                       roi: tuple[float, float]) -> np.ndarray:
    """Return the input coordinate that each output position samples, in float32 as onnxruntime computes it."""
    x = np.arange(out_size, dtype=np.float32)
    scale = np.float32(scale)
    mode = settings.coordinate_transformation_mode

    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel":
        return (x + np.float32(0.5)) / scale - np.float32(0.5)
    if mode == "pytorch_half_pixel":
        if out_size == 1:
            return np.zeros(1, np.float32)
        return (x + np.float32(0.5)) / scale - np.float32(0.5)
    if mode == "align_corners":
        if out_size == 1:
            return np.zeros(1, np.float32)
        return x * np.float32(in_size - 1) / np.float32(out_size - 1)
    if mode == "half_pixel_symmetric":
        adjustment = np.float32(out_size) / (scale * np.float32(in_size))
        offset = np.float32(in_size / 2) * (np.float32(1) - adjustment)
        return offset + (x + np.float32(0.5)) / scale - np.float32(0.5)
    if mode == "tf_crop_and_resize":
        start, end = np.float32(roi[0]), np.float32(roi[1])
        if out_size == 1:
            return np.full(1, np.float32(0.5) * (start + end) * np.float32(in_size - 1), np.float32)
        step = (end - start) * np.float32(in_size - 1) / np.float32(out_size - 1)
        return start * np.float32(in_size - 1) + x * step
    raise ValueError(f"unknown coordinate_transformation_mode '{mode}'")


def nearest_indices(in_size: int, out_size: int, scale: float, settings: ResizeSettings,
                    roi: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Return the input index that each output position of a nearest Resize copies along one axis."""
    coords = source_coordinates(in_size, out_size, scale, settings, roi).astype(np.float64)
    return np.clip(_nearest_index(coords, settings.nearest_mode), 0, in_size - 1)


@functools.lru_cache(maxsize=256)
def sampling_matrix(in_size: int, out_size: int, scale: float, settings: ResizeSettings,
                    roi: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Return the [out_size, in_size] float32 matrix of one axis of a linear or cubic ONNX Resize.

    Raise ValueError for another mode. The cached matrix is shared between callers, who must not change it.
    """
    coords = source_coordinates(in_size, out_size, scale, settings, roi).astype(np.float64)
    rows = np.arange(out_size)
    matrix = np.zeros((out_size, in_size))

    if settings.antialias and scale < 1.0 and settings.mode in ("linear", "cubic"):
        matrix = _antialias_matrix(coords, in_size, scale, settings)
    elif settings.mode == "linear":
        clamped = np.clip(coords, 0, in_size - 1)
        low = np.floor(clamped).astype(np.int64)
        high = np.minimum(low + 1, in_size - 1)
        fraction = clamped - low
        np.add.at(matrix, (rows, low), 1.0 - fraction)
        np.add.at(matrix, (rows, high), fraction)
    elif settings.mode == "cubic":
        low = np.floor(coords).astype(np.int64)
        taps = low[:, None] + CUBIC_TAP_OFFSETS[None, :]
        weights = _cubic_kernel(coords[:, None] - taps, settings.cubic_coeff_a)
        if settings.exclude_outside:
            weights = np.where((taps >= 0) & (taps < in_size), weights, 0.0)
            weights /= weights.sum(axis=1, keepdims=True)
        np.add.at(matrix, (np.repeat(rows, len(CUBIC_TAP_OFFSETS)), np.clip(taps, 0, in_size - 1).reshape(-1)),
                  weights.reshape(-1))
    else:
        raise ValueError(f"unknown Resize mode '{settings.mode}'")
    return matrix.astype(np.float32)


def outside_positions(in_size: int, out_size: int, scale: float, settings: ResizeSettings,
                      roi: tuple[float, float]) -> np.ndarray:
    """Return a mask of the output positions that tf_crop_and_resize fills with the extrapolation value."""
    coords = source_coordinates(in_size, out_size, scale, settings, roi)
    return (coords < 0) | (coords > in_size - 1)


def _nearest_index(coords: np.ndarray, nearest_mode: str) -> np.ndarray:
    if nearest_mode == "round_prefer_floor":
        index = np.ceil(coords - 0.5)
    elif nearest_mode == "round_prefer_ceil":
        index = np.floor(coords + 0.5)
    elif nearest_mode == "floor":
        index = np.floor(coords)
    elif nearest_mode == "ceil":
        index = np.ceil(coords)
    else:
        raise ValueError(f"unknown nearest_mode '{nearest_mode}'")
    return index.astype(np.int64)


def _cubic_kernel(distance: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient `a` (ONNX's cubic_coeff_a)."""
    d = np.abs(distance)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _antialias_matrix(coords: np.ndarray, in_size: int, scale: float, settings: ResizeSettings) -> np.ndarray:
    """Downsampling with the kernel stretched by 1/scale, normalised to sum 1.

    Taps that fall outside the input read the edge value, as onnxruntime (1.32) and the ONNX reference
    implementation do, unless exclude_outside drops them.
    """
    support = (1.0 if settings.mode == "linear" else 2.0) / scale
    first = int(np.floor(coords.min() - support)) - 1
    last = int(np.ceil(coords.max() + support)) + 1
    taps = np.arange(first, last + 1)[None, :]
    distance = (taps - coords[:, None]) * scale
    if settings.mode == "linear":
        weights = np.clip(1.0 - np.abs(distance), 0.0, None)
    else:
        weights = _cubic_kernel(distance, settings.cubic_coeff_a)
    weights = weights / weights.sum(axis=1, keepdims=True)
    if settings.exclude_outside:
        weights = np.where((taps >= 0) & (taps < in_size), weights, 0.0)
        weights /= weights.sum(axis=1, keepdims=True)

    matrix = np.zeros((len(coords), in_size))
    rows = np.repeat(np.arange(len(coords)), taps.shape[1])
    np.add.at(matrix, (rows, np.tile(np.clip(taps[0], 0, in_size - 1), len(coords))), weights.reshape(-1))
    return matrix


class ResizeBackStep(Step):
    """Resize a batch shaped like the forward output back to the forward input's spatial size."""

    def run_torch(self, y, weights):
        import torch.nn.functional as F

        size = tuple(self.input_shape[1:])
        if self.attrs["mode"] == "nearest":
            return F.interpolate(y, size=size, mode="nearest")
        torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        return F.interpolate(y, size=size, mode=torch_mode, align_corners=False)

    def emit_onnx(self, builder, y):
        spatial = list(self.input_shape[1:])
        sizes = builder.constant(spatial, "int64", "sizes")
        axes = list(range(2, 2 + len(spatial)))
        if self.attrs["mode"] == "nearest":
            return builder.add("Resize", [y, "", "", sizes], mode="nearest", axes=axes,
                               coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        return builder.add("Resize", [y, "", "", sizes], mode="linear", axes=axes,
                           coordinate_transformation_mode="half_pixel")


@register("Resize", "Upsample")
def plan_resize(node: Node, graph: ModelGraph) -> Step:
    source = activation_input(node, graph)
    if node.inputs[0] != source:
        raise Unsupported("its activation is not the first input")
    input_shape, output_shape = graph.shapes[source], graph.shapes[node.outputs[0]]

    spatial = len(input_shape) - 1
    if spatial not in (1, 2, 3):
        raise Unsupported(f"its input has {spatial} spatial axes; 1 to 3 after batch and channel are supported")
    if input_shape[0] != output_shape[0]:
        raise Unsupported(f"it resizes the channel axis from {input_shape[0]} to {output_shape[0]}")

    settings = resize_settings(node, graph.opset)
    values = [graph.constant_value(name) if name and not graph.is_data(name) else None for name in node.inputs]
    _, scales, _ = resize_inputs(node, graph.opset, values)
    if scales is not None:
        rank = len(input_shape) + 1
        batch_scale = axis_scales(settings, [graph.recorded_batch, *input_shape], scales, None)[0]
        if batch_scale != 1.0 or len(scales) not in (rank, len(settings.axes or ())):
            raise Unsupported(f"its scales {scales.tolist()} resize the batch axis or do not fit rank {rank}")

    if settings.mode not in ("nearest", "linear", "cubic"):
        raise Unsupported(f"its mode '{settings.mode}' is not nearest, linear or cubic")
    # NOTE: a cubic forward Resize goes back with linear interpolation, the closest mode F.interpolate
    # computes the same way as onnxruntime.
    back_mode = "nearest" if settings.mode == "nearest" else "linear"
    return ResizeBackStep(node, input_shape, output_shape, attrs={"mode": back_mode})
