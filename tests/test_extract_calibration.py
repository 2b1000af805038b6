"""p-values and z-scores of `onnxmark extract` on the watermarked fixture model and on its unwatermarked original."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxmark.extract import extract
from onnxmark.keyfile import load_key
from tests.conftest import FIXTURE_MODEL, ROOT


def extract_json(*args):
    result = subprocess.run([sys.executable, "-m", "onnxmark", "extract", *map(str, args), "--json"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def watermarked_scores(watermarked_fixture, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evidence")
    return extract_json(watermarked_fixture["model"], "--key", watermarked_fixture["key"], "-o", folder), folder


def test_watermarked_keys_are_significant(watermarked_scores):
    scores, _ = watermarked_scores

    assert scores["null_keys"] == 200
    assert scores["null_seed"] == 0
    assert scores["p_value_method"] == "fisher"
    assert scores["p_value"] < 1e-6
    for entry in scores["keys"]:
        assert entry["p_value"] < 0.01, entry
        assert entry["z_score"] > 2, entry


def test_watermarked_keys_beat_wrong_secrets(watermarked_scores):
    scores, _ = watermarked_scores

    for entry in scores["keys"]:
        assert entry["ssim"] > entry["wrong_secret_ssim_max"], entry
        assert entry["wrong_secret_ssim_mean"] <= entry["wrong_secret_ssim_max"]
        assert entry["null_ssim_mean"] <= entry["null_ssim_max"]


def test_scores_file_records_p_values(watermarked_scores):
    scores, folder = watermarked_scores

    written = json.loads((Path(folder) / "scores.json").read_text())

    assert written["p_value"] == pytest.approx(scores["p_value"])
    assert [entry["p_value"] for entry in written["keys"]] == [entry["p_value"] for entry in scores["keys"]]


def test_unwatermarked_original_is_not_significant(watermarked_fixture, tmp_path):
    scores = extract_json(FIXTURE_MODEL, "--key", watermarked_fixture["key"], "-o", tmp_path)

    assert scores["p_value"] > 1e-3
    assert scores["ssim_mean"] < 0.15
    assert max(entry["ssim"] for entry in scores["keys"]) < 0.15


def test_null_seed_repeats_p_values(watermarked_fixture):
    key = load_key(watermarked_fixture["key"])

    first = extract(FIXTURE_MODEL, key, null_keys=100, null_seed=5).calibration
    again = extract(FIXTURE_MODEL, key, null_keys=100, null_seed=5).calibration
    other = extract(FIXTURE_MODEL, key, null_keys=100, null_seed=6).calibration

    assert first.null_keys == 100
    np.testing.assert_array_equal(first.p_values, again.p_values)
    assert first.p_value == again.p_value
    assert not np.array_equal(first.null_ssim, other.null_ssim)
    assert other.null_seed == 6


def test_zero_null_keys_skips_p_values(watermarked_fixture, tmp_path):
    scores = extract_json(watermarked_fixture["model"], "--key", watermarked_fixture["key"], "-o", tmp_path,
                          "--null-keys", "0")

    assert scores["p_value"] is None
    assert scores["null_keys"] == 0
    assert scores["ssim_mean"] > 0.9
    assert all("p_value" not in entry for entry in scores["keys"])


def test_text_output_shows_p_values(watermarked_fixture, tmp_path):
    result = subprocess.run([sys.executable, "-m", "onnxmark", "extract", watermarked_fixture["model"], "--key",
                             watermarked_fixture["key"], "-o", tmp_path, "--null-keys", "50", "--null-seed", "3"],
                            capture_output=True, text=True, cwd=ROOT)

    assert result.returncode == 0, result.stderr
    assert "combined p-value" in result.stdout
    assert "50 random keys, seed 3" in result.stdout
    assert "key  0: SSIM" in result.stdout
    assert " p 0.0196 " in result.stdout


def test_negative_null_keys_rejected(watermarked_fixture, tmp_path):
    result = subprocess.run([sys.executable, "-m", "onnxmark", "extract", watermarked_fixture["model"], "--key",
                             watermarked_fixture["key"], "-o", tmp_path / "out", "--null-keys", "-1"],
                            capture_output=True, text=True, cwd=ROOT)

    assert result.returncode == 2
    assert "--null-keys" in result.stderr
    assert not (tmp_path / "out").exists()
