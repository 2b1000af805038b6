"""Rules for Pad, Resize/Upsample, Clip, element-wise activations, MeanVarianceNormalization and LayerNormalization.

Each rule is checked three ways on a one-node model. The torch and ONNX transposed models agree, the
transposed output has the forward input's shape, and a property of the inverse holds. That property is
exact values for the steps that are linear in y, and a numpy reference for the activations. The forward
torch executor is compared with onnxruntime on the same models, for the opsets where each operator
changed form.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tests.test_rules import forward_with_onnxruntime, single_node_model, transposed_both_ways

from onnxmark.executors import ForwardExecutor, ParameterStore, TransposedExecutor
from onnxmark.graph import import_graph
from onnxmark.plan import build_plan
from onnxmark.rules.activation import ATTRIBUTE_DEFAULTS
from onnxmark.rules.resize import ResizeSettings, sampling_matrix

TOLERANCE = 1e-4


def node_model(tmp_path, op_type, input_shape, inputs=(), attrs=None, opset=17):
    """Save a one-node model whose first input is the activation 'x'.

    `inputs` lists the other inputs in order: (name, value) pairs become initializers, "" omits an input.
    """
    names, initializers = ["x"], []
    for item in inputs:
        if item == "":
            names.append("")
            continue
        name, value = item
        names.append(name)
        initializers.append(numpy_helper.from_array(np.asarray(value), name))

    node = helper.make_node(op_type, names, ["y"], name="layer", **(attrs or {}))
    graph = helper.make_graph([node], "single", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    path = tmp_path / f"{op_type.lower()}_opset{opset}.onnx"
    onnx.save(model, path)
    return path


def forward_with_torch(path, x):
    graph = import_graph(path)
    with torch.no_grad():
        return ForwardExecutor(graph, ParameterStore(graph))(torch.from_numpy(x)).numpy()


def plan_issues(path) -> list[str]:
    return [issue.reason for issue in build_plan(import_graph(path), strict=False).issues]


def random_input(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture
def original_opset(monkeypatch):
    """Plan on the file's own opset: no lift to opset 11, so the old attribute forms reach the rules."""
    monkeypatch.setattr("onnxmark.graph.MIN_INTERNAL_OPSET", 1)


# ----- Pad -----

PAD_CASES = [
    # label, opset, mode, pads over the padded axes, axes input (opset 18+), constant value
    ("opset7_attribute", 7, "constant", [0, 0, 1, 2, 0, 0, 3, 0], None, None),
    ("opset7_reflect", 7, "reflect", [0, 0, 2, 1, 0, 0, 1, 2], None, None),
    ("opset11_edge", 11, "edge", [0, 0, 1, 1, 0, 0, 2, 0], None, None),
    ("opset11_channels", 11, "constant", [0, 1, 0, 0, 0, 2, 1, 1], None, 0.5),
    ("opset18_axes", 18, "constant", [2, 1, 0, 3], [2, -1], 0.0),
    ("opset19_wrap", 19, "wrap", [1, 2, 2, 1], [2, 3], None),
]


def pad_model(tmp_path, opset, mode, pads, axes, value):
    if opset < 11:
        return node_model(tmp_path, "Pad", [2, 3, 5, 6], attrs={"pads": pads, "mode": mode}, opset=opset)
    inputs = [("pads", np.array(pads, np.int64))]
    if value is not None or axes is not None:
        inputs.append(("value", np.array(value or 0.0, np.float32)))
    if axes is not None:
        inputs.append(("axes", np.array(axes, np.int64)))
    return node_model(tmp_path, "Pad", [2, 3, 5, 6], inputs, {"mode": mode}, opset)


@pytest.mark.parametrize("label,opset,mode,pads,axes,value", PAD_CASES, ids=[c[0] for c in PAD_CASES])
def test_pad_transposed_crops_border(tmp_path, label, opset, mode, pads, axes, value):
    path = pad_model(tmp_path, opset, mode, pads, axes, value)
    x = random_input((2, 3, 5, 6))
    padded = forward_with_onnxruntime(path, x)

    from_onnx, from_torch = transposed_both_ways(path, padded)

    assert from_onnx.shape == x.shape
    np.testing.assert_allclose(from_torch, from_onnx, atol=TOLERANCE)
    np.testing.assert_array_equal(from_onnx, x)


def test_pad_attribute_form_on_original_opset(tmp_path, original_opset):
    path = node_model(tmp_path, "Pad", [2, 3, 5, 6], attrs={"pads": [0, 0, 1, 2, 0, 0, 3, 0], "mode": "edge"},
                      opset=7)
    x = random_input((2, 3, 5, 6))
    padded = forward_with_onnxruntime(path, x)

    assert import_graph(path).opset == 7
    from_onnx, from_torch = transposed_both_ways(path, padded)

    np.testing.assert_array_equal(from_onnx, x)
    np.testing.assert_array_equal(from_torch, x)
    np.testing.assert_allclose(forward_with_torch(path, x), padded, atol=TOLERANCE)


def test_negative_pads_transposed_is_adjoint(tmp_path):
    pads = np.array([0, 0, -1, 2, 0, 1, 1, -2], np.int64)
    path = node_model(tmp_path, "Pad", [2, 3, 5, 6], [("pads", pads)], {"mode": "constant"}, opset=13)
    x = random_input((2, 3, 5, 6))
    fx = forward_with_onnxruntime(path, x)
    y = random_input(fx.shape, seed=1)

    from_onnx, from_torch = transposed_both_ways(path, y)

    assert fx.shape == (2, 4, 5, 6)
    assert from_onnx.shape == x.shape
    np.testing.assert_allclose(from_torch, from_onnx, atol=TOLERANCE)
    np.testing.assert_allclose(np.vdot(fx, y), np.vdot(x, from_onnx), rtol=1e-4)
    np.testing.assert_allclose(forward_with_torch(path, x), fx, atol=TOLERANCE)


@pytest.mark.parametrize("label,opset,mode,pads,axes,value", PAD_CASES, ids=[c[0] for c in PAD_CASES])
def test_pad_forward_matches_onnxruntime(tmp_path, label, opset, mode, pads, axes, value):
    path = pad_model(tmp_path, opset, mode, pads, axes, value)
    x = random_input((2, 3, 5, 6))

    np.testing.assert_allclose(forward_with_torch(path, x), forward_with_onnxruntime(path, x), atol=TOLERANCE)


def test_pad_of_batch_axis_is_rejected(tmp_path):
    pads = np.array([1, 0, 0, 0, 0, 0, 0, 0], np.int64)
    path = node_model(tmp_path, "Pad", [2, 3, 5, 6], [("pads", pads)], opset=13)

    (reason,) = plan_issues(path)

    assert "batch axis" in reason


# ----- Resize and Upsample -----

def resize_model(tmp_path, opset, attrs, scales=None, sizes=None, roi=None, shape=(2, 3, 4, 5), op_type="Resize"):
    if op_type == "Upsample" and opset < 9:
        return node_model(tmp_path, "Upsample", list(shape), attrs={"scales": scales, **attrs}, opset=opset)
    if op_type == "Upsample" or opset < 11:
        return node_model(tmp_path, op_type, list(shape), [("scales", np.array(scales, np.float32))], attrs, opset)
    inputs = [("roi", np.array(roi, np.float32)) if roi is not None else ""]
    inputs.append(("scales", np.array(scales, np.float32)) if scales is not None else "")
    if sizes is not None:
        inputs.append(("sizes", np.array(sizes, np.int64)))
    if opset == 11 and inputs[0] == "":
        inputs[0] = ("roi", np.zeros(0, np.float32))     # Resize-11 requires roi and scales to be named
    if opset == 11 and inputs[1] == "":
        inputs[1] = ("scales", np.zeros(0, np.float32))
    return node_model(tmp_path, "Resize", list(shape), inputs, attrs, opset)


NEAREST_UP_CASES = [
    # label, op type, opset, attributes, scales, sizes
    ("upsample_opset7", "Upsample", 7, {"mode": "nearest"}, [1.0, 1.0, 2.0, 3.0], None),
    ("upsample_opset9", "Upsample", 9, {"mode": "nearest"}, [1.0, 1.0, 3.0, 2.0], None),
    ("resize_opset11_scales", "Resize", 11, {"mode": "nearest"}, [1.0, 1.0, 2.0, 2.0], None),
    ("resize_opset13_sizes", "Resize", 13, {"mode": "nearest", "coordinate_transformation_mode": "asymmetric"},
     None, [2, 3, 12, 10]),
    ("resize_opset18_axes", "Resize", 18, {"mode": "nearest", "axes": [2, 3]}, [2.0, 4.0], None),
]


@pytest.mark.parametrize("label,op_type,opset,attrs,scales,sizes", NEAREST_UP_CASES,
                         ids=[c[0] for c in NEAREST_UP_CASES])
def test_nearest_upsampling_resized_back_exactly(tmp_path, label, op_type, opset, attrs, scales, sizes):
    path = resize_model(tmp_path, opset, attrs, scales, sizes, op_type=op_type)
    x = random_input((2, 3, 4, 5))
    upsampled = forward_with_onnxruntime(path, x)

    from_onnx, from_torch = transposed_both_ways(path, upsampled)

    assert upsampled.shape[2] > 4
    assert from_onnx.shape == x.shape
    np.testing.assert_allclose(from_torch, from_onnx, atol=TOLERANCE)
    np.testing.assert_array_equal(from_onnx, x)


@pytest.mark.parametrize("label,op_type,opset,attrs,scales,sizes", NEAREST_UP_CASES,
                         ids=[c[0] for c in NEAREST_UP_CASES])
def test_nearest_upsampling_forward_matches_onnxruntime(tmp_path, label, op_type, opset, attrs, scales, sizes):
    path = resize_model(tmp_path, opset, attrs, scales, sizes, op_type=op_type)
    x = random_input((2, 3, 4, 5))

    np.testing.assert_array_equal(forward_with_torch(path, x), forward_with_onnxruntime(path, x))


@pytest.mark.parametrize("op_type,opset,attrs", [
    ("Upsample", 7, {"mode": "nearest", "scales": [1.0, 1.0, 2.0, 2.0]}),
    ("Upsample", 9, {"mode": "linear"}),
    ("Resize", 10, {"mode": "linear"}),
    ("Resize", 10, {"mode": "nearest"}),
])
def test_upsample_on_original_opset(tmp_path, original_opset, op_type, opset, attrs):
    if "scales" in attrs:
        path = node_model(tmp_path, op_type, [2, 3, 4, 5], attrs=attrs, opset=opset)
    else:
        path = node_model(tmp_path, op_type, [2, 3, 4, 5], [("scales", np.array([1, 1, 2, 3], np.float32))],
                          attrs, opset)
    x = random_input((2, 3, 4, 5))
    upsampled = forward_with_onnxruntime(path, x)

    assert import_graph(path).opset == opset
    from_onnx, from_torch = transposed_both_ways(path, upsampled)

    assert from_onnx.shape == x.shape
    np.testing.assert_allclose(from_torch, from_onnx, atol=TOLERANCE)
    np.testing.assert_allclose(forward_with_torch(path, x), upsampled, atol=TOLERANCE)


@pytest.mark.parametrize("mode,scales", [("linear", [1, 1, 2, 2]), ("nearest", [1, 1, 1.5, 2.5])])
def test_lifted_upsample_forward_matches_file(tmp_path, mode, scales):
    path = node_model(tmp_path, "Upsample", [2, 3, 4, 5], [("scales", np.array(scales, np.float32))],
                      {"mode": mode}, opset=9)
    x = random_input((2, 3, 4, 5))

    np.testing.assert_allclose(forward_with_torch(path, x), forward_with_onnxruntime(path, x), atol=TOLERANCE)


def linear_resize_reference(y, in_shape):
    """Half-pixel linear resizing of the last two axes to `in_shape`, by separable matrices."""
    settings = ResizeSettings(mode="linear")
    rows = sampling_matrix(y.shape[2], in_shape[0], in_shape[0] / y.shape[2], settings)
    columns = sampling_matrix(y.shape[3], in_shape[1], in_shape[1] / y.shape[3], settings)
    return np.einsum("hi,ncij,wj->nchw", rows, y, columns)


@pytest.mark.parametrize("opset,attrs,scales,sizes", [
    (11, {"mode": "linear"}, [1.0, 1.0, 0.5, 0.6], None),
    (13, {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [2, 3, 7, 9]),
    (18, {"mode": "cubic", "axes": [3, 2]}, [1.5, 2.0], None),
])
def test_interpolating_resize_goes_back_linearly(tmp_path, opset, attrs, scales, sizes):
    path = resize_model(tmp_path, opset, attrs, scales, sizes, shape=(2, 3, 6, 10))
    x = random_input((2, 3, 6, 10))
    resized = forward_with_onnxruntime(path, x)
    y = random_input(resized.shape, seed=1)

    from_onnx, from_torch = transposed_both_ways(path, y)

    assert from_onnx.shape == x.shape
    np.testing.assert_allclose(from_torch, from_onnx, atol=TOLERANCE)
    np.testing.assert_allclose(from_onnx, linear_resize_reference(y, (6, 10)), atol=TOLERANCE)


RESIZE_FORWARD_CASES = [
    ("nearest_round_prefer_floor", 11, {"mode": "nearest"}, None, [2, 3, 7, 3], None),
    ("nearest_round_prefer_ceil", 13, {"mode": "nearest", "nearest_mode": "round_prefer_ceil"},
     [1.0, 1.0, 1.7, 0.6], None, None),
    ("nearest_ceil_align_corners", 13, {"mode": "nearest", "nearest_mode": "ceil",
                                        "coordinate_transformation_mode": "align_corners"}, None, [2, 3, 9, 8], None),
    ("linear_half_pixel_down", 13, {"mode": "linear"}, [1.0, 1.0, 0.5, 0.75], None, None),
    ("linear_asymmetric", 13, {"mode": "linear", "coordinate_transformation_mode": "asymmetric"},
     None, [2, 3, 9, 7], None),
    ("linear_pytorch_half_pixel", 13, {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
     None, [2, 3, 1, 11], None),
    ("cubic", 13, {"mode": "cubic"}, [1.0, 1.0, 1.5, 2.0], None, None),
    ("cubic_exclude_outside", 13, {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5},
     [1.0, 1.0, 0.8, 1.3], None, None),
    ("crop_and_resize", 13, {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize",
                             "extrapolation_value": -2.0}, None, [2, 3, 5, 6], [0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3]),
    ("linear_antialias", 18, {"mode": "linear", "antialias": 1, "axes": [2, 3]}, [0.5, 0.4], None, None),
    ("cubic_antialias", 18, {"mode": "cubic", "antialias": 1, "axes": [2, 3]}, [0.6, 0.5], None, None),
    ("not_larger_policy", 18, {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
     None, [9, 9], None),
    ("half_pixel_symmetric", 19, {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
     [1.0, 1.0, 1.3, 0.7], None, None),
]


@pytest.mark.parametrize("label,opset,attrs,scales,sizes,roi", RESIZE_FORWARD_CASES,
                         ids=[c[0] for c in RESIZE_FORWARD_CASES])
def test_resize_forward_matches_onnxruntime(tmp_path, label, opset, attrs, scales, sizes, roi):
    if attrs.get("axes") and sizes is not None:
        sizes = sizes[:len(attrs["axes"])]
    path = resize_model(tmp_path, opset, attrs, scales, sizes, roi, shape=(2, 3, 6, 10))
    x = random_input((2, 3, 6, 10))

    np.testing.assert_allclose(forward_with_torch(path, x), forward_with_onnxruntime(path, x), atol=TOLERANCE)


def test_resize_sizes_follow_training_batch(tmp_path):
    path = resize_model(tmp_path, 13, {"mode": "linear"}, sizes=[1, 3, 9, 7], shape=(1, 3, 4, 5))
    batch = random_input((3, 3, 4, 5))

    from_torch = forward_with_torch(path, batch)

    assert from_torch.shape == (3, 3, 9, 7)
    for index in range(3):
        expected = forward_with_onnxruntime(path, batch[index:index + 1])
        np.testing.assert_allclose(from_torch[index:index + 1], expected, atol=TOLERANCE)


def test_resize_of_channels_is_rejected(tmp_path):
    path = resize_model(tmp_path, 13, {"mode": "nearest"}, [1.0, 2.0, 1.0, 1.0])

    (reason,) = plan_issues(path)

    assert "channel axis" in reason


# ----- Clip -----

CLIP_CASES = [
    # label, opset, bounds as attributes (before opset 11) or inputs, expected (min, max)
    ("opset6_attributes", 6, {"min": -0.5, "max": 0.8}, (-0.5, 0.8)),
    ("opset6_min_only", 6, {"min": 0.0}, (0.0, None)),
    ("opset11_min_only", 11, [("low", np.float32(-0.3))], (-0.3, None)),
    ("opset13_max_only", 13, ["", ("high", np.float32(0.4))], (None, 0.4)),
    ("opset13_both", 13, [("low", np.float32(0.0)), ("high", np.float32(6.0))], (0.0, 6.0)),
]


def clip_model(tmp_path, opset, bounds):
    if isinstance(bounds, dict):
        return node_model(tmp_path, "Clip", [2, 3, 4], attrs=bounds, opset=opset)
    return node_model(tmp_path, "Clip", [2, 3, 4], bounds, opset=opset)


@pytest.mark.parametrize("label,opset,bounds,expected", CLIP_CASES, ids=[c[0] for c in CLIP_CASES])
def test_clip_transposed_is_same_clip(tmp_path, label, opset, bounds, expected):
    path = clip_model(tmp_path, opset, bounds)
    y = 4 * random_input((2, 3, 4))

    from_onnx, from_torch = transposed_both_ways(path, y)

    assert from_onnx.shape == (2, 3, 4)
    np.testing.assert_allclose(from_torch, from_onnx, atol=TOLERANCE)
    np.testing.assert_allclose(from_onnx, np.clip(y, *expected), atol=TOLERANCE)


@pytest.mark.parametrize("label,opset,bounds,expected", CLIP_CASES, ids=[c[0] for c in CLIP_CASES])
def test_clip_forward_matches_onnxruntime(tmp_path, label, opset, bounds, expected):
    path = clip_model(tmp_path, opset, bounds)
    x = 4 * random_input((2, 3, 4))

    np.testing.assert_allclose(forward_with_torch(path, x), forward_with_onnxruntime(path, x), atol=TOLERANCE)


def test_clip_attributes_on_original_opset(tmp_path, original_opset):
    path = clip_model(tmp_path, 6, {"min": -0.5, "max": 0.8})
    y = 4 * random_input((2, 3, 4))

    assert import_graph(path).opset == 6
    from_onnx, from_torch = transposed_both_ways(path, y)

    np.testing.assert_allclose(from_onnx, np.clip(y, -0.5, 0.8), atol=TOLERANCE)
    np.testing.assert_allclose(from_torch, np.clip(y, -0.5, 0.8), atol=TOLERANCE)
    np.testing.assert_allclose(forward_with_torch(path, y), np.clip(y, -0.5, 0.8), atol=TOLERANCE)


# ----- element-wise activations -----

SELU_ALPHA, SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875


def softplus(x):
    return np.logaddexp(0.0, x)


def gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


ACTIVATION_CASES = [
    # op type, opset, attributes, numpy reference
    ("Selu", 6, {}, lambda x: SELU_GAMMA * np.where(x > 0, x, SELU_ALPHA * np.expm1(x))),
    ("Selu", 22, {"alpha": 2.0, "gamma": 0.5}, lambda x: 0.5 * np.where(x > 0, x, 2.0 * np.expm1(x))),
    ("Elu", 6, {}, lambda x: np.where(x > 0, x, np.expm1(x))),
    ("Elu", 22, {"alpha": 0.3}, lambda x: np.where(x > 0, x, 0.3 * np.expm1(x))),
    ("HardSigmoid", 6, {}, lambda x: np.clip(0.2 * x + 0.5, 0, 1)),
    ("HardSigmoid", 22, {"alpha": 0.3, "beta": 0.4}, lambda x: np.clip(0.3 * x + 0.4, 0, 1)),
    ("HardSwish", 14, {}, lambda x: x * np.clip(x / 6 + 0.5, 0, 1)),
    ("HardSwish", 22, {}, lambda x: x * np.clip(x / 6 + 0.5, 0, 1)),
    ("Gelu", 20, {}, gelu),
    ("Gelu", 20, {"approximate": "tanh"}, lambda x: gelu(x, "tanh")),
    ("Erf", 9, {}, np.vectorize(math.erf)),
    ("Erf", 13, {}, np.vectorize(math.erf)),
    ("Softplus", 7, {}, softplus),
    ("Softplus", 22, {}, softplus),
    ("Softsign", 7, {}, lambda x: x / (1 + np.abs(x))),
    ("Softsign", 22, {}, lambda x: x / (1 + np.abs(x))),
    ("ThresholdedRelu", 10, {}, lambda x: np.where(x > 1.0, x, 0.0)),
    ("ThresholdedRelu", 22, {"alpha": 0.5}, lambda x: np.where(x > 0.5, x, 0.0)),
    ("Celu", 12, {}, lambda x: np.maximum(x, 0) + np.minimum(0, np.expm1(x))),
    ("Celu", 12, {"alpha": 2.0}, lambda x: np.maximum(x, 0) + np.minimum(0, 2.0 * np.expm1(x / 2.0))),
    ("Mish", 18, {}, lambda x: x * np.tanh(softplus(x))),
    ("Mish", 22, {}, lambda x: x * np.tanh(softplus(x))),
    ("LeakyRelu", 16, {"alpha": 0.2}, lambda x: np.where(x >= 0, x, 0.2 * x)),
]
ACTIVATION_IDS = [f"{op}_opset{opset}_{'_'.join(attrs) or 'defaults'}" for op, opset, attrs, _ in ACTIVATION_CASES]


@pytest.mark.parametrize("op_type,opset,attrs,reference", ACTIVATION_CASES, ids=ACTIVATION_IDS)
def test_activation_transposed_is_same_function(tmp_path, op_type, opset, attrs, reference):
    path = node_model(tmp_path, op_type, [2, 3, 4, 4], attrs=attrs, opset=opset)
    y = 3 * random_input((2, 3, 4, 4))

    from_onnx, from_torch = transposed_both_ways(path, y)

    assert from_onnx.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(from_torch, from_onnx, atol=TOLERANCE)
    np.testing.assert_allclose(from_onnx, reference(y.astype(np.float64)), atol=TOLERANCE)


@pytest.mark.parametrize("op_type,opset,attrs,reference", ACTIVATION_CASES, ids=ACTIVATION_IDS)
def test_activation_forward_matches_onnxruntime(tmp_path, op_type, opset, attrs, reference):
    path = node_model(tmp_path, op_type, [2, 3, 4, 4], attrs=attrs, opset=opset)
    x = 3 * random_input((2, 3, 4, 4))

    np.testing.assert_allclose(forward_with_torch(path, x), forward_with_onnxruntime(path, x), atol=TOLERANCE)


def test_activation_defaults_match_onnx_schema():
    for op_type, defaults in ATTRIBUTE_DEFAULTS.items():
        schema = onnx.defs.get_schema(op_type)
        for name, value in defaults.items():
            default = helper.get_attribute_value(schema.attributes[name].default_value)
            default = default.decode() if isinstance(default, bytes) else default
            assert default == pytest.approx(value) if isinstance(value, float) else default == value, (op_type, name)


def test_celu_with_zero_alpha_goes_back_as_identity(tmp_path):
    path = node_model(tmp_path, "Celu", [2, 3, 4], attrs={"alpha": 0.0}, opset=12)
    y = random_input((2, 3, 4))

    from_onnx, from_torch = transposed_both_ways(path, y)

    np.testing.assert_array_equal(from_onnx, y)
    np.testing.assert_array_equal(from_torch, y)


@pytest.mark.parametrize("opset,slope", [
    (9, np.array([0.25], np.float32)),
    (16, np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1, 1)),
])
def test_prelu_transposed_shares_slope(tmp_path, opset, slope):
    path = single_node_model(tmp_path, "PRelu", [2, 3, 4, 4], {"slope": slope}, {}, opset=opset)
    y = random_input((2, 3, 4, 4))

    from_onnx, from_torch = transposed_both_ways(path, y)

    assert from_onnx.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(from_torch, from_onnx, atol=TOLERANCE)
    np.testing.assert_allclose(from_onnx, np.where(y < 0, slope * y, y), atol=TOLERANCE)
    np.testing.assert_allclose(forward_with_torch(path, y), forward_with_onnxruntime(path, y), atol=TOLERANCE)


def test_prelu_slope_trains_in_both_executors(tmp_path):
    slope = np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1, 1)
    path = single_node_model(tmp_path, "PRelu", [2, 3, 4, 4], {"slope": slope}, {})
    graph = import_graph(path)
    store = ParameterStore(graph)
    negative = -torch.ones(2, 3, 4, 4)

    ForwardExecutor(graph, store)(negative).sum().backward()
    forward_grad = store.tensors["slope"].grad.clone()
    store.tensors["slope"].grad = None
    TransposedExecutor(graph, store, build_plan(graph))(negative).sum().backward()

    np.testing.assert_allclose(forward_grad.numpy().reshape(-1), [-32.0, -32.0, -32.0])
    np.testing.assert_allclose(store.tensors["slope"].grad.numpy().reshape(-1), [-32.0, -32.0, -32.0])


# ----- MeanVarianceNormalization and LayerNormalization -----

@pytest.mark.parametrize("opset,attrs", [(9, {}), (13, {"axes": [2, 3]})])
def test_mean_variance_normalization_goes_back_as_identity(tmp_path, opset, attrs):
    path = node_model(tmp_path, "MeanVarianceNormalization", [2, 3, 4, 5], attrs=attrs, opset=opset)
    x = 2 + 3 * random_input((2, 3, 4, 5))
    y = random_input((2, 3, 4, 5), seed=1)

    from_onnx, from_torch = transposed_both_ways(path, y)

    np.testing.assert_array_equal(from_onnx, y)
    np.testing.assert_array_equal(from_torch, y)
    np.testing.assert_allclose(forward_with_torch(path, x), forward_with_onnxruntime(path, x), atol=TOLERANCE)


LAYER_NORM_CASES = [
    # label, attributes, scale shape, with bias
    ("last_axis", {}, (5,), True),
    ("from_channels", {"axis": 1, "epsilon": 1e-3}, (3, 4, 5), True),
    ("no_bias", {"axis": -2}, (4, 5), False),
]


def layer_norm_model(tmp_path, attrs, scale_shape, with_bias):
    rng = np.random.default_rng(7)
    weights = {"scale": rng.uniform(0.5, 2.0, scale_shape).astype(np.float32)}
    if with_bias:
        weights["bias"] = rng.normal(size=scale_shape).astype(np.float32)
    path = single_node_model(tmp_path, "LayerNormalization", [2, 3, 4, 5], weights, attrs, opset=17)
    return path, weights


@pytest.mark.parametrize("label,attrs,scale_shape,with_bias", LAYER_NORM_CASES, ids=[c[0] for c in LAYER_NORM_CASES])
def test_layer_norm_inverse_undoes_scale_and_bias(tmp_path, label, attrs, scale_shape, with_bias):
    path, weights = layer_norm_model(tmp_path, attrs, scale_shape, with_bias)
    x = 1 + 2 * random_input((2, 3, 4, 5))
    y = forward_with_onnxruntime(path, x)

    from_onnx, from_torch = transposed_both_ways(path, y)

    epsilon = attrs.get("epsilon", 1e-5)
    axes = tuple(range(4 - len(scale_shape), 4))
    normalized = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + epsilon)
    assert from_onnx.shape == x.shape
    np.testing.assert_allclose(from_torch, from_onnx, atol=TOLERANCE)
    np.testing.assert_allclose(from_onnx, normalized * np.sqrt(1 + epsilon), atol=TOLERANCE)


@pytest.mark.parametrize("label,attrs,scale_shape,with_bias", LAYER_NORM_CASES, ids=[c[0] for c in LAYER_NORM_CASES])
def test_layer_norm_forward_matches_onnxruntime(tmp_path, label, attrs, scale_shape, with_bias):
    path, _ = layer_norm_model(tmp_path, attrs, scale_shape, with_bias)
    x = 1 + 2 * random_input((2, 3, 4, 5))

    np.testing.assert_allclose(forward_with_torch(path, x), forward_with_onnxruntime(path, x), atol=TOLERANCE)


def test_layer_norm_weights_train_in_transposed_model(tmp_path):
    path, _ = layer_norm_model(tmp_path, {}, (5,), True)
    graph = import_graph(path)
    store = ParameterStore(graph)

    TransposedExecutor(graph, store, build_plan(graph))(torch.ones(2, 3, 4, 5)).sum().backward()

    assert store.tensors["scale"].grad is not None
    assert store.tensors["bias"].grad is not None
    assert float(store.tensors["scale"].grad.abs().sum()) > 0
