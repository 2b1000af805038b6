"""Model forms exporters produce: every opset from 7 to 22, unsorted nodes, fp16 weights, external data."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxmark.executors import ForwardExecutor, ParameterStore, TransposedExecutor
from onnxmark.graph import import_graph, load_onnx
from onnxmark.plan import build_plan
from onnxmark.transposed_onnx import build_transposed_model, run_transposed
from onnxmark.writeback import model_files, uses_external_data, write_back

OPSETS = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
CLASSES = 5


def small_cnn(opset: int, dtype=np.float32, shuffled: bool = False) -> onnx.ModelProto:
    """Conv, BatchNormalization, Relu, MaxPool, Flatten and Gemm, valid from opset 7 on."""
    rng = np.random.default_rng(opset)
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights = {
        "conv.w": rng.normal(0, 0.3, (4, 1, 3, 3)), "conv.b": rng.normal(0, 0.1, 4),
        "bn.scale": rng.uniform(0.5, 1.5, 4), "bn.bias": rng.normal(0, 0.1, 4),
        "bn.mean": rng.normal(0, 0.1, 4), "bn.var": rng.uniform(0.5, 1.5, 4),
        "fc.w": rng.normal(0, 0.3, (CLASSES, 4 * 4 * 4)), "fc.b": rng.normal(0, 0.1, CLASSES),
    }
    initializers = [numpy_helper.from_array(value.astype(dtype), name) for name, value in weights.items()]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    if shuffled:
        nodes = nodes[3:] + nodes[:3]
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", elem_type, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", elem_type, ["N", CLASSES])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if opset < 9 else min(model.ir_version, 8)
    return model


def transposed_both_ways(path):
    graph = import_graph(path)
    plan = build_plan(graph)
    keys = np.random.default_rng(0).uniform(-10, 10, (3, CLASSES)).astype(np.float32)
    from_onnx = run_transposed(build_transposed_model(plan, graph), keys)
    with torch.no_grad():
        from_torch = TransposedExecutor(graph, ParameterStore(graph), plan)(torch.from_numpy(keys)).numpy()
    return graph, plan, from_onnx, from_torch


@pytest.mark.parametrize("opset", OPSETS)
def test_every_opset_plans_and_runs(tmp_path, opset):
    path = tmp_path / f"cnn_opset{opset}.onnx"
    onnx.save(small_cnn(opset), path)

    graph, plan, from_onnx, from_torch = transposed_both_ways(path)

    assert graph.original_opset == opset
    assert [step.node.op_type for step in plan.steps] == ["Gemm", "Flatten", "MaxPool", "Relu",
                                                          "BatchNormalization", "Conv"]
    assert from_onnx.shape == (3, 1, 8, 8)
    np.testing.assert_allclose(from_torch, from_onnx, rtol=1e-4, atol=1e-4)


def test_unsorted_nodes_are_sorted(tmp_path):
    path = tmp_path / "shuffled.onnx"
    onnx.save(small_cnn(13, shuffled=True), path)

    graph, plan, from_onnx, from_torch = transposed_both_ways(path)

    assert [node.name for node in graph.nodes] == ["conv", "bn", "relu", "pool", "flatten", "fc"]
    np.testing.assert_allclose(from_torch, from_onnx, rtol=1e-4, atol=1e-4)


def test_fp16_written_back_as_fp16(tmp_path):
    path = tmp_path / "fp16.onnx"
    original = small_cnn(13, np.float16)
    onnx.save(original, path)
    graph = import_graph(path)
    store = ParameterStore(graph)
    x = torch.rand(4, 1, 8, 8)

    logits = ForwardExecutor(graph, store)(x)
    import onnxruntime as ort

    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy().astype(np.float16)})[0]
    assert all(p.dtype == torch.float32 for p in store.trainable())
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=2e-2, atol=2e-2)

    values = {name: value * 1.5 for name, value in store.snapshot().items()}
    written = write_back(original, values)
    by_name = {t.name: t for t in written.graph.initializer}
    assert by_name["conv.w"].data_type == TensorProto.FLOAT16
    np.testing.assert_allclose(numpy_helper.to_array(by_name["conv.w"]).astype(np.float32), values["conv.w"],
                               rtol=1e-3, atol=1e-3)


def test_external_data_round_trip(tmp_path):
    source = tmp_path / "source" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(small_cnn(17), str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=64)
    assert uses_external_data(source)
    original = load_onnx(source)
    graph = import_graph(source, original)
    written = write_back(original, {name: value + 1 for name, value in ParameterStore(graph).snapshot().items()})

    target = tmp_path / "out" / "model.wm.onnx"
    files = model_files(written, target, external=True)
    assert set(files) == {target, target.parent / "model.wm.onnx.data"}
    target.parent.mkdir()
    for file, data in files.items():
        file.write_bytes(data)

    assert uses_external_data(target)
    reloaded = {t.name: numpy_helper.to_array(t) for t in load_onnx(target).graph.initializer}
    np.testing.assert_allclose(reloaded["fc.w"], graph.constants["fc.w"] + 1, rtol=1e-6)


def test_inline_model_stays_one_file(tmp_path):
    model = small_cnn(17)
    target = tmp_path / "model.wm.onnx"

    files = model_files(model, target, external=False)

    assert list(files) == [target]
    assert files[target] == model.SerializeToString()


def test_embed_writes_external_data_beside_output(tmp_path):
    from onnxmark.embed import EmbedOptions, embed
    from onnxmark.extract import extract
    from onnxmark.keyfile import load_key

    source = tmp_path / "source" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(small_cnn(17), str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=64)
    options = EmbedOptions(data="digits", output_dir=tmp_path / "out", teacher=True, key_count=2, epochs=1,
                           held_out=300)

    summary = embed(source, options)

    assert summary["model_data"] == str(tmp_path / "out" / "model.wm.onnx.data")
    assert uses_external_data(summary["model"])
    key = load_key(summary["key"])
    extraction = extract(summary["model"], key)
    assert extraction.model_sha256 == key.model_sha256


def test_pooled_logits_embed_as_class_vectors(tmp_path):
    """A classifier that ends in global pooling has logits [N, classes, 1, 1], as SqueezeNet does."""
    from onnxmark.embed import EmbedOptions, embed

    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["pooled"], name="pool"),
        helper.make_node("Softmax", ["pooled"], ["y"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10, 1, 1])],
                              [numpy_helper.from_array(rng.normal(0, 0.3, (10, 1, 3, 3)).astype(np.float32), "w")])
    path = tmp_path / "pooled.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)

    summary = embed(path, EmbedOptions(data="digits", output_dir=tmp_path / "out", mode="scratch", epochs=1,
                                       key_count=2, max_hardening_steps=50, held_out=300))

    from onnxmark.keyfile import load_key

    assert summary["accuracy_before"] is not None
    assert load_key(summary["key"]).keys.shape == (2, 10)
