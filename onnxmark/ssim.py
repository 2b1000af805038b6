"""Structural similarity (SSIM) of images in [0, 1], in numpy.

This follows Wang, Bovik, Sheikh and Simoncelli, "Image Quality Assessment: From Error
Visibility to Structural Similarity", IEEE Transactions on Image Processing, 2004: an
11 x 11 Gaussian window with sigma 1.5, K1 = 0.01 and K2 = 0.03. The local statistics are
computed per channel with 'valid' filtering (no padding), and the score is the mean of the
SSIM map over positions and channels.

The verifier uses this module, so it imports numpy only. `onnxmark.ssim_torch` computes
the same quantity on torch tensors for training.
"""

from __future__ import annotations

import numpy as np

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
MIN_WINDOW_SIZE = 3
K1 = 0.01
K2 = 0.03
DATA_RANGE = 1.0
C1 = (K1 * DATA_RANGE) ** 2
C2 = (K2 * DATA_RANGE) ** 2


def window_size_for(height: int, width: int) -> int:
    """Return the side of the square Gaussian window used for an image of this size.

    Images of at least `WINDOW_SIZE` pixels on each side get `WINDOW_SIZE`. Smaller images
    get the largest odd size that fits, down to `MIN_WINDOW_SIZE`. When the short side is
    under `MIN_WINDOW_SIZE` pixels, the window spans the whole short side (1 or 2 pixels).
    """
    if height < 1 or width < 1:
        raise ValueError(f"SSIM needs an image of at least 1 x 1 pixels, got {height} x {width}")

    short_side = min(height, width)
    if short_side >= WINDOW_SIZE:
        return WINDOW_SIZE
    if short_side < MIN_WINDOW_SIZE:
        return short_side
    if short_side % 2 == 0:
        return short_side - 1
    return short_side


def window_sigma_for(size: int) -> float:
    """Return the Gaussian sigma for a window of `size` pixels, 1.5 scaled by size / 11."""
    return WINDOW_SIGMA * size / WINDOW_SIZE


def gaussian_kernel_1d(size: int, sigma: float) -> np.ndarray:
    """Return a 1-D Gaussian of `size` taps centred on the middle tap, summing to 1 (float64)."""
    if size < 1:
        raise ValueError(f"Gaussian window size must be at least 1, got {size}")
    if sigma <= 0:
        raise ValueError(f"Gaussian sigma must be positive, got {sigma}")

    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    kernel = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """Return the 2-D Gaussian window [size, size] that sums to 1 (float64)."""
    kernel = gaussian_kernel_1d(size, sigma)
    return np.outer(kernel, kernel)


def _valid_filter_matrix(length: int, kernel: np.ndarray) -> np.ndarray:
    """Return the banded matrix [length - k + 1, length] that applies `kernel` as a 'valid' filter."""
    output_length = length - kernel.size + 1
    matrix = np.zeros((output_length, length), dtype=np.float64)
    for row in range(output_length):
        matrix[row, row : row + kernel.size] = kernel
    return matrix


def _local_mean_filter(height: int, width: int):
    """Return the Gaussian local mean for images of this size: [..., H, W] -> [..., H', W'] ('valid')."""
    size = window_size_for(height, width)
    kernel = gaussian_kernel_1d(size, window_sigma_for(size))
    rows_filter = _valid_filter_matrix(height, kernel)
    columns_filter = _valid_filter_matrix(width, kernel)

    def local_mean(x: np.ndarray) -> np.ndarray:
        # The separable Gaussian as two banded matrix products.
        return rows_filter @ x @ columns_filter.T

    return local_mean


def _ssim_map_mean(mean_a, mean_b, variance_a, variance_b, covariance) -> np.ndarray:
    """Return the mean of the SSIM map over the last two axes, from the local moments."""
    numerator = (2.0 * mean_a * mean_b + C1) * (2.0 * covariance + C2)
    denominator = (mean_a**2 + mean_b**2 + C1) * (variance_a + variance_b + C2)
    return (numerator / denominator).mean(axis=(-2, -1))


def _ssim_per_channel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the mean SSIM map value per leading index, for a and b shaped [..., H, W]."""
    local_mean = _local_mean_filter(*a.shape[-2:])

    a = a.astype(np.float64, copy=False)
    b = b.astype(np.float64, copy=False)
    mean_a = local_mean(a)
    mean_b = local_mean(b)
    variance_a = local_mean(a * a) - mean_a**2
    variance_b = local_mean(b * b) - mean_b**2
    covariance = local_mean(a * b) - mean_a * mean_b
    return _ssim_map_mean(mean_a, mean_b, variance_a, variance_b, covariance)


def _validate_pair(
    a: np.ndarray, b: np.ndarray, allowed_ndims: tuple[int, ...], layout: str
) -> None:
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs two images of the same shape, got {a.shape} and {b.shape}")
    if a.ndim not in allowed_ndims:
        raise ValueError(f"SSIM expects images shaped {layout}, got shape {a.shape}")
    for image in (a, b):
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(
                f"SSIM expects floating-point images in [0, 1], got dtype {image.dtype}. "
                "Convert 8-bit images with x / 255."
            )
    if a.size == 0:
        raise ValueError(f"SSIM needs non-empty images, got shape {a.shape}")


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Return the SSIM of two images shaped [C, H, W] or [H, W] with values in [0, 1].

    The score is the mean over positions and channels. Values outside [0, 1] are not
    clipped, and the constants still assume a data range of 1.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    _validate_pair(a, b, (2, 3), "[C, H, W] or [H, W]")
    return float(_ssim_per_channel(a, b).mean())


def ssim_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return one SSIM score per image [N] for two batches shaped [N, C, H, W] in [0, 1]."""
    a = np.asarray(a)
    b = np.asarray(b)
    _validate_pair(a, b, (4,), "[N, C, H, W]")
    return _ssim_per_channel(a, b).mean(axis=1)


def ssim_matrix(images: np.ndarray, references: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Return the SSIM of every image with every reference, [N, K], for batches shaped [N, C, H, W] and [K, C, H, W].

    Entry [i, k] equals `ssim_batch` of image i and reference k. The local means and variances of each image
    and each reference are computed once, so only the covariance is computed per pair. Images go through in
    chunks of `chunk` to bound the memory of the float64 intermediates.
    """
    images = np.asarray(images)
    references = np.asarray(references)
    if images.ndim != 4 or references.ndim != 4 or images.shape[1:] != references.shape[1:]:
        raise ValueError(f"SSIM matrix needs batches shaped [N, C, H, W] and [K, C, H, W] with the same C, H and W, "
                         f"got {images.shape} and {references.shape}")
    _validate_pair(images[:1], references[:1], (4,), "[N, C, H, W]")

    local_mean = _local_mean_filter(*images.shape[-2:])
    refs = references.astype(np.float64)
    mean_refs = local_mean(refs)                                   # [K, C, H', W']
    variance_refs = local_mean(refs * refs) - mean_refs**2

    scores = np.empty((len(images), len(references)), dtype=np.float64)
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk].astype(np.float64)    # [n, C, H, W]
        mean_batch = local_mean(batch)
        variance_batch = local_mean(batch * batch) - mean_batch**2
        for index, reference in enumerate(refs):
            covariance = local_mean(batch * reference) - mean_batch * mean_refs[index]
            per_channel = _ssim_map_mean(mean_batch, mean_refs[index], variance_batch, variance_refs[index],
                                         covariance)                # [n, C]
            scores[start:start + chunk, index] = per_channel.mean(axis=1)
    return scores


def mse_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the mean squared error per image [N] for two batches shaped [N, ...] (float64)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"MSE needs two batches of the same shape, got {a.shape} and {b.shape}")
    if a.ndim < 1:
        raise ValueError(f"MSE expects batches shaped [N, ...], got a scalar of shape {a.shape}")

    if a.size == 0 and a.shape[0] > 0:
        raise ValueError(f"MSE needs non-empty images, got shape {a.shape}")

    squared_error = (a - b) ** 2
    return squared_error.mean(axis=tuple(range(1, a.ndim)))
