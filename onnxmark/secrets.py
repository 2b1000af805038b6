"""Secrets: the images that a watermark key reveals, by default black text on white.

A secret is float32 [channels, height, width] in [0, 1], shaped like one model input in NCHW. Key
files store secrets as 8-bit PNG bytes.
"""

from __future__ import annotations

import io
import logging
import math
import random
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from onnxmark.errors import OnnxmarkError

log = logging.getLogger(__name__)

DEFAULT_SECRET_COUNT = 11
FIRST_DEFAULT_TEXT = "ABCD"
DEFAULT_TEXT_LENGTH = 4
SECRET_CHANNEL_COUNTS = (1, 3, 4)  # gray, RGB, RGBA

RENDER_FONT_SIZE = 200  # pixels, the size text is drawn at before it is scaled down to the secret's size
RENDER_LINE_SPACING = 0.15  # blank space between lines, as a fraction of the font size
RENDER_STROKE_FRACTION = 0.04  # outline that makes the font bold, as a fraction of the font size
# Lines of text drawn less than this many pixels high (letters and line spacing) cannot be read in the
# secret. The warning comes once per image size.
MIN_LEGIBLE_LETTER_PIXELS = 7
_warned_sizes: set[tuple[int, int]] = set()
MARGIN_FRACTION = 0.06  # white border on each side, as a fraction of the secret's shorter side
PNG_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def default_texts(count: int, seed: int) -> list[str]:
    """Return `count` distinct four-letter uppercase texts drawn with random.Random(seed), "ABCD" first."""
    if not _is_integer(count) or not 1 <= count <= len(string.ascii_uppercase) ** DEFAULT_TEXT_LENGTH:
        raise OnnxmarkError(f"Invalid secret count {count!r}: it must be an integer from 1 to 456976.")

    generator = random.Random(seed)
    texts = [FIRST_DEFAULT_TEXT]
    seen = set(texts)
    while len(texts) < count:
        text = "".join(generator.choices(string.ascii_uppercase, k=DEFAULT_TEXT_LENGTH))
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def render_text(text: str, channels: int, height: int, width: int) -> np.ndarray:
    """Render black text on white as a secret of float32 [channels, height, width] in [0, 1].

    The text is drawn large with Pillow's default font, cropped to its ink and scaled, keeping its
    aspect ratio, to fill the image apart from a small margin. Texts without line breaks are laid out
    on as many lines (from one up to four) as gives the tallest letters, so "ABCD" at 28x28 becomes
    "AB" over "CD". With 4 channels the text is in RGB and alpha is opaque.
    """
    if not isinstance(text, str) or not text.strip():
        raise OnnxmarkError(f"Invalid secret text {text!r}: it must contain at least one visible character.")
    channels, height, width = _check_secret_shape(channels, height, width)

    # NOTE: below about 16x16 pixels, four letters get 3 or 4 pixels each and are not legible.
    # This was checked by eye at 8x8, where only a shorter text helps.
    margin = max(1, round(MARGIN_FRACTION * min(height, width)))
    box_width, box_height = max(1, width - 2 * margin), max(1, height - 2 * margin)
    font = _load_font(RENDER_FONT_SIZE)

    best_ink, best_scale, best_lines = None, 0.0, 1
    for lines in _line_layouts(text):
        ink = _draw_lines(lines, font)
        scale = min(box_width / ink.width, box_height / ink.height)
        if scale > best_scale:
            best_ink, best_scale, best_lines = ink, scale, len(lines)

    letter_height = best_ink.height * best_scale / best_lines
    if letter_height < MIN_LEGIBLE_LETTER_PIXELS and (width, height) not in _warned_sizes:
        _warned_sizes.add((width, height))
        log.warning("The secret text %r is drawn with letters about %.0f pixels high at %dx%d, too small to read; "
                    "use a shorter text or --secret-image.", text, letter_height, width, height)

    size = (max(1, round(best_ink.width * best_scale)), max(1, round(best_ink.height * best_scale)))
    canvas = Image.new("L", (width, height), 255)
    canvas.paste(best_ink.resize(size, Image.Resampling.LANCZOS), ((width - size[0]) // 2, (height - size[1]) // 2))

    gray = np.asarray(canvas, dtype=np.float32) / 255.0  # [H, W]
    return _gray_to_channels(gray, channels)


def _load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        # NOTE: Pillow before 10.1 has no size argument and only an 11-pixel bitmap font, which is
        # drawn without the bold outline and scaled up, so large secrets come out blocky there.
        return ImageFont.load_default()


def _line_layouts(text: str) -> list[list[str]]:
    """List the ways to lay the text out: the given lines if it has line breaks, else 1 to 4 balanced lines."""
    if "\n" in text:
        return [text.split("\n")]

    layouts = []
    for line_count in range(1, min(len(text), 4) + 1):
        line_length = -(-len(text) // line_count)  # ceiling division
        lines = [text[start : start + line_length] for start in range(0, len(text), line_length)]
        if len(lines) == line_count:
            layouts.append(lines)
    return layouts


def _draw_lines(lines: list[str], font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """Draw centred lines of black text on white and crop the result to the ink's bounding box."""
    text = "\n".join(lines)
    if isinstance(font, ImageFont.FreeTypeFont):
        spacing, stroke = round(RENDER_LINE_SPACING * font.size), round(RENDER_STROKE_FRACTION * font.size)
    else:
        spacing, stroke = 2, 0  # the bitmap fallback font is 11 pixels tall and has no outline
    options = dict(font=font, spacing=spacing, align="center", stroke_width=stroke)

    box = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox((0, 0), text, **options)
    left, top, right, bottom = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
    padding = 4
    canvas = Image.new("L", (right - left + 2 * padding, bottom - top + 2 * padding), 255)
    ImageDraw.Draw(canvas).multiline_text((padding - left, padding - top), text, fill=0, stroke_fill=0, **options)

    ink_box = ImageOps.invert(canvas).getbbox()
    if ink_box is None:
        raise OnnxmarkError(f"Secret text {text!r} draws no visible pixels with Pillow's default font.")
    return canvas.crop(ink_box)


def load_secret_image(path: str, channels: int, height: int, width: int) -> np.ndarray:
    """Read an image file as a secret of float32 [channels, height, width] in [0, 1], resized to fit exactly.

    Transparent areas become white. One channel reads the image as gray, three as RGB, and four as
    RGBA with the file's own alpha.
    """
    channels, height, width = _check_secret_shape(channels, height, width)
    file = Path(path)
    if not file.is_file():
        raise OnnxmarkError(f"Secret image {path} was not found. Give the path to an image file.")

    try:
        with Image.open(file) as picture:
            picture.load()
            picture = _to_secret_mode(picture, channels)
    except (OSError, UnidentifiedImageError) as error:
        raise OnnxmarkError(f"Failed to read secret image {path}: {error}") from None

    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    return _picture_to_secret(picture)


def _to_secret_mode(picture: Image.Image, channels: int) -> Image.Image:
    if channels == 4:
        return picture.convert("RGBA")

    if picture.mode in ("LA", "RGBA", "PA") or "transparency" in picture.info:
        background = Image.new("RGBA", picture.size, (255, 255, 255, 255))
        picture = Image.alpha_composite(background, picture.convert("RGBA"))
    return picture.convert(PNG_MODES[channels])


def secret_to_png_bytes(secret: np.ndarray) -> bytes:
    """Encode a secret [C, H, W] as an 8-bit PNG: gray for C=1, RGB for C=3, RGBA for C=4.

    Values are clipped to [0, 1] and rounded to the nearest 1/255, so extracted images that overshoot
    the pixel range can be stored too.
    """
    secret = np.asarray(secret, dtype=np.float32)
    if secret.ndim != 3 or secret.shape[0] not in PNG_MODES:
        raise OnnxmarkError(f"Secret of shape {secret.shape} is not [C, H, W] with C in 1, 3 or 4.")
    if not np.isfinite(secret).all():
        raise OnnxmarkError("Secret contains NaN or infinite values and cannot be stored as PNG.")

    levels = np.rint(np.clip(secret, 0.0, 1.0) * 255.0).astype(np.uint8)
    if secret.shape[0] == 1:
        picture = Image.fromarray(levels[0])
    else:
        picture = Image.fromarray(np.ascontiguousarray(levels.transpose(1, 2, 0)))

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def secret_from_png_bytes(data: bytes) -> np.ndarray:
    """Decode PNG bytes into a secret [C, H, W] float32 in [0, 1], with C = 1 for gray, 3 for RGB, 4 for RGBA."""
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            mode = _decoded_mode(picture)
            if picture.mode != mode:
                picture = picture.convert(mode)
            return _picture_to_secret(picture)
    except (OSError, UnidentifiedImageError, TypeError) as error:
        raise OnnxmarkError(f"Failed to decode secret PNG data ({len(data)} bytes): {error}") from None


def _decoded_mode(picture: Image.Image) -> str:
    """Pick mode L, RGB or RGBA for a decoded image, keeping transparency where the file has it."""
    if picture.mode in PNG_MODES.values():
        return picture.mode
    if picture.mode in ("LA", "PA") or "transparency" in picture.info:
        return "RGBA"
    if picture.mode == "P":
        return "RGB"
    return "L"


def _picture_to_secret(picture: Image.Image) -> np.ndarray:
    array = np.asarray(picture, dtype=np.float32) / 255.0
    if array.ndim == 2:
        return array[None]  # [1, H, W]
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # [C, H, W]


def _gray_to_channels(gray: np.ndarray, channels: int) -> np.ndarray:
    if channels == 4:
        return np.concatenate([np.repeat(gray[None], 3, axis=0), np.ones_like(gray)[None]])
    return np.repeat(gray[None], channels, axis=0)


def _check_secret_shape(channels: int, height: int, width: int) -> tuple[int, int, int]:
    """Return channels, height and width as ints, raising OnnxmarkError for invalid values."""
    if not _is_integer(channels) or channels not in SECRET_CHANNEL_COUNTS:
        raise OnnxmarkError(f"Invalid secret channel count {channels!r}. Use 1 (gray), 3 (RGB) or 4 (RGBA).")
    for name, value in (("height", height), ("width", width)):
        if not _is_integer(value) or value < 1:
            raise OnnxmarkError(f"Invalid secret {name} {value!r}: it must be a positive integer.")
    return int(channels), int(height), int(width)


def _is_integer(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))
