"""`onnxmark attack` on the watermarked fixture model: every attack kind, its output file and its errors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from cli.main import ATTACK_KINDS, main
from onnxmark.attacks import ATTACKS
from onnxmark.extract import extract
from onnxmark.keyfile import load_key
from tests.conftest import FIXTURE_MODEL
from tests.test_cli import last_json, onnxmark
from tests.test_model_forms import small_cnn

# Bars on the fixture model watermarked with 11 keys on mnist-sample.
PRUNE_60_SSIM = 0.60
FINETUNE_SSIM = 0.85          # 2 epochs at embed's training learning rate, 1e-3
FINETUNE_TENTH_LR_SSIM = 0.90  # 2 epochs at 1e-4
REPLACED_HEAD_SSIM = 0.5
VISIBLE_SSIM = 0.3
ACCURACY_WINDOW = 0.05


def watermarked_fixture(tmp_path_factory) -> tuple[Path, Path]:
    """Embed the fixture model once per test session; return the watermarked model and its key."""
    folder = tmp_path_factory.getbasetemp() / "watermarked-fixture"
    summary_path = folder / "summary.json"
    if not summary_path.exists():
        result = onnxmark("embed", FIXTURE_MODEL, "--data", "mnist-sample", "-o", folder, "--seed", 0, "--json")
        summary_path.write_text(json.dumps(last_json(result)))
    summary = json.loads(summary_path.read_text())
    return Path(summary["model"]), Path(summary["key"])


@pytest.fixture(scope="module")
def watermarked(tmp_path_factory):
    return watermarked_fixture(tmp_path_factory)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, check=True) -> Outcome:
    """Run the command line in this process, which saves the start-up of a new Python process per test."""
    result = CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)
    outcome = Outcome(result.exit_code, result.stdout, result.stderr)
    if check and outcome.returncode != 0:
        raise AssertionError(f"onnxmark {' '.join(map(str, args))} failed:\n{outcome.stderr}")
    return outcome


def attack(kind, model, output, *options, check=True):
    result = run_cli("attack", kind, model, "-o", output, "--json", *options, check=check)
    return last_json(result) if check else result


def assert_rejected(result, output, *messages):
    """Check that an attack ended with exit code 2, named each message and wrote no output."""
    assert result.returncode == 2
    for message in messages:
        assert message in result.stderr
    assert not output.exists()


def mean_ssim(path, key_path) -> float:
    return float(extract(path, load_key(key_path)).ssim.mean())


def initializers(path) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load(path).graph.initializer}


def without_initializers(path) -> bytes:
    model = onnx.load(path)
    del model.graph.initializer[:]
    return model.SerializeToString()


def logits(path, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    info = session.get_inputs()[0]
    dtype = np.float16 if info.type == "tensor(float16)" else np.float32
    return session.run(None, {info.name: inputs.astype(dtype)})[0].astype(np.float32)


def digits(count: int = 64) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (count, 1, 28, 28)).astype(np.float32)


def test_command_line_lists_every_attack():
    assert set(ATTACK_KINDS) == set(ATTACKS)


# ----- pruning -----

def test_prune_zeroes_requested_fraction(watermarked, tmp_path):
    model, key = watermarked
    output = tmp_path / "pruned.onnx"

    summary = attack("prune", model, output, "--level", "0.6", "--data", "mnist-sample")

    before, after = initializers(model), initializers(output)
    pruned = summary["pruned_tensors"]
    zeros = sum(int((after[name] == 0).sum()) for name in pruned)
    total = sum(after[name].size for name in pruned)
    assert set(pruned) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"}
    assert zeros / total == pytest.approx(0.6, abs=1e-6)
    assert summary["pruned_weights"] == zeros
    for name in ("conv1.bias", "fc1.bias", "fc3.bias"):
        np.testing.assert_array_equal(after[name], before[name])
    assert without_initializers(output) == without_initializers(model)
    onnx.checker.check_model(onnx.load(output), full_check=True)
    assert summary["accuracy_before"] >= 0.9
    assert summary["accuracy_after"] >= summary["accuracy_before"] - 0.05
    assert mean_ssim(output, key) >= PRUNE_60_SSIM


def test_prune_keeps_largest_weights(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "pruned.onnx"

    summary = attack("prune", model, output, "--level", "0.3")

    before, after = initializers(model), initializers(output)
    kept = np.concatenate([np.abs(before[name][after[name] != 0]) for name in summary["pruned_tensors"]])
    removed = np.concatenate([np.abs(before[name][after[name] == 0]) for name in summary["pruned_tensors"]])
    assert removed.max() <= kept.min()
    assert summary["accuracy_before"] is None


def test_prune_level_zero_changes_nothing(watermarked, tmp_path):
    model, key = watermarked
    output = tmp_path / "pruned.onnx"

    attack("prune", model, output, "--level", "0")

    before, after = initializers(model), initializers(output)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_prune_level_outside_range(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "pruned.onnx"

    result = attack("prune", model, output, "--level", "1.5", check=False)

    assert_rejected(result, output, "1.5")


def test_fineprune_keeps_pruned_weights_zero(watermarked, tmp_path):
    model, key = watermarked
    output = tmp_path / "fineprune.onnx"

    summary = attack("fineprune", model, output, "--level", "0.5", "--epochs", "1", "--lr", "1e-4",
                     "--data", "mnist-sample")

    before, after = initializers(model), initializers(output)
    pruned = summary["pruned_tensors"]
    zeros = sum(int((after[name] == 0).sum()) for name in pruned)
    total = sum(after[name].size for name in pruned)
    assert zeros / total == pytest.approx(0.5, abs=1e-6)
    assert not np.array_equal(after["fc1.bias"], before["fc1.bias"])
    assert summary["accuracy_after"] >= summary["accuracy_before"] - 0.02
    assert mean_ssim(output, key) >= PRUNE_60_SSIM


# ----- fine-tuning -----

def test_finetune_tenth_learning_rate(watermarked, tmp_path):
    model, key = watermarked
    output = tmp_path / "finetuned.onnx"

    summary = attack("finetune", model, output, "--epochs", "2", "--lr", "1e-4", "--data", "mnist-sample")

    assert summary["epochs"] == 2
    assert summary["train_images"] == 4000
    assert not np.array_equal(initializers(output)["fc1.weight"], initializers(model)["fc1.weight"])
    assert without_initializers(output) == without_initializers(model)
    assert summary["accuracy_after"] >= summary["accuracy_before"] - 0.01
    assert mean_ssim(output, key) >= FINETUNE_TENTH_LR_SSIM


def test_finetune_training_learning_rate(watermarked, tmp_path):
    model, key = watermarked
    output = tmp_path / "finetuned.onnx"

    attack("finetune", model, output, "--epochs", "2", "--data", "mnist-sample")

    assert mean_ssim(output, key) >= FINETUNE_SSIM


def test_finetune_on_other_data(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "finetuned.onnx"

    summary = attack("finetune", model, output, "--epochs", "1", "--lr", "1e-4", "--data", "mnist-sample",
                     "--train-data", "digits")

    assert summary["train_data"] == "digits"
    assert summary["train_images"] == 1797
    assert summary["accuracy_after"] is not None


def test_finetune_on_train_data_alone(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "finetuned.onnx"

    summary = attack("finetune", model, output, "--epochs", "1", "--lr", "1e-4", "--train-data", "digits")

    assert summary["train_images"] == 1797
    assert summary["accuracy_before"] is None
    assert summary["accuracy_after"] is None
    onnx.checker.check_model(onnx.load(output))


def test_finetune_needs_data(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "finetuned.onnx"

    result = attack("finetune", model, output, check=False)

    assert_rejected(result, output, "--data")


def test_replace_head_with_stored_head(watermarked, tmp_path):
    model, key = watermarked
    output = tmp_path / "new_head.onnx"

    summary = attack("replace-head", model, output, "--classes", "12", "--epochs", "1", "--data", "mnist-sample")

    attacked = onnx.load(output)
    onnx.checker.check_model(attacked, full_check=True)
    assert summary["head_weight"] == "fc3.weight"
    assert initializers(output)["fc3.weight"].shape == (12, 256)
    assert logits(output, digits(4)).shape == (4, 12)
    assert summary["accuracy_after"] >= 0.9
    extraction = extract(output, load_key(key))
    assert extraction.ssim.mean() >= REPLACED_HEAD_SSIM
    assert any("head stored in the key" in note for note in extraction.notes)


def test_replace_head_labels_must_fit(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "new_head.onnx"

    result = attack("replace-head", model, output, "--classes", "5", "--data", "mnist-sample", check=False)

    assert_rejected(result, output, "labels 0 to 9", "5 classes")


# ----- overwrite and erase -----

def test_overwrite_reports_every_step(watermarked, tmp_path):
    model, key = watermarked
    output = tmp_path / "overwritten.onnx"

    summary = attack("overwrite", model, output, "--steps", "30", "--measure-every", "10", "--watch-key", key,
                     "--data", "mnist-sample")

    history = summary["history"]
    assert [row["step"] for row in history] == [0, 10, 20, 30]
    assert history[0]["accuracy"] == pytest.approx(summary["accuracy_before"], abs=1e-6)
    assert history[-1]["attack_ssim"] > history[0]["attack_ssim"] + 0.3
    assert history[-1]["ssim_mean"] < history[0]["ssim_mean"]
    assert summary["ssim_mean"] == pytest.approx(mean_ssim(output, key), abs=1e-6)
    for row in history:
        if row["accuracy"] >= summary["accuracy_before"] - ACCURACY_WINDOW:
            assert row["ssim_mean"] >= VISIBLE_SSIM, row


def test_overwrite_uses_own_keys(watermarked, tmp_path):
    model, key = watermarked
    output = tmp_path / "overwritten.onnx"

    summary = attack("overwrite", model, output, "--steps", "1")

    assert "ABCD" not in summary["attacker_texts"]
    assert len(summary["attacker_texts"]) == 11
    assert summary["history"][0]["ssim_mean"] is None


def test_erase_with_known_key(watermarked, tmp_path):
    model, key = watermarked
    output = tmp_path / "erased.onnx"

    summary = attack("erase", model, output, "--key", key, "--steps", "20", "--measure-every", "5",
                     "--data", "mnist-sample")

    history = summary["history"]
    assert [row["step"] for row in history] == [0, 5, 10, 15, 20]
    assert all(row["accuracy"] is not None and row["ssim_mean"] is not None for row in history)
    assert history[-1]["ssim_mean"] < history[0]["ssim_mean"] - 0.3
    assert summary["ssim_mean"] == pytest.approx(mean_ssim(output, key), abs=1e-6)


def test_erase_towards_reference_model(watermarked, tmp_path):
    model, key = watermarked
    output = tmp_path / "erased.onnx"

    summary = attack("erase", model, output, "--key", key, "--replacement", "reference", "--reference",
                     FIXTURE_MODEL, "--steps", "10")

    assert summary["replacement"] == "reference"
    assert summary["history"][-1]["attack_ssim"] > summary["history"][0]["attack_ssim"]


@pytest.mark.parametrize("options, message", [
    ([], "--key"),
    (["--key", "KEY", "--replacement", "reference"], "--reference"),
    (["--key", "KEY", "--level", "0.2"], "does not use --level"),
])
def test_erase_bad_options(watermarked, tmp_path, options, message):
    model, key = watermarked
    output = tmp_path / "erased.onnx"

    result = attack("erase", model, output, *[str(key) if o == "KEY" else o for o in options], check=False)

    assert_rejected(result, output, message)


# ----- rewrites -----

def test_quantize_dynamic(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "int8.onnx"

    summary = attack("quantize", model, output, "--data", "mnist-sample")

    op_types = {node.op_type for node in onnx.load(output).graph.node}
    assert {"ConvInteger", "MatMulInteger"} <= op_types
    assert summary["initializer_types"]["INT8"] >= 5
    assert summary["accuracy_after"] >= summary["accuracy_before"] - 0.01


def test_quantize_static(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "int8.onnx"

    summary = attack("quantize", model, output, "--mode", "static", "--calibration-size", "64",
                     "--data", "mnist-sample")

    op_types = {node.op_type for node in onnx.load(output).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types
    assert summary["calibration_images"] == 64
    assert summary["accuracy_after"] >= summary["accuracy_before"] - 0.01


def test_quantize_static_needs_data(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "int8.onnx"

    result = attack("quantize", model, output, "--mode", "static", check=False)

    assert_rejected(result, output, "--data")


@pytest.mark.parametrize("keep_io_types", [False, True])
def test_fp16_converts_weights(watermarked, tmp_path, keep_io_types):
    model, key = watermarked
    output = tmp_path / "fp16.onnx"

    summary = attack("fp16", model, output, *(["--keep-io-types"] if keep_io_types else []))

    converted = onnx.load(output)
    assert {tensor.data_type for tensor in converted.graph.initializer} == {onnx.TensorProto.FLOAT16}
    input_type = converted.graph.input[0].type.tensor_type.elem_type
    assert input_type == (onnx.TensorProto.FLOAT if keep_io_types else onnx.TensorProto.FLOAT16)
    assert summary["keep_io_types"] == keep_io_types
    np.testing.assert_allclose(logits(output, digits()), logits(model, digits()), atol=0.05)


def test_fold_bn_removes_batch_norm(tmp_path):
    source = tmp_path / "bn.onnx"
    onnx.save(small_cnn(17), source)
    output = tmp_path / "folded.onnx"

    summary = attack("fold-bn", source, output)

    folded = onnx.load(output)
    assert summary["folded"] == ["bn"]
    assert "BatchNormalization" not in {node.op_type for node in folded.graph.node}
    assert not {"bn.scale", "bn.bias", "bn.mean", "bn.var"} & set(initializers(output))
    inputs = np.random.default_rng(1).normal(0, 1, (8, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(logits(output, inputs), logits(source, inputs), rtol=1e-4, atol=1e-4)


def test_fold_bn_adds_bias_to_conv_without_one(tmp_path):
    model = small_cnn(17)
    conv = model.graph.node[0]
    del conv.input[2]
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "conv.b"))
    source, output = tmp_path / "bn.onnx", tmp_path / "folded.onnx"
    onnx.save(model, source)

    attack("fold-bn", source, output)

    folded = onnx.load(output)
    assert len(folded.graph.node[0].input) == 3
    inputs = np.random.default_rng(2).normal(0, 1, (8, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(logits(output, inputs), logits(source, inputs), rtol=1e-4, atol=1e-4)


def test_fold_bn_without_batch_norm_says_so(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "folded.onnx"

    result = run_cli("attack", "fold-bn", model, "-o", output)

    assert "written unchanged" in result.stdout
    assert onnx.load(output).SerializeToString() == onnx.load(model).SerializeToString()


@pytest.mark.parametrize("level", ["basic", "extended"])
def test_optimize_keeps_outputs(watermarked, tmp_path, level):
    model, _ = watermarked
    output = tmp_path / f"{level}.onnx"

    summary = attack("optimize", model, output, "--optimization", level)

    assert summary["optimization"] == level
    assert summary["nodes_after"] < summary["nodes_before"]
    np.testing.assert_allclose(logits(output, digits()), logits(model, digits()), rtol=1e-4, atol=1e-4)


def test_rename_renames_everything(watermarked, tmp_path):
    model, key = watermarked
    output = tmp_path / "renamed.onnx"

    attack("rename", model, output)

    original, renamed = onnx.load(model), onnx.load(output)
    old_names = {name for node in original.graph.node for name in (node.name, *node.input, *node.output)}
    old_names |= {tensor.name for tensor in original.graph.initializer}
    new_names = {name for node in renamed.graph.node for name in (node.name, *node.input, *node.output)}
    new_names |= {tensor.name for tensor in renamed.graph.initializer}
    new_names |= {info.name for info in (*renamed.graph.input, *renamed.graph.output)}
    assert not (old_names - {""}) & new_names
    np.testing.assert_array_equal(logits(output, digits()), logits(model, digits()))


def test_rename_can_keep_io_names(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "renamed.onnx"

    summary = attack("rename", model, output, "--keep-io-names")

    renamed = onnx.load(output)
    assert [info.name for info in renamed.graph.input] == ["input"]
    assert [info.name for info in renamed.graph.output] == ["logits"]
    assert summary["kept_names"] == ["input", "logits"]
    assert "fc1.weight" not in initializers(output)


def test_rename_avoids_kept_names(tmp_path):
    model = small_cnn(17)
    rename_tensor(model, "x", "tensor_0")
    rename_tensor(model, "logits", "tensor_1")
    source, output = tmp_path / "named.onnx", tmp_path / "renamed.onnx"
    onnx.save(model, source)

    attack("rename", source, output, "--keep-io-names")

    renamed = onnx.load(output)
    outputs = [name for node in renamed.graph.node for name in node.output]
    assert len(outputs) == len(set(outputs))
    assert not {"tensor_0", "tensor_1"} & {tensor.name for tensor in renamed.graph.initializer}
    inputs = np.random.default_rng(3).normal(0, 1, (4, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(logits(output, inputs), logits(source, inputs))


def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for info in (*model.graph.input, *model.graph.output):
        if info.name == old:
            info.name = new


def test_opset_converts(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "opset19.onnx"

    summary = attack("opset", model, output, "--target", "19")

    converted = onnx.load(output)
    assert [entry.version for entry in converted.opset_import if entry.domain in ("", "ai.onnx")] == [19]
    assert summary["opset_before"] == 17
    np.testing.assert_allclose(logits(output, digits()), logits(model, digits()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target, message", [("99", "Invalid --target 99"), ("13", "cannot convert")])
def test_opset_bad_target(watermarked, tmp_path, target, message):
    model, _ = watermarked
    output = tmp_path / "converted.onnx"

    result = attack("opset", model, output, "--target", target, check=False)

    assert_rejected(result, output, message)


# ----- the command itself -----

def test_attack_does_not_overwrite_without_force(watermarked, tmp_path):
    model, _ = watermarked
    output = tmp_path / "renamed.onnx"
    output.write_bytes(b"an earlier file")

    result = attack("rename", model, output, check=False)
    assert result.returncode == 2
    assert "--force" in result.stderr
    assert output.read_bytes() == b"an earlier file"

    attack("rename", model, output, "--force")
    onnx.checker.check_model(onnx.load(output))


def test_unknown_attack_kind(watermarked, tmp_path):
    model, _ = watermarked

    result = run_cli("attack", "melt", model, "-o", tmp_path / "out.onnx", check=False)

    assert_rejected(result, tmp_path / "out.onnx", "melt")


def test_attack_missing_model(tmp_path):
    result = run_cli("attack", "rename", tmp_path / "absent.onnx", "-o", tmp_path / "out.onnx", check=False)

    assert_rejected(result, tmp_path / "out.onnx", "not found")


def test_attack_text_output(watermarked, tmp_path):
    """In a new process, as a user runs it."""
    model, _ = watermarked

    result = onnxmark("attack", "prune", model, "-o", tmp_path / "pruned.onnx", "--level", "0.2",
                      "--data", "mnist-sample")

    assert "attacked model:" in result.stdout
    assert "held-out accuracy" in result.stdout


def test_new_head_replaces_batch_norm_after_it(tmp_path):
    """The burn model's logits come from a BatchNormalization after its last Gemm; both are replaced."""
    from onnxmark.attacks.finetune import find_head, with_new_head
    from onnxmark.graph import import_graph
    from tests.conftest import real_model

    path = real_model("pytorch2.0.0_burn_mnist_bn.onnx")
    head = find_head(import_graph(path))
    model = with_new_head(onnx.load(path), head, 12, np.random.default_rng(0))
    output = tmp_path / "new_head.onnx"
    onnx.save(model, output)

    assert head.weight == "fc2.weight"
    assert head.norm is not None and head.norm.op_type == "BatchNormalization"
    assert initializers(output)["norm2.running_var"].shape == (12,)
    assert logits(output, digits(1)).shape == (1, 12)   # the burn model has a fixed batch of 1


def test_preprocessing_defaults_to_key(watermarked, tmp_path):
    from cli.main import _preprocessing_or_key
    from onnxmark.data import Preprocessing

    _, key_path = watermarked
    key = load_key(key_path)
    key.preprocessing = Preprocessing(mean=(0.1307,), std=(0.3081,))
    normalised = tmp_path / "key.json"
    normalised.write_text(key.to_json())

    assert _preprocessing_or_key(None, None, None, normalised).to_dict() == key.preprocessing.to_dict()
    assert _preprocessing_or_key((0.0, 255.0), None, None, normalised).to_dict() == \
        Preprocessing(low=0.0, high=255.0).to_dict()
