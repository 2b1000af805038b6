"""torchvision architectures and a small ViT, exported by fixtures/make_torchvision.py, watermarked from scratch.

Each embed trains for one epoch on mnist-sample converted to 3 channels at 32x32. The key must find
the watermark in the embedded model and nothing in an untrained copy of the same architecture.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from onnxmark.embed import EmbedOptions, embed
from onnxmark.executors import ParameterStore, TransposedExecutor
from onnxmark.extract import extract
from onnxmark.graph import import_graph
from onnxmark.keyfile import load_key
from onnxmark.plan import build_plan
from onnxmark.transposed_onnx import build_transposed_model, run_transposed

SCRIPT = Path(__file__).resolve().parent.parent / "fixtures" / "make_torchvision.py"
ARCHITECTURES = ["resnet18", "resnet34", "vgg11", "mobilenet_v2", "vit"]
# VGG11's 130 million weights make even the runtime comparison take most of a minute.
QUICK_ARCHITECTURES = [pytest.param(name, marks=pytest.mark.slow) if name == "vgg11" else name
                       for name in ARCHITECTURES]


def fixture_script():
    spec = importlib.util.spec_from_file_location("make_torchvision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", QUICK_ARCHITECTURES)
def test_architecture_plans_and_runtimes_agree(tmp_path, name):
    path = fixture_script().export_architecture(name, tmp_path / f"{name}.onnx")
    graph = import_graph(path)
    plan = build_plan(graph)
    plan.frozen_values = {tensor: np.random.default_rng(1).normal(size=graph.shapes[tensor]).astype(np.float32)
                          for tensor in plan.frozen_names()}
    keys = np.random.default_rng(0).uniform(-10, 10, (2, 10)).astype(np.float32)

    from_onnx = run_transposed(build_transposed_model(plan, graph), keys)
    with torch.no_grad():
        from_torch = TransposedExecutor(graph, ParameterStore(graph), plan)(torch.from_numpy(keys)).numpy()

    assert from_onnx.shape == (2, 3, 32, 32)
    scale = np.abs(from_onnx).max()
    np.testing.assert_allclose(from_torch / scale, from_onnx / scale, atol=1e-4)


# NOTE: MobileNetV2 and the ViT stop near mean SSIM 0.55, with one blurred image for every key. In the
# eval-mode export of an untrained MobileNetV2 the batch norms are folded into the convolutions, and each
# transposed depthwise convolution shrinks the signal about a hundred times (kaiming init with fan_out
# counts all channels, not one group). Batch-norm statistics from forward passes keep the signal, but
# hardening still stopped at 0.52. In the ViT only the class token carries the key, and the frozen
# attention weights spread it over the patches with the same pattern for every key.
KEY_INDEPENDENT = pytest.mark.xfail(strict=True, reason="the transposed model loses the key's signal")
# The ResNets embed in about two minutes each on two cores and run with the slow tests. VGG11 takes about
# half an hour, and MobileNetV2 and the ViT run their 2,000 hardening steps, so those run with -m long.
EMBED_MARKS = {
    "resnet18": [pytest.mark.slow],
    "resnet34": [pytest.mark.slow],
    "vgg11": [pytest.mark.slow, pytest.mark.long],
    "mobilenet_v2": [pytest.mark.slow, pytest.mark.long, KEY_INDEPENDENT],
    "vit": [pytest.mark.slow, pytest.mark.long, KEY_INDEPENDENT],
}
EMBEDDED_ARCHITECTURES = [pytest.param(name, marks=EMBED_MARKS[name]) for name in ARCHITECTURES]


@pytest.mark.parametrize("name", EMBEDDED_ARCHITECTURES)
def test_architecture_embeds_from_scratch(tmp_path, name):
    script = fixture_script()
    model = script.export_architecture(name, tmp_path / f"{name}.onnx", seed=0)
    untrained = script.export_architecture(name, tmp_path / f"{name}_other.onnx", seed=1)

    summary = embed(model, EmbedOptions(data="mnist-sample", output_dir=tmp_path / "out", mode="scratch", epochs=1))
    control = extract(untrained, load_key(summary["key"]))

    assert summary["ssim_mean"] >= 0.85
    assert control.ssim.mean() <= 0.10
