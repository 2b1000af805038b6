"""Calibrated scores: how unusual each key's SSIM is among the SSIMs that random keys reach on the same suspect.

A suspect's transposed model is run on the real keys and on N random keys drawn like real keys. For key k,
the null distribution is the SSIM of every random key's output with secret k. Its empirical p-value is
(1 + #{null SSIMs >= real SSIM}) / (1 + N), and its z-score is (real - mean) / standard deviation of the
null SSIMs. Fisher's method combines the per-key p-values into one.

This module is part of the verifier, so it imports numpy only.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from onnxmark.ssim import ssim_matrix

log = logging.getLogger(__name__)

# Real keys are drawn uniformly from this range so that they overlap the range of real logits, and the
# random keys of the null distribution come from the same range.
KEY_LOW, KEY_HIGH = -10.0, 10.0
DEFAULT_NULL_KEYS = 200
DEFAULT_NULL_SEED = 0
# Mixed into the seed of the random keys. Embed draws its keys from numpy's default_rng(seed), so without
# this the random keys for seed 0 would start with the very keys that embed drew for seed 0.
NULL_KEY_STREAM = 0x6E756C6C
COMBINATION_METHOD = "fisher"
# Null SSIMs whose standard deviation is below this do not vary (rounding leaves ~1e-17 for equal values),
# so their z-score is undefined.
MIN_NULL_SPREAD = 1e-9


@dataclass
class Calibration:
    """The null distribution of every key's SSIM on one suspect, and the p-values and z-scores it gives."""

    null_seed: int
    null_ssim: np.ndarray       # [N, K] SSIM of random key j's output with secret k
    real_ssim: np.ndarray       # [K] SSIM of key k's output with secret k
    wrong_ssim: np.ndarray      # [K, K] SSIM of key k's output with secret m; the diagonal is real_ssim
    p_values: np.ndarray        # [K] empirical p-values
    z_scores: np.ndarray        # [K] NaN where the null SSIMs do not vary
    p_value: float              # Fisher's combination of p_values

    @property
    def null_keys(self) -> int:
        return len(self.null_ssim)

    def key_entry(self, index: int) -> dict:
        """Return the per-key fields of `extract --json`; JSON has no NaN, so an undefined z-score is None."""
        null = self.null_ssim[:, index]
        others = np.delete(self.wrong_ssim[index], index)
        z_score = self.z_scores[index]
        return {
            "p_value": float(self.p_values[index]),
            "z_score": None if math.isnan(z_score) else float(z_score),
            "null_ssim_mean": float(null.mean()),
            "null_ssim_max": float(null.max()),
            "wrong_secret_ssim_max": float(others.max()) if others.size else None,
            "wrong_secret_ssim_mean": float(others.mean()) if others.size else None,
        }


def draw_null_keys(count: int, width: int, seed: int, key_range: float = KEY_HIGH) -> np.ndarray:
    """Draw `count` random key vectors [count, width], uniform in [-key_range, key_range] like real keys."""
    generator = np.random.default_rng([NULL_KEY_STREAM, seed])
    return generator.uniform(-key_range, key_range, (count, width)).astype(np.float32)


def check_key_range(keys: np.ndarray, key_range: float = KEY_HIGH) -> None:
    """Warn when real keys lie outside the range random keys come from, which would bias the p-values."""
    if keys.size and (keys.min() < -key_range or keys.max() > key_range):
        log.warning("The key vectors range from %.3g to %.3g, outside [%g, %g] where the random keys of the "
                    "null distribution come from, so the p-values compare unlike keys and may mislead.",
                    keys.min(), keys.max(), -key_range, key_range)


def calibrate(images: np.ndarray, null_images: np.ndarray, secrets: np.ndarray, null_seed: int) -> Calibration:
    """Score the real keys' images [K, C, H, W] against the random keys' images [N, C, H, W], both in [0, 1]."""
    if len(null_images) == 0:
        raise ValueError("Calibration needs at least one random key")

    wrong_ssim = ssim_matrix(images, secrets)            # [K, K]
    real_ssim = np.diagonal(wrong_ssim).copy()
    null_ssim = ssim_matrix(null_images, secrets)        # [N, K]
    p_values = empirical_p_values(real_ssim, null_ssim)

    return Calibration(null_seed=null_seed, null_ssim=null_ssim, real_ssim=real_ssim, wrong_ssim=wrong_ssim,
                       p_values=p_values, z_scores=z_scores(real_ssim, null_ssim),
                       p_value=fisher_combined(p_values))


def empirical_p_values(real: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Return (1 + #{null[:, k] >= real[k]}) / (1 + N) per key, for real [K] and null [N, K].

    The +1 counts the real value as one draw of the null distribution, so no p-value is 0 and each one is
    valid (P(p <= a) <= a for every level a) when the real key is exchangeable with the random keys.
    """
    exceed = (null >= real[None, :]).sum(axis=0)
    return (1.0 + exceed) / (1.0 + len(null))


def z_scores(real: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Return (real - mean) / standard deviation (ddof 1) of the null SSIMs per key, NaN where they do not vary."""
    mean = null.mean(axis=0)
    spread = null.std(axis=0, ddof=1) if len(null) > 1 else np.zeros_like(mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(spread > MIN_NULL_SPREAD, (real - mean) / spread, np.nan)


def fisher_combined(p_values: np.ndarray) -> float:
    """Combine K p-values with Fisher's method: X = -2 sum(ln p) against chi-square with 2K degrees of freedom.

    NOTE: Fisher's method assumes independent p-values. Given the suspect, the real keys' images are
    independent, but every key is ranked against the same random keys' images, so the p-values are positively
    dependent. benchmarks/bench_false_positives.py computes the worst case, where all secrets rank the random
    images in the same order. With 200 random keys and 11 keys, the combined p-value falls below a level a
    less often than a, for a from 1e-2 down to 1e-10, because the +1 in the empirical p-values makes up for
    the dependence. Other numbers of keys or random keys are not checked.
    """
    p_values = np.asarray(p_values, dtype=np.float64)
    if p_values.size == 0:
        raise ValueError("Fisher's method needs at least one p-value")
    if np.any((p_values <= 0) | (p_values > 1)):
        raise ValueError(f"p-values must lie in (0, 1], got {p_values.min()} to {p_values.max()}")
    statistic = -2.0 * float(np.log(p_values).sum())
    return chi2_even_sf(statistic, 2 * p_values.size)


def chi2_even_sf(statistic: float, degrees: int) -> float:
    """Return P(chi-square with an even number of degrees of freedom >= statistic).

    For 2K degrees of freedom the survival function is a Poisson sum: exp(-x/2) sum_{i<K} (x/2)^i / i!.
    The terms are added in log space, so many degrees of freedom or a large statistic do not overflow.
    """
    if degrees <= 0 or degrees % 2:
        raise ValueError(f"the closed form needs a positive even number of degrees of freedom, got {degrees}")
    half = statistic / 2.0
    if half <= 0:
        return 1.0
    log_terms = [-half + i * math.log(half) - math.lgamma(i + 1) for i in range(degrees // 2)]
    largest = max(log_terms)
    return min(1.0, math.exp(largest) * math.fsum(math.exp(term - largest) for term in log_terms))
