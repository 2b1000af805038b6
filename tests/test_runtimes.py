"""One plan, two runtimes: torch and onnxruntime give the same transposed image for the same key."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from onnxmark.executors import ForwardExecutor, ParameterStore, TransposedExecutor
from onnxmark.graph import import_graph
from onnxmark.plan import build_plan
from onnxmark.transposed_onnx import build_transposed_model, run_transposed
from onnxmark.frozen import record_frozen
from tests.conftest import ALL_REAL_MODELS, FIXTURE_MODEL, REAL_MNIST_MODELS, real_model

MODELS = ["fixture", *REAL_MNIST_MODELS]


def model_path(name):
    return FIXTURE_MODEL if name == "fixture" else real_model(name)


@pytest.mark.parametrize("name", ["fixture", *ALL_REAL_MODELS])
def test_torch_and_onnxruntime_extract_same_image(name):
    graph = import_graph(model_path(name))
    plan = build_plan(graph)
    inputs = np.random.default_rng(2).uniform(0, 1, (256, *graph.input_dims)).astype(graph.input_dtype)
    plan.frozen_values = record_frozen(plan, graph, inputs)
    classes = int(np.prod(plan.steps[0].output_shape))
    keys = np.random.default_rng(0).uniform(-10, 10, (11, classes)).astype(np.float32)

    from_onnx = run_transposed(build_transposed_model(plan, graph), keys)
    with torch.no_grad():
        from_torch = TransposedExecutor(graph, ParameterStore(graph), plan)(torch.from_numpy(keys)).numpy()

    assert from_onnx.shape == (11, *graph.input_dims)
    scale = np.abs(from_onnx).max()
    assert np.abs(from_torch - from_onnx).max() <= 1e-5 * scale


@pytest.mark.parametrize("name", MODELS)
def test_forward_executor_matches_onnxruntime(name):
    path = model_path(name)
    graph = import_graph(path)
    inputs = np.random.default_rng(1).uniform(0, 1, (graph.recorded_batch, *graph.input_dims)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if graph.logits_name != graph.output_name:
        pytest.skip("the file's output is a softmax of the logits; compared through its argmax below")

    expected = session.run([graph.output_name], {graph.input_name: inputs})[0]
    with torch.no_grad():
        logits = ForwardExecutor(graph, ParameterStore(graph))(torch.from_numpy(inputs)).numpy()

    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["pytorch2.0.0_burn_mnist_bn.onnx", "pytorch1.11_mnist_mlp_softmax.onnx"])
def test_forward_executor_logits_feed_final_softmax(name):
    path = real_model(name)
    graph = import_graph(path)
    inputs = np.random.default_rng(2).uniform(0, 1, (graph.recorded_batch, *graph.input_dims)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities = session.run([graph.output_name], {graph.input_name: inputs})[0]

    with torch.no_grad():
        logits = ForwardExecutor(graph, ParameterStore(graph))(torch.from_numpy(inputs))

    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), np.exp(probabilities)
                               if "LogSoftmax" in [n.op_type for n in graph.nodes] else probabilities,
                               rtol=1e-4, atol=1e-5)


def test_fixed_batch_model_trains_in_batches():
    graph = import_graph(real_model("cntk_mnist_opset7.onnx"))
    assert graph.recorded_batch == 1
    inputs = torch.rand(8, *graph.input_dims)

    logits = ForwardExecutor(graph, ParameterStore(graph))(inputs)

    assert logits.shape == (8, 10)


def test_weight_shared_by_both_executors():
    graph = import_graph(FIXTURE_MODEL)
    store = ParameterStore(graph)
    plan = build_plan(graph)
    forward = ForwardExecutor(graph, store)
    transposed = TransposedExecutor(graph, store, plan)

    forward(torch.rand(2, *graph.input_dims)).sum().backward()
    forward_grad = store.tensors["fc1.weight"].grad.clone()
    store.tensors["fc1.weight"].grad = None
    transposed(torch.rand(3, 10)).sum().backward()

    assert len(store.parameter_list) == len(graph.float_initializer_names())
    assert forward_grad.abs().sum() > 0
    assert store.tensors["fc1.weight"].grad.abs().sum() > 0
