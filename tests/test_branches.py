"""Nodes with several activation inputs: residual branches, Concat, and operands frozen from real data."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxmark.errors import OnnxmarkError
from onnxmark.executors import ParameterStore, TransposedExecutor
from onnxmark.frozen import record_frozen
from onnxmark.graph import import_graph
from onnxmark.plan import build_plan
from onnxmark.transposed_onnx import build_transposed_model, run_transposed

RNG = np.random.default_rng(11)


def save_model(tmp_path, nodes, input_shape, weights, name="model.onnx"):
    initializers = [numpy_helper.from_array(value, key) for key, value in weights.items()]
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def conv_weight(out_channels, in_channels, size=3):
    return RNG.normal(size=(out_channels, in_channels, size, size)).astype(np.float32)


def planned(path, data):
    graph = import_graph(path)
    plan = build_plan(graph)
    plan.frozen_values = record_frozen(plan, graph, data)
    return graph, plan


def transposed_both_ways(graph, plan, y):
    from_onnx = run_transposed(build_transposed_model(plan, graph), y.reshape(len(y), -1))
    with torch.no_grad():
        from_torch = TransposedExecutor(graph, ParameterStore(graph), plan)(torch.from_numpy(y)).numpy()
    return from_onnx, from_torch


def residual_model(tmp_path, shortcut_layer=False):
    """x -> stem -> s; s -> conv_a -> relu -> conv_b -> r; y = s + r.

    The shortcut is the identity, or with `shortcut_layer` a 1x1 conv of s as in a downsampling block.
    """
    nodes = [
        helper.make_node("Conv", ["x", "w_stem"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["s", "w_a"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
        helper.make_node("Conv", ["a_relu", "w_b"], ["r"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    weights = {"w_stem": conv_weight(4, 1), "w_a": conv_weight(4, 4), "w_b": conv_weight(4, 4)}
    shortcut = "s"
    if shortcut_layer:
        nodes.append(helper.make_node("Conv", ["s", "w_short"], ["s_short"], name="conv_short"))
        weights["w_short"] = conv_weight(4, 4, 1)
        shortcut = "s_short"
    nodes.append(helper.make_node("Add", [shortcut, "r"], ["y"], name="residual"))
    return save_model(tmp_path, nodes, [1, 1, 6, 6], weights)


def intermediate_mean(path, tensor, data):
    """Compute an intermediate tensor's mean over `data` with onnxruntime, one sample at a time."""
    import onnxruntime as ort

    exposed = onnx.load(path)
    exposed.graph.output.append(onnx.ValueInfoProto(name=tensor))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([tensor], {"x": data[i:i + 1]})[0] for i in range(len(data))]).mean(axis=0)


def test_identity_shortcut_is_followed(tmp_path):
    path = residual_model(tmp_path)
    data = RNG.uniform(0, 1, (256, 1, 6, 6)).astype(np.float32)

    graph, plan = planned(path, data)

    residual = next(step for step in plan.steps if step.node.name == "residual")
    assert residual.sources == ("s",)
    assert residual.frozen == ("r",)
    assert [step.node.name for step in plan.steps] == ["residual", "stem"]
    np.testing.assert_allclose(plan.frozen_values["r"], intermediate_mean(path, "r", data), rtol=1e-4, atol=1e-4)


def test_identity_shortcut_subtracts_frozen_residual(tmp_path):
    path = residual_model(tmp_path)
    graph, plan = planned(path, RNG.uniform(0, 1, (256, 1, 6, 6)).astype(np.float32))
    y = RNG.normal(size=(3, 4, 6, 6)).astype(np.float32)

    from_onnx, from_torch = transposed_both_ways(graph, plan, y)

    np.testing.assert_allclose(from_torch, from_onnx, rtol=1e-4, atol=1e-4)
    shifted = torch.from_numpy(y - plan.frozen_values["r"][None])
    expected = torch.nn.functional.conv_transpose2d(shifted, torch.tensor(graph.constants["w_stem"]), padding=1)
    np.testing.assert_allclose(from_onnx, expected.numpy(), rtol=1e-4, atol=1e-3)


def test_downsampling_block_freezes_shortcut(tmp_path):
    path = residual_model(tmp_path, shortcut_layer=True)
    data = RNG.uniform(0, 1, (256, 1, 6, 6)).astype(np.float32)
    graph, plan = planned(path, data)
    y = RNG.normal(size=(3, 4, 6, 6)).astype(np.float32)

    from_onnx, from_torch = transposed_both_ways(graph, plan, y)

    assert [step.node.name for step in plan.steps] == ["residual", "conv_b", "relu_a", "conv_a", "stem"]
    np.testing.assert_allclose(plan.frozen_values["s_short"], intermediate_mean(path, "s_short", data),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(from_torch, from_onnx, rtol=1e-4, atol=1e-4)
    shifted = torch.from_numpy(y - plan.frozen_values["s_short"][None])
    weights = {name: torch.tensor(graph.constants[name]) for name in ("w_stem", "w_a", "w_b")}
    expected = torch.nn.functional.conv_transpose2d(shifted, weights["w_b"], padding=1)
    expected = torch.nn.functional.conv_transpose2d(torch.relu(expected), weights["w_a"], padding=1)
    expected = torch.nn.functional.conv_transpose2d(expected, weights["w_stem"], padding=1)
    np.testing.assert_allclose(from_onnx, expected.numpy(), rtol=1e-4, atol=1e-3)


def test_linear_block_follows_residual_branch(tmp_path):
    """A transformer-style block, y = x + W2 relu(W1 x), follows the branch with the layers."""
    nodes = [
        helper.make_node("MatMul", ["x", "w_1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
        helper.make_node("MatMul", ["h_relu", "w_2"], ["r"], name="down"),
        helper.make_node("Add", ["x", "r"], ["y"], name="residual"),
    ]
    weights = {"w_1": RNG.normal(size=(4, 8)).astype(np.float32), "w_2": RNG.normal(size=(8, 4)).astype(np.float32)}
    graph, plan = planned(save_model(tmp_path, nodes, [1, 4], weights), RNG.normal(size=(256, 4)).astype(np.float32))

    assert [step.node.name for step in plan.steps] == ["residual", "down", "relu", "up"]
    assert plan.steps[0].frozen == ("x",)


def test_concat_of_two_branches_is_the_adjoint(tmp_path):
    """Two convolutions of one input, concatenated: split back, transposed, and summed at the fork."""
    nodes = [
        helper.make_node("Conv", ["x", "w_1"], ["left"], name="expand_1x1"),
        helper.make_node("Conv", ["x", "w_3"], ["right"], name="expand_3x3", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["left", "right"], ["y"], name="fire", axis=1),
    ]
    path = save_model(tmp_path, nodes, [1, 2, 5, 5], {"w_1": conv_weight(3, 2, 1), "w_3": conv_weight(4, 2)})
    graph, plan = planned(path, RNG.uniform(0, 1, (256, 2, 5, 5)).astype(np.float32))
    x = RNG.normal(size=(1, 2, 5, 5)).astype(np.float32)
    import onnxruntime as ort

    fx = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y = RNG.normal(size=fx.shape).astype(np.float32)

    from_onnx, from_torch = transposed_both_ways(graph, plan, y)

    assert from_onnx.shape == x.shape
    np.testing.assert_allclose(from_torch, from_onnx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.vdot(fx, y), np.vdot(x, from_onnx), rtol=1e-4)


def test_concat_signature_names_the_parts(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["left"], name="left"),
        helper.make_node("Sigmoid", ["x"], ["right"], name="right"),
        helper.make_node("Concat", ["left", "right"], ["y"], name="join", axis=-1),
    ]
    graph, plan = planned(save_model(tmp_path, nodes, [1, 6], {}), np.zeros((256, 6), np.float32))

    assert plan.signature(graph)[0]["part_shapes"] == [[6], [6]]
    assert plan.steps[0].output_shape == (12,)


def test_centering_follows_the_input_and_freezes_its_mean(tmp_path):
    """y = x - mean(x): no layer on either side, so the operand the mean is computed from is followed."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[1], keepdims=1),
        helper.make_node("Sub", ["x", "m"], ["c"], name="center"),
        helper.make_node("MatMul", ["c", "w"], ["y"], name="head"),
    ]
    path = save_model(tmp_path, nodes, [1, 5], {"w": RNG.normal(size=(5, 3)).astype(np.float32)})
    data = RNG.uniform(0, 2, (256, 5)).astype(np.float32)
    graph, plan = planned(path, data)

    center = next(step for step in plan.steps if step.node.name == "center")
    assert center.sources == ("x",)
    assert center.frozen == ("m",)
    np.testing.assert_allclose(plan.frozen_values["m"], [data.mean()], rtol=1e-4)

    y = RNG.normal(size=(2, 3)).astype(np.float32)
    from_onnx, from_torch = transposed_both_ways(graph, plan, y)

    expected = y @ graph.constants["w"].T + plan.frozen_values["m"]
    np.testing.assert_allclose(from_onnx, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_torch, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op_type,form", [("Mul", "y/b"), ("Div", "y*b")])
def test_gating_inverted_with_frozen_gate(tmp_path, op_type, form):
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["gate"], name="gate"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="layer"),
        helper.make_node(op_type, ["h", "gate"], ["y"], name="apply"),
    ]
    path = save_model(tmp_path, nodes, [1, 4], {"w": RNG.normal(size=(4, 4)).astype(np.float32)})
    graph, plan = planned(path, RNG.normal(size=(256, 4)).astype(np.float32))
    y = RNG.normal(size=(2, 4)).astype(np.float32)

    from_onnx, from_torch = transposed_both_ways(graph, plan, y)

    assert plan.steps[0].attrs["form"] == form
    gate = plan.frozen_values["gate"]
    inverse = y / gate if op_type == "Mul" else y * gate
    np.testing.assert_allclose(from_onnx, inverse @ graph.constants["w"].T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(from_torch, from_onnx, rtol=1e-4, atol=1e-4)


def test_matmul_of_two_activations_freezes_one_operand(tmp_path):
    """Attention-like product: scores = q @ k^T with q from a layer and k straight from the input."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["q"], name="query"),
        helper.make_node("Transpose", ["x"], ["k"], name="keys_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "k"], ["y"], name="scores"),
    ]
    path = save_model(tmp_path, nodes, [1, 3, 4], {"w": RNG.normal(size=(4, 4)).astype(np.float32)})
    graph, plan = planned(path, RNG.normal(size=(256, 3, 4)).astype(np.float32))
    y = RNG.normal(size=(2, 3, 3)).astype(np.float32)

    from_onnx, from_torch = transposed_both_ways(graph, plan, y)

    scores = plan.steps[0]
    assert scores.sources == ("q",)
    assert scores.frozen == ("k",)
    expected = (y @ plan.frozen_values["k"].T) @ graph.constants["w"].T
    np.testing.assert_allclose(from_onnx, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(from_torch, from_onnx, rtol=1e-4, atol=1e-4)


def test_division_by_an_activation_is_refused(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="layer"),
        helper.make_node("Div", ["x", "h"], ["y"], name="ratio"),
    ]
    path = save_model(tmp_path, nodes, [1, 4], {"w": np.eye(4, dtype=np.float32)})

    plan = build_plan(import_graph(path), strict=False)

    assert [issue.node.name for issue in plan.issues] == ["ratio"]
    assert "dividing by an activation" in plan.issues[0].reason


def test_missing_frozen_value_is_reported(tmp_path):
    graph = import_graph(residual_model(tmp_path))
    plan = build_plan(graph)

    with pytest.raises(OnnxmarkError, match="frozen value"):
        build_transposed_model(plan, graph)


def test_inspect_lists_frozen_branches(tmp_path):
    from onnxmark.inspect import inspect_model

    report = inspect_model(residual_model(tmp_path))

    assert report["frozen"] == [{"node": "residual", "tensor": "r", "shape": [4, 6, 6]}]
    statuses = {entry["name"]: entry["status"] for entry in report["nodes"]}
    assert statuses["residual"] == "transposed, frozen branch r"
    assert statuses["conv_b"] == "in a frozen branch (its mean value is stored in the key)"


def test_branch_without_rule_is_frozen(tmp_path):
    """The branch with more layers passes through Hardmax, which has no rule, so the other one is followed."""
    nodes = [
        helper.make_node("Hardmax", ["x"], ["h"], name="hard"),
        helper.make_node("MatMul", ["h", "w_a"], ["a1"], name="layer_a1"),
        helper.make_node("MatMul", ["a1", "w_b"], ["a"], name="layer_a2"),
        helper.make_node("MatMul", ["x", "w_c"], ["b"], name="layer_b"),
        helper.make_node("Add", ["a", "b"], ["y"], name="join"),
    ]
    weights = {name: RNG.normal(size=(4, 4)).astype(np.float32) for name in ("w_a", "w_b", "w_c")}
    path = save_model(tmp_path, nodes, [1, 4], weights)

    graph, plan = planned(path, RNG.normal(size=(256, 4)).astype(np.float32))

    assert plan.issues == []
    assert plan.steps[0].frozen == ("a",)
    assert [step.node.name for step in plan.steps] == ["join", "layer_b"]


def test_inspect_marks_frozen_branch_nodes(tmp_path):
    from onnxmark.inspect import inspect_model

    nodes = [
        helper.make_node("Hardmax", ["x"], ["h"], name="hard"),
        helper.make_node("MatMul", ["h", "w_a"], ["a"], name="layer_a"),
        helper.make_node("MatMul", ["x", "w_b"], ["b"], name="layer_b"),
        helper.make_node("Add", ["a", "b"], ["y"], name="join"),
    ]
    weights = {name: RNG.normal(size=(4, 4)).astype(np.float32) for name in ("w_a", "w_b")}

    report = inspect_model(save_model(tmp_path, nodes, [1, 4], weights))

    statuses = {entry["name"]: entry["status"] for entry in report["nodes"]}
    assert statuses["hard"].startswith("in a frozen branch")
    assert statuses["layer_a"].startswith("in a frozen branch")
    assert statuses["layer_b"] == "transposed (layer)"
    assert report["unsupported"] == []


def residual_classifier(tmp_path):
    """A small residual classifier for MNIST: stem conv, one residual block, pooling and a linear head.

    The block's shortcut is a 1x1 conv, so the transposed model follows its residual branch.
    """
    nodes = [
        helper.make_node("Conv", ["x", "w_stem"], ["s"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["s"], ["s_relu"], name="stem_relu"),
        helper.make_node("Conv", ["s_relu", "w_a"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
        helper.make_node("Conv", ["a_relu", "w_b"], ["r"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["s_relu", "w_short"], ["s_short"], name="conv_short"),
        helper.make_node("Add", ["s_short", "r"], ["sum"], name="residual"),
        helper.make_node("MaxPool", ["sum"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["y"], name="fc", transB=1),
    ]
    weights = {"w_stem": conv_weight(8, 1) * 0.3, "w_a": conv_weight(8, 8) * 0.1, "w_b": conv_weight(8, 8) * 0.1,
               "w_short": conv_weight(8, 8, 1) * 0.3, "w_fc": RNG.normal(0, 0.03, (10, 8 * 7 * 7)).astype(np.float32), "b_fc": np.zeros(10, np.float32)}
    return save_model(tmp_path, nodes, ["N", 1, 28, 28], weights)


def renamed_copy(path, target):
    """Rename every node and every tensor except the graph input and output."""
    model = onnx.load(path)
    keep = {model.graph.input[0].name, model.graph.output[0].name}
    names = {}
    for node in model.graph.node:
        for tensor in [*node.input, *node.output]:
            if tensor not in names:
                names[tensor] = tensor if tensor in keep else f"t{len(names)}"
    for index, node in enumerate(model.graph.node):
        node.name = f"n{index}"
        node.input[:] = [names.get(t, t) for t in node.input]
        node.output[:] = [names.get(t, t) for t in node.output]
    for initializer in model.graph.initializer:
        initializer.name = names.get(initializer.name, initializer.name)
    onnx.save(model, target)
    return target


def test_residual_embed_extracts_from_renamed_copy(tmp_path):
    from onnxmark.embed import EmbedOptions, embed
    from onnxmark.extract import extract
    from onnxmark.keyfile import load_key

    options = EmbedOptions(data="mnist-sample", output_dir=tmp_path / "out", mode="scratch", epochs=1, key_count=4,
                           max_hardening_steps=400)
    summary = embed(residual_classifier(tmp_path), options)
    key = load_key(summary["key"])
    renamed = renamed_copy(summary["model"], tmp_path / "renamed.onnx")

    extraction = extract(renamed, key)

    assert list(key.frozen) == ["s_short"]
    assert summary["ssim_mean"] >= 0.8
    np.testing.assert_allclose(extraction.ssim, extract(summary["model"], key).ssim, atol=1e-6)


def test_plan_graph_forks_at_concat(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["left"], name="left"),
        helper.make_node("Sigmoid", ["x"], ["right"], name="right"),
        helper.make_node("Concat", ["left", "right"], ["y"], name="join", axis=-1),
    ]
    graph, plan = planned(save_model(tmp_path, nodes, [1, 6], {}), np.zeros((256, 6), np.float32))

    steps = plan.as_networkx()

    names = {index: steps.nodes[index]["forward_node"] for index in steps.nodes}
    assert sorted((names[a], names[b]) for a, b in steps.edges) == [("join", "left"), ("join", "right")]
