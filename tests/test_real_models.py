"""Embed and extract on the real trained models beside the repository, through the command line."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from tests.conftest import REAL_MNIST_MODELS, ROOT, real_model, real_model_options


def run_json(*args):
    result = subprocess.run([sys.executable, "-m", "onnxmark", *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def initializer_values(model):
    return {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}


@pytest.mark.parametrize("name", REAL_MNIST_MODELS)
def test_short_embed_changes_only_initializer_values(tmp_path, name):
    """A short embed (one epoch) writes a model that differs from the input only in initializer values."""
    path = real_model(name)
    summary = run_json("embed", path, "--seed", "0", "--data", "mnist-sample", *real_model_options(name), "-o", tmp_path,
                       "--epochs", "1", "--mode", "trained", "--json")
    original, written = onnx.load(path), onnx.load(summary["model"])

    before, after = initializer_values(original), initializer_values(written)
    assert list(before) == list(after)
    assert any(not np.array_equal(before[n], after[n]) for n in before)
    for n in before:
        assert before[n].dtype == after[n].dtype
        assert before[n].shape == after[n].shape
    for model in (original, written):
        del model.graph.initializer[:]
    assert original.SerializeToString() == written.SerializeToString()


# NOTE: with the default key range these three models do not reach the SSIM bar yet, while keeping
# accuracy. CNTK's last pooling leaves a 4x4 map, so its transposed model draws each key as 4x4 blocks
# (mean SSIM about 0.8). DJL loses the key's signal (about 0.6), which keys in [-1, 1] keep (test below).
# The 0..255 MLP would need weights hundreds of times larger than the forward model tolerates (under 0.1).
NOT_YET_WATERMARKED = {"cntk_mnist_opset7.onnx", "djl_mnist_mvn.onnx", "pytorch1.11_mnist_mlp_softmax.onnx"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason="mean SSIM stays under 0.85"))
    if name in NOT_YET_WATERMARKED else name for name in REAL_MNIST_MODELS])
def test_full_embed_keeps_accuracy_and_shows_mark(tmp_path, name):
    path = real_model(name)
    summary = run_json("embed", path, "--seed", "0", "--data", "mnist-sample", *real_model_options(name), "-o", tmp_path, "--json")
    scores = run_json("extract", summary["model"], "--key", summary["key"], "-o", tmp_path / "check", "--json")

    assert summary["accuracy_after"] >= summary["accuracy_before"] - 0.01
    assert scores["ssim_mean"] >= 0.85


@pytest.mark.slow
def test_small_key_range_marks_djl_model(tmp_path):
    """Keys in [-1, 1] keep the DJL model's key signal, which keys in [-10, 10] lose (mean SSIM about 0.6)."""
    name = "djl_mnist_mvn.onnx"
    summary = run_json("embed", real_model(name), "--seed", "0", "--data", "mnist-sample", *real_model_options(name),
                       "--key-range", "1", "-o", tmp_path, "--json")
    scores = run_json("extract", summary["model"], "--key", summary["key"], "-o", tmp_path / "check", "--json")

    assert summary["accuracy_after"] >= summary["accuracy_before"] - 0.01
    assert scores["ssim_mean"] >= 0.85
