"""The statistics behind the calibrated p-values: SSIM matrix, empirical p-values, z-scores, Fisher's method."""
from __future__ import annotations

import math

import numpy as np
import pytest

from onnxmark.calibration import (KEY_HIGH, KEY_LOW, calibrate, chi2_even_sf, draw_null_keys, empirical_p_values,
                                  fisher_combined, z_scores)
from onnxmark.ssim import ssim_batch, ssim_matrix


def test_ssim_matrix_matches_pairwise_ssim():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (45, 3, 16, 13)).astype(np.float32)
    references = rng.uniform(0, 1, (4, 3, 16, 13)).astype(np.float32)
    references[1] = images[7]

    matrix = ssim_matrix(images, references, chunk=8)

    assert matrix.shape == (45, 4)
    for index in range(4):
        expected = ssim_batch(images, np.repeat(references[index:index + 1], len(images), axis=0))
        np.testing.assert_allclose(matrix[:, index], expected, rtol=0, atol=1e-12)
    assert matrix[7, 1] == pytest.approx(1.0)


def test_ssim_matrix_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same C, H and W"):
        ssim_matrix(np.zeros((2, 1, 8, 8), np.float32), np.zeros((2, 1, 8, 9), np.float32))


@pytest.mark.parametrize("statistic, degrees", [(0.5, 2), (3.0, 4), (22.0, 22), (116.7, 22), (40.0, 60),
                                                (2000.0, 2000), (900.0, 400)])
def test_chi2_survival_matches_scipy(statistic, degrees):
    stats = pytest.importorskip("scipy.stats")

    expected = stats.chi2.sf(statistic, degrees)

    assert chi2_even_sf(statistic, degrees) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_chi2_survival_rejects_odd_degrees():
    with pytest.raises(ValueError, match="even"):
        chi2_even_sf(1.0, 3)


def test_fisher_of_single_p_value():
    for p_value in (1.0, 0.5, 0.01, 1 / 201):
        assert fisher_combined(np.array([p_value])) == pytest.approx(p_value, rel=1e-12)


def test_fisher_combines_small_p_values():
    assert fisher_combined(np.ones(11)) == 1.0
    assert fisher_combined(np.full(11, 1 / 201)) < 1e-12
    assert fisher_combined(np.full(11, 0.5)) > 0.5


def test_fisher_rejects_invalid_p_values():
    with pytest.raises(ValueError, match="p-values must lie"):
        fisher_combined(np.array([0.5, 0.0]))
    with pytest.raises(ValueError, match="at least one"):
        fisher_combined(np.array([]))


def test_empirical_p_values_count_ties():
    null = np.array([[0.1, 0.5], [0.2, 0.5], [0.3, 0.5], [0.9, 0.5]])
    real = np.array([0.3, 0.5])

    p_values = empirical_p_values(real, null)

    np.testing.assert_allclose(p_values, [(1 + 2) / 5, (1 + 4) / 5])


def test_empirical_p_value_floor():
    null = np.zeros((200, 3))

    np.testing.assert_allclose(empirical_p_values(np.ones(3), null), 1 / 201)


def test_z_scores_undefined_without_spread():
    null = np.array([[0.0, 0.2], [2.0, 0.2], [4.0, 0.2]])

    scores = z_scores(np.array([6.0, 0.9]), null)

    assert scores[0] == pytest.approx(2.0)
    assert math.isnan(scores[1])


def test_null_keys_uniform_and_repeatable():
    keys = draw_null_keys(5000, 10, seed=3)

    assert keys.shape == (5000, 10)
    assert keys.dtype == np.float32
    assert keys.min() >= KEY_LOW
    assert keys.max() <= KEY_HIGH
    assert abs(float(keys.mean())) < 0.1
    np.testing.assert_array_equal(keys, draw_null_keys(5000, 10, seed=3))
    assert not np.array_equal(keys[:10], draw_null_keys(10, 10, seed=4))


def test_null_keys_follow_key_range():
    keys = draw_null_keys(5000, 10, seed=3, key_range=1.0)

    assert keys.min() >= -1.0
    assert keys.max() <= 1.0
    assert keys.max() > 0.99


def test_null_keys_avoid_embed_keys():
    """Embed draws its keys from default_rng(seed); the random keys of the same seed must not repeat them."""
    for seed in range(3):
        embed_keys = np.random.default_rng(seed).uniform(KEY_LOW, KEY_HIGH, (11, 10)).astype(np.float32)
        random_keys = draw_null_keys(200, 10, seed)
        distances = np.abs(random_keys[:, None, :] - embed_keys[None, :, :]).max(axis=2)
        assert distances.min() > 0.1


def test_fisher_is_conservative_under_shared_null():
    """The keys share one null set. In the worst case, every secret ranks the random keys' images alike."""
    rng = np.random.default_rng(0)
    replicates, null_count, key_count = 20000, 200, 11
    combined = np.empty(replicates)
    for start in range(0, replicates, 1000):
        real = rng.uniform(0, 1, (1000, key_count))
        null = rng.uniform(0, 1, (1000, null_count, 1))     # one score per random image, for every secret
        exceed = (null >= real[:, None, :]).sum(axis=1)
        p_values = (1.0 + exceed) / (1.0 + null_count)
        combined[start:start + 1000] = [fisher_combined(row) for row in p_values]

    # Expected about 0.041 and 0.0072; the binomial standard error is under 0.0015 and 0.0007.
    assert (combined < 0.05).mean() <= 0.05
    assert (combined < 0.01).mean() <= 0.01
    assert (combined < 0.5).mean() > 0.3


def test_calibrate_reports_wrong_secret_control():
    rng = np.random.default_rng(1)
    secrets = rng.uniform(0, 1, (3, 1, 12, 12)).astype(np.float32)
    images = secrets + rng.normal(0, 0.05, secrets.shape).astype(np.float32)
    null_images = rng.uniform(0, 1, (50, 1, 12, 12)).astype(np.float32)

    calibration = calibrate(np.clip(images, 0, 1), null_images, secrets, null_seed=7)
    entry = calibration.key_entry(0)

    assert calibration.null_keys == 50
    assert calibration.null_seed == 7
    np.testing.assert_allclose(calibration.p_values, 1 / 51)
    assert calibration.p_value < 1e-3
    assert entry["p_value"] == pytest.approx(1 / 51)
    assert entry["z_score"] > 5
    assert entry["wrong_secret_ssim_max"] == pytest.approx(max(calibration.wrong_ssim[0, 1:]))
    assert entry["wrong_secret_ssim_mean"] == pytest.approx(np.mean(calibration.wrong_ssim[0, 1:]))
    assert calibration.real_ssim[0] > 0.8
    assert calibration.real_ssim[0] > entry["wrong_secret_ssim_max"] + 0.5
