"""False positives: a key must find nothing in models of its structure that were never watermarked with it.

Only models with the watermarked model's structure can give a score, because the key rejects every other
structure. So the unwatermarked models checked here are the originals that real models were watermarked
from, and independently trained copies of the fixture architecture. Under the null hypothesis the combined
p-values are uniform, so the bound of 0.001 over these nine models fails by chance in about one run in a
hundred.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest

from onnxmark.data import load_dataset
from onnxmark.embed import EmbedOptions, train_without_watermark
from onnxmark.errors import OnnxmarkError
from onnxmark.extract import extract
from onnxmark.keyfile import load_key
from tests.conftest import ALL_REAL_MODELS, ROOT, real_model

MAX_SSIM_MEAN = 0.15
MIN_P_VALUE = 1e-3
# Trained copies of the fixture architecture, each with its own seed for the initial weights and the training.
COPY_SEEDS = [1, 2, 3, 4, 5]
# One trained-mode model with batch norms, and two teacher-mode models: a flat MLP and an NHWC CNN with
# 43 classes.
REAL_MODELS_CHECKED = ["pytorch2.0.0_burn_mnist_bn.onnx", "keras2onnx_mnist_mlp_softmax.onnx",
                       "tf2onnx_gtsrb_43cls_nhwc.onnx"]


def make_fixtures_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "fixtures" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fixture_key_rejects_real_models(watermarked_fixture):
    """Every real model has another structure than the fixture, so the key gives a mismatch, not a score."""
    key = load_key(watermarked_fixture["key"])

    for name in ALL_REAL_MODELS:
        path = real_model(name)
        with pytest.raises(OnnxmarkError, match="does not fit"):
            extract(path, key)


@pytest.mark.slow
@pytest.mark.parametrize("seed", COPY_SEEDS)
def test_independent_copy_shows_no_mark(watermarked_fixture, tmp_path, seed):
    """A copy of the fixture architecture trained from its own initial weights, without any watermark."""
    module = make_fixtures_module()
    untrained = module.export_onnx(module.build_default_cnn(seed), tmp_path / f"copy{seed}.onnx")
    model_bytes, accuracy = train_without_watermark(untrained, EmbedOptions(data="mnist-sample", output_dir=tmp_path,
                                                                            seed=seed))
    key = load_key(watermarked_fixture["key"])

    scores = extract(f"copy{seed}.onnx", key, onnx.load_from_string(model_bytes))

    assert accuracy > 0.9
    assert scores.ssim.mean() <= MAX_SSIM_MEAN
    assert scores.calibration.p_value >= MIN_P_VALUE


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_MODELS_CHECKED)
def test_original_shows_no_mark(embedded_real_model, name):
    """The key of a watermarked real model, extracted from the original that it was made from."""
    summary = embedded_real_model(name)
    key = load_key(summary["key"])

    scores = extract(real_model(name), key)

    assert scores.ssim.mean() <= MAX_SSIM_MEAN
    assert scores.calibration.p_value >= MIN_P_VALUE


SQUEEZENET = "caffe2_squeezenet1.1_fp16.onnx"


@pytest.fixture(scope="module")
def squeezenet_original_scores(embedded_real_model, tmp_path_factory):
    """Extract from the original SqueezeNet a key made for it by an embed without training steps.

    The embed runs on 300 digits to keep it short. Training changes the watermarked model, not how the key
    fits the original, so this key probes the original as well as one from a full embed would. A full embed
    took 24 minutes for one epoch on two cores (BENCHMARKS.md).
    """
    real_model(SQUEEZENET)
    digits = load_dataset("mnist-sample")
    data = tmp_path_factory.mktemp("digits") / "digits300.npz"
    np.savez(data, x=digits.images[:300], y=digits.labels[:300])
    summary = embedded_real_model(SQUEEZENET, "--epochs", "0", "--data", str(data), "--held-out", "100")
    return extract(real_model(SQUEEZENET), load_key(summary["key"]))


@pytest.mark.slow
def test_squeezenet_original_p_value(squeezenet_original_scores):
    assert squeezenet_original_scores.calibration.p_value >= MIN_P_VALUE


# NOTE: SqueezeNet's transposed model turns every key into nearly the same saturated red picture, whose
# red channel matches the secrets' white background. So any key, real or random, scores SSIM about 0.2 on
# the unwatermarked original, while the p-value, which compares against random keys, stays large.
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="every key scores SSIM about 0.2 on the unwatermarked SqueezeNet")
def test_squeezenet_original_ssim(squeezenet_original_scores):
    assert squeezenet_original_scores.ssim.mean() <= MAX_SSIM_MEAN
