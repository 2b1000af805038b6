"""The command line end to end on the shipped fixture model, and its errors."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxmark.embed import EmbedOptions, train_without_watermark
from onnxmark.extract import extract
from onnxmark.keyfile import load_key
from tests.conftest import FIXTURE_MODEL, ROOT
from tests.test_rules import unsupported_model


def onnxmark(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "onnxmark", *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"onnxmark {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def last_json(result):
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed")
    result = onnxmark("embed", FIXTURE_MODEL, "--data", "mnist-sample", "-o", folder, "--seed", 0, "--json")
    return folder, last_json(result)


def test_embed_reports_every_field(embedded):
    _, summary = embedded
    for field in ("model", "key", "ssim_mean", "ssim_min", "accuracy_before", "accuracy_after",
                  "hardening_steps", "learning_rate", "seconds"):
        assert field in summary
    assert summary["mode"] == "scratch"
    assert summary["hardening_steps"] > 0
    assert summary["learning_rate"] == 1e-3


def test_embed_watermark_is_visible(embedded):
    _, summary = embedded
    assert summary["ssim_mean"] >= 0.90
    assert summary["accuracy_after"] >= 0.94


def test_extract_matches_embed(embedded, tmp_path):
    folder, summary = embedded
    result = onnxmark("extract", summary["model"], "--key", summary["key"], "-o", tmp_path / "evidence", "--json")
    scores = last_json(result)

    assert len(scores["keys"]) == 11
    assert scores["ssim_mean"] == pytest.approx(summary["ssim_mean"], abs=1e-6)
    assert scores["ssim_min"] == pytest.approx(summary["ssim_min"], abs=1e-6)
    for entry in scores["keys"]:
        assert Path(entry["image"]).is_file()
        assert set(entry) >= {"index", "ssim", "mse", "image"}
    assert (tmp_path / "evidence" / "sheet.png").is_file()


def test_extract_into_embed_evidence_rewrites_nothing(embedded):
    folder, summary = embedded
    evidence = Path(summary["evidence"])
    before = {path.name: path.read_bytes() for path in evidence.iterdir()}

    result = onnxmark("extract", summary["model"], "--key", summary["key"], "-o", evidence, check=False)

    assert result.returncode == 0, result.stderr
    assert {path.name: path.read_bytes() for path in evidence.iterdir()} == before


def test_unwatermarked_training_is_control(embedded):
    """Same training without watermark: accuracy within 1 point, and the key finds nothing in it."""
    folder, summary = embedded
    key = load_key(summary["key"])
    options = EmbedOptions(data="mnist-sample", output_dir=folder)

    model_bytes, control_accuracy = train_without_watermark(FIXTURE_MODEL, options)
    control = extract("control.onnx", key, onnx.load_from_string(model_bytes))

    assert summary["accuracy_after"] >= control_accuracy - 0.01
    assert control.ssim.mean() <= 0.10


def test_written_model_keeps_the_graph(embedded):
    _, summary = embedded
    original, written = onnx.load(FIXTURE_MODEL), onnx.load(summary["model"])
    onnx.checker.check_model(written, full_check=True)

    changed = [a.name for a, b in zip(original.graph.initializer, written.graph.initializer)
               if onnx.numpy_helper.to_array(a).tobytes() != onnx.numpy_helper.to_array(b).tobytes()]
    assert "fc1.weight" in changed
    for model in (original, written):
        del model.graph.initializer[:]
    assert original.SerializeToString() == written.SerializeToString()


def test_key_is_private_and_records_model_hash(embedded):
    folder, summary = embedded
    key_path = Path(summary["key"])
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = load_key(key_path)
    import hashlib
    assert key.model_sha256 == hashlib.sha256(Path(summary["model"]).read_bytes()).hexdigest()
    assert key.keys.shape == (11, 10)
    assert key.keys.min() >= -10
    assert key.keys.max() <= 10


def test_embed_does_not_overwrite_without_force(embedded):
    folder, _ = embedded
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    result = onnxmark("embed", FIXTURE_MODEL, "--data", "mnist-sample", "-o", folder, check=False)

    assert result.returncode == 2
    assert "--force" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


QUICK_EMBED = ["--data", "mnist-sample", "--keys", 2, "--epochs", 0, "--max-hardening-steps", 2, "--held-out", 100]


def key_vectors(folder: Path) -> list:
    return json.loads((folder / "key.json").read_text())["keys"]


def test_keys_are_random_without_seed(tmp_path):
    for name in ("first", "second"):
        onnxmark("embed", FIXTURE_MODEL, *QUICK_EMBED, "-o", tmp_path / name)

    assert key_vectors(tmp_path / "first") != key_vectors(tmp_path / "second")


def test_seed_repeats_keys(tmp_path):
    for name in ("first", "second"):
        onnxmark("embed", FIXTURE_MODEL, *QUICK_EMBED, "--seed", 5, "-o", tmp_path / name)

    assert key_vectors(tmp_path / "first") == key_vectors(tmp_path / "second")


def test_key_range_bounds_keys_and_random_keys(tmp_path):
    """Embed draws keys in the range, the key file records it, and calibration draws its random keys there."""
    from onnxmark.extract import extract
    from onnxmark.keyfile import load_key

    summary = last_json(onnxmark("embed", FIXTURE_MODEL, *QUICK_EMBED, "--seed", 5, "--key-range", 0.5,
                                 "-o", tmp_path, "--json"))
    key = load_key(summary["key"])
    narrow = extract(summary["model"], key, null_keys=50).calibration.null_ssim
    key.key_range = 10.0
    wide = extract(summary["model"], key, null_keys=50).calibration.null_ssim

    assert key.keys.min() >= -0.5
    assert key.keys.max() <= 0.5
    assert json.loads(Path(summary["key"]).read_text())["key_range"] == 0.5
    assert not np.allclose(narrow, wide)


def test_embed_again_with_force(tmp_path):
    onnxmark("embed", FIXTURE_MODEL, *QUICK_EMBED, "-o", tmp_path)

    result = onnxmark("embed", FIXTURE_MODEL, *QUICK_EMBED, "-o", tmp_path, "--force", check=False)

    assert result.returncode == 0, result.stderr
    assert "hardening steps at learning rate 0.001" in result.stdout


def test_existing_evidence_needs_force(tmp_path):
    (tmp_path / "evidence").mkdir()
    (tmp_path / "evidence" / "sheet.png").write_bytes(b"earlier sheet")

    result = onnxmark("embed", FIXTURE_MODEL, *QUICK_EMBED, "-o", tmp_path, check=False)

    assert result.returncode == 2
    assert "sheet.png already exists" in result.stderr
    assert (tmp_path / "evidence" / "sheet.png").read_bytes() == b"earlier sheet"
    assert not (tmp_path / "key.json").exists()


def test_extract_imports_no_torch(embedded, tmp_path):
    _, summary = embedded
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "onnxmark", "extract", summary["model"],
                             "--key", summary["key"], "-o", tmp_path / "out"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "onnxruntime" in [name.split(".")[0] for name in imported]
    assert not [name for name in imported if name.split(".")[0] in ("torch", "onnx2torch")]


def test_key_that_does_not_fit_suspect_is_rejected(embedded, tmp_path):
    _, summary = embedded
    other = tmp_path / "other.onnx"
    model = onnx.load(FIXTURE_MODEL)
    # Another architecture: a narrower first layer (the fixture script builds 32 conv1 filters).
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "fixtures" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    del model
    import torch
    narrow = module.build_default_cnn(seed=1)
    narrow.fc2 = torch.nn.Linear(512, 128)
    narrow.fc3 = torch.nn.Linear(128, 10)
    module.export_onnx(narrow, other)

    result = onnxmark("extract", other, "--key", summary["key"], "-o", tmp_path / "evidence", check=False)

    assert result.returncode == 2
    assert "does not fit" in result.stderr
    assert not (tmp_path / "evidence").exists()


@pytest.mark.parametrize("command", ["embed", "inspect", "extract"])
def test_missing_model_file(tmp_path, command, embedded):
    _, summary = embedded
    extra = {"embed": ["--data", "mnist-sample", "-o", tmp_path / "out"], "inspect": [],
             "extract": ["--key", summary["key"], "-o", tmp_path / "out"]}[command]
    result = onnxmark(command, tmp_path / "absent.onnx", *extra, check=False)

    assert result.returncode == 2
    assert "not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_non_onnx_file(tmp_path):
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("this is not a model\n")

    result = onnxmark("embed", bogus, "--data", "mnist-sample", "-o", tmp_path / "out", check=False)

    assert result.returncode == 2
    assert "not a valid ONNX model" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["embed", "inspect"])
def test_unsupported_operator_names_all_nodes(tmp_path, command):
    path = unsupported_model(tmp_path)
    extra = ["--data", "mnist-sample", "-o", tmp_path / "out"] if command == "embed" else []

    result = onnxmark(command, path, *extra, check=False)

    assert result.returncode == 2
    output = result.stderr + result.stdout
    assert "node 'mix' (op Einsum, opset 17)" in output
    assert "node 'winner' (op Hardmax, opset 17)" in output
    assert not (tmp_path / "out").exists()


def test_data_that_does_not_fit_the_model(tmp_path):
    data = tmp_path / "wide.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.uniform(0, 1, (1200, 28, 28)).astype(np.float32), y=rng.integers(0, 20, 1200))

    result = onnxmark("embed", FIXTURE_MODEL, "--data", data, "-o", tmp_path / "out", check=False)

    assert result.returncode == 2
    assert "10 classes" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_data_source(tmp_path):
    result = onnxmark("embed", FIXTURE_MODEL, "--data", "imagenet", "-o", tmp_path / "out", check=False)

    assert result.returncode == 2
    assert "imagenet" in result.stderr
    assert not (tmp_path / "out").exists()


def test_invalid_key_file(tmp_path):
    key = tmp_path / "key.json"
    key.write_text("{\"format\": \"something else\"}")

    result = onnxmark("extract", FIXTURE_MODEL, "--key", key, "-o", tmp_path / "out", check=False)

    assert result.returncode == 2
    assert "not an onnxmark key file" in result.stderr


def test_inspect_json_lists_plan():
    result = onnxmark("inspect", FIXTURE_MODEL, "--json")
    report = last_json(result)

    assert [step["op"] for step in report["plan"]][:2] == ["Gemm", "Relu"]
    assert report["plan"][-1]["input_shape"] == [1, 28, 28]
    assert report["unsupported"] == []


def test_extract_rerun_into_same_folder(embedded, tmp_path):
    """Rerunning the same extraction changes nothing; another suspect into that folder needs --force."""
    _, summary = embedded
    folder = tmp_path / "evidence"
    onnxmark("extract", summary["model"], "--key", summary["key"], "-o", folder)
    before = {p: p.read_bytes() for p in folder.iterdir()}

    onnxmark("extract", summary["model"], "--key", summary["key"], "-o", folder)
    other = onnxmark("extract", FIXTURE_MODEL, "--key", summary["key"], "-o", folder, check=False)

    assert other.returncode == 2
    assert "--force" in other.stderr
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


def test_binary_key_file_is_rejected(embedded, tmp_path):
    _, summary = embedded
    result = onnxmark("extract", summary["model"], "--key", summary["model"], "-o", tmp_path / "out", check=False)

    assert result.returncode == 2
    assert "not a valid key file: it is not UTF-8 text" in result.stderr
    assert "Traceback" not in result.stderr
