import subprocess
import sys

import numpy as np
import pytest
import torch

import onnxmark.ssim_torch
from onnxmark.ssim import gaussian_window, mse_batch, ssim, ssim_batch, window_size_for
from onnxmark.ssim_torch import ssim_torch

# Written out here rather than imported, so that a wrong constant in the module fails the
# reference comparison.
REFERENCE_K1 = 0.01
REFERENCE_K2 = 0.03
REFERENCE_SIGMA_AT_11 = 1.5


def reference_ssim(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """Compute SSIM [H, W] window by window with two-pass statistics, as a slow, plain reference."""
    sigma = REFERENCE_SIGMA_AT_11 * size / 11
    taps = np.array([np.exp(-((k - (size - 1) / 2) ** 2) / (2 * sigma**2)) for k in range(size)])
    weights = np.outer(taps, taps)
    weights /= weights.sum()
    c1 = REFERENCE_K1**2
    c2 = REFERENCE_K2**2

    scores = []
    height, width = a.shape
    for top in range(height - size + 1):
        for left in range(width - size + 1):
            patch_a = a[top : top + size, left : left + size]
            patch_b = b[top : top + size, left : left + size]
            mean_a = np.sum(weights * patch_a)
            mean_b = np.sum(weights * patch_b)
            variance_a = np.sum(weights * (patch_a - mean_a) ** 2)
            variance_b = np.sum(weights * (patch_b - mean_b) ** 2)
            covariance = np.sum(weights * (patch_a - mean_a) * (patch_b - mean_b))
            luminance = (2 * mean_a * mean_b + c1) / (mean_a**2 + mean_b**2 + c1)
            structure = (2 * covariance + c2) / (variance_a + variance_b + c2)
            scores.append(luminance * structure)
    return float(np.mean(scores))


def structured_images(shape: tuple[int, ...], rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return pairs [N, C, H, W] of random, noisy, text-like, checkerboard and ramp images in [0, 1]."""
    height, width = shape[-2:]
    rows = np.arange(height)[:, None]
    columns = np.arange(width)[None, :]

    text = np.ones(shape)
    text[..., height // 3 : 2 * height // 3, width // 6 : 5 * width // 6] = 0.0
    checkerboard = np.broadcast_to(((rows // 2 + columns // 2) % 2).astype(float), shape)
    ramp = np.broadcast_to(np.linspace(0.0, 1.0, width)[None, :] * np.ones((height, 1)), shape)
    near_white = np.full(shape, 0.999)

    def noisy(image: np.ndarray, scale: float) -> np.ndarray:
        return np.clip(image + scale * rng.standard_normal(shape), 0.0, 1.0)

    return [
        (rng.random(shape), rng.random(shape)),
        (text, noisy(text, 0.05)),
        (checkerboard, noisy(checkerboard, 0.2)),
        (ramp, noisy(ramp, 0.002)),
        (near_white, np.clip(near_white - 0.001 * rng.random(shape), 0.0, 1.0)),
        (text, 1.0 - text),
    ]


def test_gaussian_window_normalised_and_symmetric():
    window = gaussian_window(11, 1.5)

    assert window.shape == (11, 11)
    assert window.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(window, window.T, atol=0)
    np.testing.assert_allclose(window, window[::-1, ::-1], atol=1e-18)
    assert np.unravel_index(window.argmax(), window.shape) == (5, 5)
    assert window[5, 5] / window[5, 6] == pytest.approx(np.exp(1 / (2 * 1.5**2)))


def test_gaussian_window_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        gaussian_window(0, 1.5)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_window(11, 0.0)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (224, 224, 11),
        (28, 28, 11),
        (11, 40, 11),
        (10, 10, 9),
        (9, 30, 9),
        (8, 8, 7),
        (32, 8, 7),
        (5, 5, 5),
        (4, 6, 3),
        (3, 3, 3),
        (2, 2, 2),
        (2, 9, 2),
        (1, 5, 1),
    ],
)
def test_window_size_for_image_sizes(height, width, expected):
    assert window_size_for(height, width) == expected


def test_window_size_for_rejects_empty_image():
    with pytest.raises(ValueError, match="0 x 5"):
        window_size_for(0, 5)


@pytest.mark.parametrize(("shape", "size"), [((14, 13), 11), ((11, 11), 11), ((8, 8), 7), ((5, 7), 5), ((4, 4), 3)])
def test_ssim_matches_double_loop_reference(shape, size):
    rng = np.random.default_rng(7)
    a = rng.random(shape)
    b = np.clip(a + 0.3 * rng.standard_normal(shape), 0.0, 1.0)

    assert window_size_for(*shape) == size
    assert ssim(a, b) == pytest.approx(reference_ssim(a, b, size), abs=1e-12)


def test_ssim_averages_channels():
    rng = np.random.default_rng(8)
    a = rng.random((3, 12, 12))
    b = rng.random((3, 12, 12))

    per_channel = [reference_ssim(a[channel], b[channel], 11) for channel in range(3)]
    assert ssim(a, b) == pytest.approx(np.mean(per_channel), abs=1e-12)


@pytest.mark.parametrize(("value_a", "value_b"), [(0.2, 0.8), (0.0, 1.0), (0.5, 0.5), (1.0, 0.9)])
def test_ssim_constant_images_luminance_only(value_a, value_b):
    # Flat images have zero variance, so only the luminance term (2ab + C1) / (a² + b² + C1) remains.
    a = np.full((1, 16, 16), value_a)
    b = np.full((1, 16, 16), value_b)
    c1 = REFERENCE_K1**2

    expected = (2 * value_a * value_b + c1) / (value_a**2 + value_b**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, abs=1e-12)


def test_ssim_basic_properties():
    rng = np.random.default_rng(9)
    a = rng.random((2, 20, 20))
    slightly_noisy = np.clip(a + 0.02 * rng.standard_normal(a.shape), 0.0, 1.0)
    very_noisy = np.clip(a + 0.3 * rng.standard_normal(a.shape), 0.0, 1.0)

    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, very_noisy) == pytest.approx(ssim(very_noisy, a), abs=1e-12)
    assert ssim(a, slightly_noisy) > ssim(a, very_noisy)
    assert ssim(a, 1.0 - a) < 0.0
    assert -1.0 <= ssim(a, 1.0 - a)


def test_ssim_float32_and_2d_inputs():
    rng = np.random.default_rng(10)
    a = rng.random((15, 15))
    b = rng.random((15, 15))

    a32 = a.astype(np.float32)
    b32 = b.astype(np.float32)

    assert ssim(a, b) == pytest.approx(ssim(a[None], b[None]), abs=1e-12)
    assert ssim(a32, b32) == pytest.approx(ssim(a32.astype(np.float64), b32.astype(np.float64)), abs=1e-12)


def test_ssim_batch_scores_each_image():
    rng = np.random.default_rng(11)
    a = rng.random((4, 3, 16, 16))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0.0, 1.0)
    b[2] = a[2]

    scores = ssim_batch(a, b)

    assert scores.shape == (4,)
    for index in range(4):
        assert scores[index] == pytest.approx(ssim(a[index], b[index]), abs=1e-12)
    assert scores[2] == pytest.approx(1.0, abs=1e-12)


def test_mse_batch_known_values():
    a = np.zeros((3, 1, 2, 2))
    b = np.zeros((3, 1, 2, 2))
    b[1] = 0.5
    b[2, 0, 0, 0] = 1.0

    np.testing.assert_allclose(mse_batch(a, b), [0.0, 0.25, 0.25])


def test_mse_batch_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 4\)"):
        mse_batch(np.zeros((2, 3)), np.zeros((2, 4)))


def test_ssim_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(1, 8, 8\) and \(1, 8, 9\)"):
        ssim(np.zeros((1, 8, 8)), np.zeros((1, 8, 9)))
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\) and \(3, 1, 8, 8\)"):
        ssim_batch(np.zeros((2, 1, 8, 8)), np.zeros((3, 1, 8, 8)))


def test_ssim_rejects_wrong_dimensions():
    with pytest.raises(ValueError, match=r"\[C, H, W\] or \[H, W\]"):
        ssim(np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ssim_batch(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)))


def test_ssim_rejects_integer_and_empty_images():
    with pytest.raises(ValueError, match="uint8"):
        ssim(np.zeros((8, 8), dtype=np.uint8), np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        ssim(np.zeros((0, 8, 8)), np.zeros((0, 8, 8)))


def test_numpy_ssim_does_not_import_torch():
    code = "import sys, onnxmark.ssim; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (3, 3, 32, 32), (3, 1, 8, 8)])
def test_ssim_torch_matches_numpy_float32(shape):
    rng = np.random.default_rng(12)
    for a, b in structured_images(shape, rng):
        a32 = a.astype(np.float32)
        b32 = b.astype(np.float32)

        expected = ssim_batch(a32, b32)
        actual = ssim_torch(torch.from_numpy(a32), torch.from_numpy(b32)).numpy()

        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (2, 1, 8, 8), (2, 2, 2, 5), (2, 1, 1, 1)])
def test_ssim_torch_matches_numpy_float64(shape):
    rng = np.random.default_rng(13)
    for a, b in structured_images(shape, rng):
        expected = ssim_batch(a, b)
        a_tensor = torch.from_numpy(np.ascontiguousarray(a))
        b_tensor = torch.from_numpy(np.ascontiguousarray(b))

        actual = ssim_torch(a_tensor, b_tensor).numpy()

        np.testing.assert_allclose(actual, expected, atol=1e-10, rtol=0)


def test_ssim_torch_identical_images_score_one():
    images = torch.rand(4, 3, 32, 32)

    scores = ssim_torch(images, images.clone())

    assert scores.shape == (4,)
    torch.testing.assert_close(scores, torch.ones(4), atol=1e-6, rtol=0)


def test_ssim_torch_gradients_reach_inputs():
    a = torch.rand(2, 1, 28, 28, requires_grad=True)
    b = torch.rand(2, 1, 28, 28, requires_grad=True)

    loss = (1.0 - ssim_torch(a, b)).mean()
    loss.backward()

    for grad in (a.grad, b.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_ssim_torch_gradient_step_raises_score():
    target = torch.from_numpy(structured_images((1, 1, 28, 28), np.random.default_rng(14))[1][0]).float()
    image = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0), requires_grad=True)
    before = ssim_torch(image, target).item()

    optimizer = torch.optim.SGD([image], lr=1.0)
    for _ in range(20):
        optimizer.zero_grad()
        (1.0 - ssim_torch(image, target)).sum().backward()
        optimizer.step()

    assert ssim_torch(image, target).item() > before + 0.1


def test_ssim_torch_after_inference_mode():
    # Kernels first made and cached under inference mode must stay usable by autograd.
    onnxmark.ssim_torch._separable_kernels.cache_clear()
    with torch.inference_mode():
        ssim_torch(torch.rand(1, 1, 13, 13), torch.rand(1, 1, 13, 13))
    image = torch.rand(1, 1, 13, 13, requires_grad=True)

    ssim_torch(image, torch.rand(1, 1, 13, 13)).sum().backward()

    assert image.grad is not None


def test_ssim_torch_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 8\) and \(1, 1, 8, 9\)"):
        ssim_torch(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ssim_torch(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="torch.int64"):
        ssim_torch(torch.zeros(1, 1, 8, 8, dtype=torch.int64), torch.zeros(1, 1, 8, 8, dtype=torch.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ssim_torch_matches_numpy_on_cuda():
    rng = np.random.default_rng(15)
    for a, b in structured_images((2, 3, 32, 32), rng):
        a32 = a.astype(np.float32)
        b32 = b.astype(np.float32)

        actual = ssim_torch(torch.from_numpy(a32).cuda(), torch.from_numpy(b32).cuda()).cpu().numpy()

        np.testing.assert_allclose(actual, ssim_batch(a32, b32), atol=1e-5, rtol=0)
