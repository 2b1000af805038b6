"""Transposition rules checked on small hand-built ONNX graphs.

For a linear layer without bias, the transposed layer must be the adjoint: <f(x), y> == <x, f^T(y)>.
That identity checks the ConvTranspose pads, output padding, strides, dilations and groups at once.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxmark.errors import OnnxmarkError
from onnxmark.executors import ParameterStore, TransposedExecutor
from onnxmark.graph import import_graph
from onnxmark.plan import build_plan
from onnxmark.transposed_onnx import build_transposed_model, run_transposed


def single_node_model(tmp_path, op_type, input_shape, weights, attrs, name="layer.onnx", opset=17):
    initializers = [numpy_helper.from_array(value, key) for key, value in weights.items()]
    node = helper.make_node(op_type, ["x", *weights], ["y"], name="layer", **attrs)
    graph = helper.make_graph([node], "single", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    onnx.save(model, path)
    return path


def forward_with_onnxruntime(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def transposed_both_ways(path, y):
    graph = import_graph(path)
    plan = build_plan(graph)
    from_onnx = run_transposed(build_transposed_model(plan, graph), y)
    store = ParameterStore(graph)
    with torch.no_grad():
        from_torch = TransposedExecutor(graph, store, plan)(torch.from_numpy(y)).numpy()
    return from_onnx, from_torch


CONV_CASES = [
    ("plain", [1, 3, 12, 12], (4, 3, 3, 3), {}),
    ("stride2_remainder", [1, 2, 13, 11], (5, 2, 3, 3), {"strides": [2, 2]}),
    ("dilation", [1, 2, 14, 14], (3, 2, 3, 3), {"dilations": [2, 2]}),
    ("groups", [1, 4, 10, 10], (6, 2, 3, 3), {"group": 2}),
    ("depthwise_stride", [1, 4, 9, 9], (4, 1, 3, 3), {"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("asymmetric_pads", [1, 2, 10, 9], (3, 2, 4, 3), {"pads": [0, 1, 2, 1], "strides": [2, 1]}),
    ("same_upper", [1, 1, 9, 9], (2, 1, 4, 4), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("conv1d", [1, 3, 17], (2, 3, 5), {"strides": [3], "pads": [2, 1]}),
]


@pytest.mark.parametrize("label,input_shape,weight_shape,attrs", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_transposed_is_adjoint(tmp_path, label, input_shape, weight_shape, attrs):
    rng = np.random.default_rng(1)
    weight = rng.normal(size=weight_shape).astype(np.float32)
    path = single_node_model(tmp_path, "Conv", input_shape, {"w": weight}, attrs)
    x = rng.normal(size=input_shape).astype(np.float32)
    fx = forward_with_onnxruntime(path, x)
    y = rng.normal(size=fx.shape).astype(np.float32)

    from_onnx, from_torch = transposed_both_ways(path, y)

    assert from_onnx.shape == tuple(input_shape)
    np.testing.assert_allclose(from_torch, from_onnx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.vdot(fx, y), np.vdot(x, from_onnx), rtol=1e-4)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_transposed_is_adjoint(tmp_path, trans_b):
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(7, 5) if trans_b else (5, 7)).astype(np.float32)
    path = single_node_model(tmp_path, "Gemm", [2, 5], {"w": weight}, {"transB": trans_b, "alpha": 0.5})
    x = rng.normal(size=(2, 5)).astype(np.float32)
    fx = forward_with_onnxruntime(path, x)
    y = rng.normal(size=fx.shape).astype(np.float32)

    from_onnx, from_torch = transposed_both_ways(path, y)

    np.testing.assert_allclose(from_torch, from_onnx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.vdot(fx, y), np.vdot(x, from_onnx), rtol=1e-4)


def test_gemm_bias_is_subtracted_first(tmp_path):
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    bias = rng.normal(size=(4,)).astype(np.float32)
    path = single_node_model(tmp_path, "Gemm", [1, 3], {"w": weight, "b": bias}, {"transB": 1})
    y = rng.normal(size=(2, 4)).astype(np.float32)

    from_onnx, _ = transposed_both_ways(path, y)

    np.testing.assert_allclose(from_onnx, (y - bias) @ weight, rtol=1e-5, atol=1e-5)


def test_matmul_transposed_is_adjoint(tmp_path):
    rng = np.random.default_rng(4)
    weight = rng.normal(size=(6, 3)).astype(np.float32)
    path = single_node_model(tmp_path, "MatMul", [2, 6], {"w": weight}, {})
    x = rng.normal(size=(2, 6)).astype(np.float32)
    fx = forward_with_onnxruntime(path, x)
    y = rng.normal(size=fx.shape).astype(np.float32)

    from_onnx, from_torch = transposed_both_ways(path, y)

    np.testing.assert_allclose(from_torch, from_onnx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.vdot(fx, y), np.vdot(x, from_onnx), rtol=1e-4)


def test_batch_norm_inverse_uses_unit_statistics(tmp_path):
    rng = np.random.default_rng(5)
    scale, bias = rng.uniform(0.5, 2, 3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    mean, var = rng.normal(size=3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    weights = {"scale": scale, "bias": bias, "mean": mean, "var": var}
    path = single_node_model(tmp_path, "BatchNormalization", [1, 3, 4, 4], weights, {"epsilon": 1e-3})
    y = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)

    from_onnx, from_torch = transposed_both_ways(path, y)

    expected = (y - bias[:, None, None]) * np.sqrt(1 + 1e-3) / scale[:, None, None]
    np.testing.assert_allclose(from_onnx, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_torch, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op_type,constant,activation_first", [
    ("Add", 1.5, True), ("Sub", 0.5, True), ("Sub", 0.5, False), ("Mul", 2.0, False), ("Div", 4.0, True),
])
def test_constant_operand_inverted_exactly(tmp_path, op_type, constant, activation_first):
    value = np.full((1, 3, 1, 1), constant, np.float32)
    inputs = ["x", "c"] if activation_first else ["c", "x"]
    node = helper.make_node(op_type, inputs, ["y"], name="affine")
    graph = helper.make_graph([node], "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(value, "c")])
    path = tmp_path / "affine.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.random.default_rng(6).normal(size=(1, 3, 4, 4)).astype(np.float32)

    from_onnx, from_torch = transposed_both_ways(path, forward_with_onnxruntime(path, x))

    np.testing.assert_allclose(from_onnx, x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_torch, x, rtol=1e-5, atol=1e-5)


def test_max_pool_upsamples_to_pooled_input_size(tmp_path):
    path = single_node_model(tmp_path, "MaxPool", [1, 2, 7, 7], {}, {"kernel_shape": [3, 3], "strides": [2, 2]})
    y = np.arange(2 * 2 * 3 * 3, dtype=np.float32).reshape(2, 2, 3, 3)

    from_onnx, from_torch = transposed_both_ways(path, y)

    assert from_onnx.shape == (2, 2, 7, 7)
    np.testing.assert_array_equal(from_onnx, from_torch)
    np.testing.assert_array_equal(from_onnx[0, 0, :, 0], y[0, 0, [0, 0, 0, 1, 1, 2, 2], 0])


def unsupported_model(tmp_path):
    """A model whose activation path contains two nodes without rules (Einsum and Hardmax)."""
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [
        helper.make_node("Einsum", ["x", "w"], ["a"], name="mix", equation="ij,jk->ik"),
        helper.make_node("Hardmax", ["a"], ["b"], name="winner"),
        helper.make_node("Gemm", ["b", "w"], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "unsupported", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    path = tmp_path / "unsupported.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_plan_lists_every_unsupported_node(tmp_path):
    path = unsupported_model(tmp_path)

    with pytest.raises(OnnxmarkError) as raised:
        build_plan(import_graph(path))

    message = str(raised.value)
    assert "node 'mix' (op Einsum, opset 17)" in message
    assert "node 'winner' (op Hardmax, opset 17)" in message
    assert "Supported op types:" in message


def selection_model(tmp_path, op_type, input_shape, constants, attrs, opset=17):
    initializers = [numpy_helper.from_array(np.asarray(value), key) for key, value in constants.items()]
    node = helper.make_node(op_type, ["x", *constants], ["y"], name="select", **attrs)
    graph = helper.make_graph([node], "select", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    path = tmp_path / f"{op_type}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


SELECTION_CASES = [
    ("class_token", "Gather", [1, 5, 3], {"i": np.array(0, np.int64)}, {"axis": 1}),
    ("negative_index", "Gather", [1, 5, 3], {"i": np.array(-2, np.int64)}, {"axis": -2}),
    ("index_run", "Gather", [1, 4, 6], {"i": np.array([2, 3, 4], np.int64)}, {"axis": 2}),
    ("drop_class_token", "Slice", [1, 5, 3], {"s": np.array([1], np.int64), "e": np.array([2**62], np.int64),
                                              "a": np.array([1], np.int64)}, {}),
    ("two_axes", "Slice", [1, 2, 6, 6], {"s": np.array([1, -4], np.int64), "e": np.array([5, -1], np.int64),
                                         "a": np.array([2, 3], np.int64)}, {}),
]


@pytest.mark.parametrize("label,op_type,input_shape,constants,attrs", SELECTION_CASES,
                         ids=[case[0] for case in SELECTION_CASES])
def test_selection_transposed_is_adjoint(tmp_path, label, op_type, input_shape, constants, attrs):
    rng = np.random.default_rng(7)
    path = selection_model(tmp_path, op_type, input_shape, constants, attrs)
    x = rng.normal(size=input_shape).astype(np.float32)
    fx = forward_with_onnxruntime(path, x)
    y = rng.normal(size=fx.shape).astype(np.float32)

    from_onnx, from_torch = transposed_both_ways(path, y)

    assert from_onnx.shape == tuple(input_shape)
    np.testing.assert_array_equal(from_torch, from_onnx)
    np.testing.assert_allclose(np.vdot(fx, y), np.vdot(x, from_onnx), rtol=1e-5)


def test_gather_of_scattered_indices_is_refused(tmp_path):
    path = selection_model(tmp_path, "Gather", [1, 5, 3], {"i": np.array([0, 2], np.int64)}, {"axis": 1})

    plan = build_plan(import_graph(path), strict=False)

    assert "consecutive indices" in plan.issues[0].reason
