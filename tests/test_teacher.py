"""Teacher mode: the main task learns to agree with the original model's outputs, so data needs no labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from onnxmark.data import InputSpec, Preprocessing, load_dataset, shifted_copies
from onnxmark.embed import EmbedOptions, embed, train_without_watermark
from onnxmark.evaluate import agreement, predict
from onnxmark.extract import extract
from onnxmark.graph import import_graph, load_onnx
from onnxmark.keyfile import load_key
from onnxmark.plan import build_plan
from onnxmark.training import TrainingConfig, Watermarker, class_targets, distillation_loss
from tests.conftest import FIXTURE_MODEL, real_model, real_model_options
from tests.test_cli import last_json, onnxmark

# Real models without labelled data for their own task beside the repository, so teacher mode watermarks them.
REAL_TEACHER_MODELS = [
    "keras2onnx_mnist_mlp_softmax.onnx",
    "tf2onnx_gtsrb_43cls_nhwc.onnx",
    "tf2onnx_traffic_classifier64_nhwc.onnx",
    "pytorch1.7_cifar10_imageclassifier.onnx",
    "pytorch1.10_cifar10_resize.onnx",
]


def random_digits(count: int, seed: int = 0) -> np.ndarray:
    """Uint8 images [count, 28, 28] with a bright square on black, like the fixture model's input."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 28, 28), np.uint8)
    for image, (row, column) in zip(images, rng.integers(2, 18, (count, 2))):
        image[row:row + 8, column:column + 8] = 255
    return images


# ----- distillation and agreement -----

def test_distillation_loss_zero_for_own_logits():
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)) * 5

    loss = distillation_loss(logits, logits.clone(), temperature=2.0)

    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_positive_for_other_logits():
    generator = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(16, 10, generator=generator), torch.randn(16, 10, generator=generator)

    assert float(distillation_loss(logits, teacher, temperature=2.0)) > 0.01


def test_distillation_loss_ignores_logit_offset():
    """Softmax ignores a constant added to all logits, so the loss does too."""
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))

    assert float(distillation_loss(logits + 3.0, logits, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)


def test_class_targets_of_teacher_logits():
    teacher = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    labels = torch.tensor([2, 0])

    assert class_targets(teacher).tolist() == [1, 0]
    assert class_targets(labels) is labels


def test_unchanged_model_agrees_with_itself():
    model_bytes = FIXTURE_MODEL.read_bytes()
    inputs = np.random.default_rng(0).uniform(0, 1, (50, 1, 28, 28)).astype(np.float32)

    assert agreement(model_bytes, model_bytes, inputs) == 1.0


def test_teacher_logits_agree_with_onnxruntime():
    """The recorded teacher logits come from the unmodified model: their top-1 classes match onnxruntime's."""
    graph = import_graph(FIXTURE_MODEL, load_onnx(FIXTURE_MODEL))
    spec = InputSpec.from_dims(graph.input_dims)
    watermarker = Watermarker(graph, build_plan(graph), spec, Preprocessing(), np.zeros((1, 10), np.float32),
                              np.zeros((1, 1, 28, 28), np.float32), TrainingConfig())
    inputs = np.random.default_rng(0).uniform(0, 1, (300, 1, 28, 28)).astype(np.float32)

    logits = watermarker.teacher_logits(inputs)

    assert logits.shape == (300, 10)
    np.testing.assert_array_equal(logits.argmax(axis=1), predict(FIXTURE_MODEL.read_bytes(), inputs))
    monitor = torch.from_numpy(inputs), class_targets(torch.from_numpy(logits))
    assert watermarker.accuracy_on(*monitor) == 1.0


def test_shifted_copies_translate_and_repeat_edges():
    image = np.zeros((1, 1, 5, 5), np.float32)
    image[0, 0, 2, 2] = 1.0
    image[0, 0, :, 0] = 0.5  # left edge, repeated when the image moves right

    copies = shifted_copies(image, copies=20, max_shift=1, seed=0)

    assert copies.shape == (20, 1, 5, 5)
    for copy in copies:
        (row, column), = np.argwhere(copy[0] == 1.0)
        assert abs(row - 2) <= 1
        assert abs(column - 2) <= 1
        if column == 3:
            assert (copy[0, :, 0] == 0.5).all()
            assert (copy[0, :, 1] == 0.5).all()
    assert len({copy.tobytes() for copy in copies}) > 1


# ----- command line -----

@pytest.fixture(scope="module")
def unlabelled_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "images.npz"
    np.savez(path, x=random_digits(60))
    return path


def test_npz_without_labels_selects_teacher_mode(tmp_path, unlabelled_npz):
    result = onnxmark("embed", FIXTURE_MODEL, "--data", unlabelled_npz, "--held-out", "20", "--epochs", "0",
                      "-o", tmp_path / "out", "--json")
    summary = last_json(result)

    assert summary["teacher"] is True
    assert summary["mode"] == "trained"
    assert summary["accuracy_before"] is None
    assert summary["accuracy_after"] is None
    assert summary["hardening_steps"] == 0
    assert summary["learning_rate"] == 1e-3
    assert "teacher mode" in result.stderr


def test_agreement_in_json_is_a_fraction(tmp_path, unlabelled_npz):
    result = onnxmark("embed", FIXTURE_MODEL, "--data", unlabelled_npz, "--held-out", "20", "--epochs", "0",
                      "--teacher", "-o", tmp_path / "out", "--json")
    summary = last_json(result)

    assert isinstance(summary["agreement"], float)
    assert 0.0 <= summary["agreement"] <= 1.0
    # Zero epochs leave every weight as it was.
    assert summary["agreement"] == 1.0


def test_flat_image_folder_selects_teacher_mode(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(random_digits(30)):
        Image.fromarray(image).save(folder / f"{index:03d}.png")

    result = onnxmark("embed", FIXTURE_MODEL, "--data", folder, "--held-out", "10", "--epochs", "0",
                      "-o", tmp_path / "out", "--json")
    summary = last_json(result)

    assert summary["teacher"] is True
    assert summary["accuracy_before"] is None


def test_teacher_with_labels_only_measures_accuracy(tmp_path):
    data = tmp_path / "labelled.npz"
    np.savez(data, x=random_digits(60), y=np.arange(60) % 10)

    result = onnxmark("embed", FIXTURE_MODEL, "--data", data, "--held-out", "20", "--epochs", "0", "--teacher",
                      "-o", tmp_path / "out")

    assert "teacher mode" in result.stdout
    assert "agreement with the original" in result.stdout
    assert "held-out accuracy" in result.stdout


def test_teacher_with_scratch_mode_is_rejected(tmp_path, unlabelled_npz):
    result = onnxmark("embed", FIXTURE_MODEL, "--data", unlabelled_npz, "--teacher", "--mode", "scratch",
                      "-o", tmp_path / "out", check=False)

    assert result.returncode == 2
    assert "--teacher" in result.stderr
    assert "--mode scratch" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unlabelled_data_with_scratch_mode_is_rejected(tmp_path, unlabelled_npz):
    result = onnxmark("embed", FIXTURE_MODEL, "--data", unlabelled_npz, "--held-out", "20", "--mode", "scratch",
                      "-o", tmp_path / "out", check=False)

    assert result.returncode == 2
    assert "no labels" in result.stderr
    assert not (tmp_path / "out").exists()


def test_library_rejects_teacher_with_scratch_mode(tmp_path):
    from onnxmark.errors import OnnxmarkError

    options = EmbedOptions(data="mnist-sample", output_dir=tmp_path / "out", teacher=True, mode="scratch")

    with pytest.raises(OnnxmarkError, match="scratch"):
        embed(FIXTURE_MODEL, options)


# ----- end to end -----

@pytest.fixture(scope="module")
def trained_fixture(tmp_path_factory):
    """The fixture model after one epoch on mnist-sample without a watermark."""
    folder = tmp_path_factory.mktemp("trained")
    model_bytes, _ = train_without_watermark(FIXTURE_MODEL, EmbedOptions(data="mnist-sample", output_dir=folder,
                                                                         epochs=1))
    path = folder / "trained.onnx"
    path.write_bytes(model_bytes)
    return path


def test_teacher_embed_of_trained_fixture(tmp_path, trained_fixture):
    """One epoch of teacher mode on a briefly trained fixture model keeps its predictions and shows the mark."""
    summary = embed(trained_fixture, EmbedOptions(data="mnist-sample", output_dir=tmp_path / "out", teacher=True,
                                                  epochs=1))
    scores = extract(summary["model"], load_key(summary["key"]))

    assert summary["teacher"] is True
    assert summary["agreement"] >= 0.97
    assert summary["accuracy_after"] >= summary["accuracy_before"] - 0.01
    assert float(np.mean(scores.ssim)) >= 0.9


def test_trained_mode_ignores_wrong_labels(tmp_path, trained_fixture):
    """With labels, trained mode still distils from the original: labels that contradict it change nothing."""
    digits = load_dataset("mnist-sample")
    data = tmp_path / "wrong_labels.npz"
    np.savez(data, x=(digits.images[:, 0] * 255).round().astype(np.uint8), y=(digits.labels + 1) % 10)

    summary = embed(trained_fixture, EmbedOptions(data=str(data), output_dir=tmp_path / "out", mode="trained",
                                                  epochs=1))

    assert summary["teacher"] is False
    assert summary["mode"] == "trained"
    assert summary["accuracy_before"] < 0.1    # every label is off by one class
    assert summary["agreement"] >= 0.97


# NOTE: these small convolutional models keep about 97% agreement in teacher mode, but their watermark
# stays under mean SSIM 0.7 (gtsrb 0.67 at 96.4 % agreement, the others under 0.2). Their 4 to 24 channels
# and 10 to 16 hidden units leave little capacity to spare. With a relaxed agreement guard, none of them
# kept 95% agreement at mean SSIM 0.85 or more.
WEAK_TEACHER_WATERMARK = {"tf2onnx_gtsrb_43cls_nhwc.onnx", "tf2onnx_traffic_classifier64_nhwc.onnx",
                          "pytorch1.7_cifar10_imageclassifier.onnx"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason="mean SSIM stays under 0.7"))
    if name in WEAK_TEACHER_WATERMARK else name for name in REAL_TEACHER_MODELS])
def test_real_model_teacher_embed(tmp_path, name):
    path = real_model(name)
    summary = last_json(onnxmark("embed", path, "--seed", 0, "--data", "mnist-sample", "--teacher", *real_model_options(name),
                                 "-o", tmp_path, "--json"))
    scores = last_json(onnxmark("extract", summary["model"], "--key", summary["key"], "-o", tmp_path / "check",
                                "--json"))

    assert summary["agreement"] >= 0.97
    assert scores["ssim_mean"] >= 0.85
