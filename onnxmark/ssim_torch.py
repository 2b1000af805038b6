"""Differentiable SSIM on torch tensors, the training counterpart of `onnxmark.ssim`.

The window sizes, sigma and constants come from `onnxmark.ssim`, so a score computed here
during training matches the score that the verifier computes in numpy.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from onnxmark.ssim import C1, C2, gaussian_kernel_1d, window_sigma_for, window_size_for

_KERNEL_CACHE_SIZE = 32


@functools.lru_cache(maxsize=_KERNEL_CACHE_SIZE)
def _separable_kernels(
    size: int, channels: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the grouped conv2d weights [C, 1, size, 1] and [C, 1, 1, size] of the Gaussian window."""
    kernel = gaussian_kernel_1d(size, window_sigma_for(size))

    # A kernel made under torch.inference_mode would be an inference tensor, and autograd
    # rejects it in every later training call that reuses the cached copy.
    with torch.inference_mode(False):
        kernel = torch.as_tensor(kernel, dtype=dtype, device=device)
        vertical = kernel.view(1, 1, size, 1).expand(channels, 1, size, 1).contiguous()
        horizontal = kernel.view(1, 1, 1, size).expand(channels, 1, 1, size).contiguous()
    return vertical, horizontal


def _local_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Filter each channel of x [N, C, H, W] with the Gaussian window, 'valid' only: [N, C, H', W']."""
    channels = x.shape[1]
    vertical, horizontal = _separable_kernels(size, channels, x.dtype, x.device)

    # NOTE: PyTorch lets cuDNN run float32 convolutions in TF32 by default
    # (torch.backends.cudnn.conv.fp32_precision is "tf32" in torch 2.14), which may move
    # float32 scores on CUDA further from the numpy score than the CPU tests allow.
    # Only the CUDA test, skipped without a GPU, checks this.
    x = F.conv2d(x, vertical, groups=channels)
    return F.conv2d(x, horizontal, groups=channels)


def ssim_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the SSIM per image [N] of two batches [N, C, H, W] in [0, 1], differentiable in both.

    The score is the mean of the SSIM map over positions and channels, as in
    `onnxmark.ssim.ssim_batch`. It is computed in the dtype of the inputs. The tests hold
    float32 scores to within 1e-5 of the float64 numpy score. The largest gaps come from
    nearly uniform windows far from the channel mean, so pass float64 tensors where exact
    agreement matters.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"SSIM needs two batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.ndim != 4:
        raise ValueError(f"SSIM expects batches shaped [N, C, H, W], got shape {tuple(a.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(
            f"SSIM expects floating-point images in [0, 1], got dtypes {a.dtype} and {b.dtype}"
        )
    if a.numel() == 0:
        raise ValueError(f"SSIM needs non-empty images, got shape {tuple(a.shape)}")

    batch_size = a.shape[0]
    size = window_size_for(a.shape[2], a.shape[3])

    # Variance as E[x^2] - E[x]^2 cancels badly in float32 where a window is nearly uniform,
    # such as the white background of a secret. Subtracting each channel's mean first leaves
    # variances and covariance unchanged and keeps the squares small. The Gaussian window
    # sums to 1, so adding the shift back restores the local means.
    shift_a = a.detach().mean(dim=(2, 3), keepdim=True)  # [N, C, 1, 1]
    shift_b = b.detach().mean(dim=(2, 3), keepdim=True)
    a = a - shift_a
    b = b - shift_b

    # One convolution pass for all five local statistics: [5N, C, H, W] -> [5N, C, H', W'].
    moments = _local_mean(torch.cat([a, b, a * a, b * b, a * b]), size)
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = moments.split(batch_size)

    variance_a = mean_aa - mean_a**2
    variance_b = mean_bb - mean_b**2
    covariance = mean_ab - mean_a * mean_b
    mean_a = mean_a + shift_a
    mean_b = mean_b + shift_b

    numerator = (2.0 * mean_a * mean_b + C1) * (2.0 * covariance + C2)
    denominator = (mean_a**2 + mean_b**2 + C1) * (variance_a + variance_b + C2)
    ssim_map = numerator / denominator
    return ssim_map.mean(dim=(1, 2, 3))
