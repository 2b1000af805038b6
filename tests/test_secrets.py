import io
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxmark.errors import OnnxmarkError
from onnxmark.secrets import (
    DEFAULT_SECRET_COUNT,
    default_texts,
    load_secret_image,
    render_text,
    secret_from_png_bytes,
    secret_to_png_bytes,
)


def dark_fraction(secret):
    return float((secret < 0.5).mean())


# --- default_texts -----------------------------------------------------------------------------


def test_default_texts_are_distinct_four_letters():
    texts = default_texts(DEFAULT_SECRET_COUNT, seed=0)

    assert len(texts) == 11
    assert texts[0] == "ABCD"
    assert len(set(texts)) == len(texts)
    for text in texts:
        assert len(text) == 4
        assert set(text) <= set(string.ascii_uppercase)


def test_default_texts_are_seeded():
    assert default_texts(5, seed=1) == default_texts(5, seed=1)
    assert default_texts(5, seed=1) != default_texts(5, seed=2)
    assert default_texts(3, seed=1) == default_texts(5, seed=1)[:3]


@pytest.mark.parametrize("count", [0, -1, 2.0, True])
def test_default_texts_rejects_bad_count(count):
    with pytest.raises(OnnxmarkError):
        default_texts(count, seed=0)


# --- render_text -------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(28, 28), (32, 32), (28, 56), (64, 48)])
def test_render_text_fills_image(height, width):
    for text in default_texts(4, seed=0):
        secret = render_text(text, 1, height, width)

        assert secret.shape == (1, height, width)
        assert secret.dtype == np.float32
        assert secret.min() >= 0.0
        assert secret.max() <= 1.0
        assert 0.05 <= dark_fraction(secret) <= 0.60, text


def dark_bands(secret):
    """Count runs of rows that contain dark pixels, which is the number of text lines."""
    has_ink = (secret < 0.5).any(axis=1).astype(int)
    return int(np.count_nonzero(np.diff(np.concatenate([[0], has_ink])) == 1))


def test_render_text_spans_most_of_image():
    secret = render_text("ABCD", 1, 28, 28)[0]

    dark_rows = np.flatnonzero((secret < 0.5).any(axis=1))
    dark_columns = np.flatnonzero((secret < 0.5).any(axis=0))

    assert dark_rows[-1] - dark_rows[0] + 1 >= 22
    assert dark_columns[-1] - dark_columns[0] + 1 >= 14


def test_render_text_keeps_white_margin():
    secret = render_text("ABCD", 1, 28, 28)[0]

    assert secret[0].min() == 1.0
    assert secret[-1].min() == 1.0
    assert secret[:, 0].min() == 1.0
    assert secret[:, -1].min() == 1.0


def test_render_text_uses_two_lines_when_square():
    square = render_text("ABCD", 1, 28, 28)[0]

    assert dark_bands(square) == 2
    np.testing.assert_array_equal(square, render_text("AB\nCD", 1, 28, 28)[0])


def test_render_text_uses_one_line_when_wide():
    wide = render_text("ABCD", 1, 28, 112)[0]

    assert dark_bands(wide) == 1


def test_render_text_differs_between_texts():
    secrets = [render_text(text, 1, 28, 28) for text in default_texts(6, seed=0)]

    for first in range(len(secrets)):
        for second in range(first + 1, len(secrets)):
            assert np.abs(secrets[first] - secrets[second]).mean() > 0.05


def test_render_text_repeats_gray_in_channels():
    gray = render_text("ABCD", 1, 28, 28)
    rgb = render_text("ABCD", 3, 28, 28)
    rgba = render_text("ABCD", 4, 28, 28)

    assert rgb.shape == (3, 28, 28)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[channel], gray[0])
        np.testing.assert_array_equal(rgba[channel], gray[0])
    np.testing.assert_array_equal(rgba[3], 1.0)


def test_render_text_honours_line_breaks():
    secret = render_text("A\nB", 1, 28, 112)[0]

    assert dark_bands(secret) == 2  # "AB" on one line would give taller letters here


@pytest.mark.parametrize(
    "text, channels, height, width",
    [("", 1, 28, 28), ("   ", 1, 28, 28), ("ABCD", 2, 28, 28), ("ABCD", 1, 0, 28), ("ABCD", 1, 28, 2.5)],
)
def test_render_text_rejects_bad_arguments(text, channels, height, width):
    with pytest.raises(OnnxmarkError):
        render_text(text, channels, height, width)


# --- load_secret_image -------------------------------------------------------------------------


def test_load_secret_image_resizes_and_converts(tmp_path):
    picture = Image.new("RGB", (40, 20), (255, 255, 255))
    picture.paste((0, 0, 0), (0, 0, 20, 20))  # left half black
    path = tmp_path / "logo.png"
    picture.save(path)

    gray = load_secret_image(str(path), 1, 28, 28)
    rgb = load_secret_image(str(path), 3, 32, 16)

    assert gray.shape == (1, 28, 28)
    assert gray.dtype == np.float32
    assert gray[0, 14, 2] == pytest.approx(0.0, abs=0.02)
    assert gray[0, 14, 25] == pytest.approx(1.0, abs=0.02)
    assert rgb.shape == (3, 32, 16)


def test_load_secret_image_makes_transparency_white(tmp_path):
    path = tmp_path / "transparent.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)

    secret = load_secret_image(str(path), 1, 8, 8)

    np.testing.assert_array_equal(secret, 1.0)


def test_load_secret_image_missing_file(tmp_path):
    with pytest.raises(OnnxmarkError, match="was not found"):
        load_secret_image(str(tmp_path / "missing.png"), 1, 28, 28)


def test_load_secret_image_unreadable_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG but not really")

    with pytest.raises(OnnxmarkError, match="Failed to read secret image"):
        load_secret_image(str(path), 1, 28, 28)


# --- PNG round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_png_round_trip(channels, mode):
    secret = np.random.default_rng(0).random((channels, 12, 10), dtype=np.float32)

    data = secret_to_png_bytes(secret)
    decoded = secret_from_png_bytes(data)

    assert data.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(data)).mode == mode
    assert decoded.shape == secret.shape
    assert decoded.dtype == np.float32
    assert np.abs(decoded - secret).max() <= 0.5 / 255 + 1e-6


def test_png_keeps_8_bit_levels():
    secret = render_text("ABCD", 3, 28, 28)
    levels = np.rint(secret * 255) / 255

    np.testing.assert_array_equal(secret_from_png_bytes(secret_to_png_bytes(levels)), levels.astype(np.float32))


def test_png_clips_out_of_range_values():
    secret = np.array([[[-0.5, 1.5]]], dtype=np.float32)

    decoded = secret_from_png_bytes(secret_to_png_bytes(secret))

    np.testing.assert_array_equal(decoded, [[[0.0, 1.0]]])


@pytest.mark.parametrize("secret", [np.zeros((2, 4, 4)), np.zeros((4, 4)), np.full((1, 4, 4), np.nan)])
def test_secret_to_png_rejects_bad_arrays(secret):
    with pytest.raises(OnnxmarkError):
        secret_to_png_bytes(secret)


def test_secret_from_png_rejects_garbage():
    with pytest.raises(OnnxmarkError, match="Failed to decode"):
        secret_from_png_bytes(b"definitely not an image")


def test_secrets_module_imports_without_torch():
    code = "import sys, onnxmark.secrets; print('torch' in sys.modules)"

    repository = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=repository, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "False"


def test_long_text_warns_once(caplog):
    from onnxmark import secrets

    secrets._warned_sizes.discard((28, 28))
    with caplog.at_level("WARNING", logger="onnxmark.secrets"):
        render_text("HELLO WORLD THIS IS LONG", 1, 28, 28)
        render_text("ANOTHER RATHER LONG TEXT", 1, 28, 28)
        render_text("ABCD", 1, 28, 28)

    warnings = [record for record in caplog.records if "too small to read" in record.getMessage()]
    assert len(warnings) == 1
    assert "HELLO WORLD" in warnings[0].getMessage()
