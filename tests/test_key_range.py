"""The key range that embed chooses per model when --key-range is not given."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxmark.calibration import KEY_HIGH
from onnxmark.data import InputSpec, Preprocessing, adapt_images, load_dataset, to_layout
from onnxmark.embed import KEY_PROBE_COUNT, KEY_PROBE_SEED, KEY_SPREAD_TARGET, chosen_key_range
from onnxmark.frozen import record_frozen
from onnxmark.graph import import_graph, load_onnx
from onnxmark.keyfile import load_key
from onnxmark.plan import build_plan
from onnxmark.training import transposed_spread
from tests.conftest import FIXTURE_MODEL, ROOT, real_model, real_model_options

# The fixture's transposed images differ between keys in [-10, 10] by about 0.02 pixel units. With its last
# layer's weights this many times larger, they differ by about 18.
HEAD_SCALE = 1000.0


def scaled_head_model(folder: Path) -> Path:
    """Write the fixture model with fc3's weights multiplied by HEAD_SCALE."""
    model = onnx.load(FIXTURE_MODEL)
    for initializer in model.graph.initializer:
        if initializer.name == "fc3.weight":
            values = onnx.numpy_helper.to_array(initializer) * np.float32(HEAD_SCALE)
            initializer.CopyFrom(onnx.numpy_helper.from_array(values, initializer.name))
    path = folder / "loud_head.onnx"
    onnx.save(model, path)
    return path


def prepared(path: Path, preprocessing: Preprocessing = Preprocessing()):
    """Return the graph, the plan with frozen values, the input spec and the preprocessing, as embed prepares them."""
    graph = import_graph(path, load_onnx(path))
    plan = build_plan(graph)
    spec = InputSpec.from_dims(graph.input_dims)
    pixels = adapt_images(load_dataset("mnist-sample").images[:2000], spec)
    inputs = to_layout(preprocessing.to_model(pixels), spec).astype(np.float32)
    plan.frozen_values = record_frozen(plan, graph, inputs)
    return graph, plan, spec, preprocessing


def recorded_preprocessing(name: str) -> Preprocessing:
    """Return the preprocessing that preprocessing.json records for a real model (a range, or mean and std)."""
    options = real_model_options(name)
    if "--mean" in options:
        return Preprocessing(mean=(float(options[options.index("--mean") + 1]),),
                             std=(float(options[options.index("--std") + 1]),))
    low, high = options[options.index("--input-range") + 1:options.index("--input-range") + 3]
    return Preprocessing(low=float(low), high=float(high))


def spread_at(key_range: float, graph, plan, spec, preprocessing) -> float:
    probes = np.random.default_rng(KEY_PROBE_SEED).uniform(-1.0, 1.0, (KEY_PROBE_COUNT, 10)) * key_range
    return transposed_spread(graph, plan, spec, preprocessing, probes)


def test_quiet_transposed_model_keeps_default_range():
    assert chosen_key_range(*prepared(FIXTURE_MODEL)) == KEY_HIGH


def test_loud_transposed_model_gets_smaller_keys(tmp_path):
    model = prepared(scaled_head_model(tmp_path))

    key_range = chosen_key_range(*model)

    assert spread_at(KEY_HIGH, *model) > 10 * KEY_SPREAD_TARGET
    assert key_range < KEY_HIGH
    assert spread_at(key_range, *model) == pytest.approx(KEY_SPREAD_TARGET, rel=0.1)


def test_embed_records_the_chosen_range(tmp_path):
    path = scaled_head_model(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "onnxmark", "embed", str(path), "--data", "mnist-sample", "--keys", "2",
         "--epochs", "0", "--max-hardening-steps", "2", "--held-out", "100", "--seed", "1",
         "-o", str(tmp_path / "out"), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    key = load_key(summary["key"])

    assert summary["key_range"] < KEY_HIGH
    assert key.key_range == summary["key_range"]
    assert np.abs(key.keys).max() <= key.key_range


def test_djl_model_gets_small_keys():
    """DJL's transposed images differ between keys in [-10, 10] by about 37 pixel units."""
    name = "djl_mnist_mvn.onnx"
    model = prepared(real_model(name), recorded_preprocessing(name))

    assert chosen_key_range(*model) <= 0.5


def test_burn_model_keeps_default_range():
    """burn's MNIST model reaches mean SSIM 0.989 with keys in [-10, 10] (spread about 0.013)."""
    name = "pytorch2.0.0_burn_mnist_bn.onnx"
    model = prepared(real_model(name), recorded_preprocessing(name))

    assert chosen_key_range(*model) == KEY_HIGH
