"""`onnxmark audit` over folders of suspects: watermarked copies, clean models, other structures, broken files."""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from tests.conftest import ALL_REAL_MODELS, FIXTURE_MODEL, ROOT, SHARED_MODELS, real_model
from tests.test_cli import onnxmark


def rows_by_name(summary):
    return {Path(row["file"]).name: row for row in summary["files"]}


def pruned_copy(source: Path, target: Path, fraction: float = 0.5) -> None:
    """Zero the given fraction of all conv and linear weights (rank 2 and up) with the smallest magnitude."""
    model = onnx.load(source)
    weights = [init for init in model.graph.initializer if len(init.dims) >= 2 and init.data_type == TensorProto.FLOAT]
    magnitudes = np.concatenate([np.abs(numpy_helper.to_array(init)).ravel() for init in weights])
    threshold = np.quantile(magnitudes, fraction)
    for init in weights:
        values = numpy_helper.to_array(init).copy()
        values[np.abs(values) <= threshold] = 0
        init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, target)


def fp16_copy(source: Path, target: Path) -> None:
    """Convert every float initializer, the input and the output to fp16, so the whole model computes in fp16."""
    model = onnx.load(source)
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, target)


def other_structure_model(target: Path) -> None:
    """The fixture architecture with a narrower second linear layer: the fixture's key does not fit it."""
    import torch

    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "fixtures" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    narrow = module.build_default_cnn(seed=1)
    narrow.fc2 = torch.nn.Linear(512, 128)
    narrow.fc3 = torch.nn.Linear(128, 10)
    module.export_onnx(narrow, target)


@pytest.fixture(scope="module")
def suspects(tmp_path_factory, watermarked_fixture):
    """A folder of suspects for the fixture's key, with a subfolder, broken files and a file that is not ONNX."""
    folder = tmp_path_factory.mktemp("suspects")
    watermarked = Path(watermarked_fixture["model"])
    shutil.copy(watermarked, folder / "copy.onnx")
    (folder / "deeper").mkdir()
    pruned_copy(watermarked, folder / "deeper" / "pruned.onnx")
    fp16_copy(watermarked, folder / "half.ONNX")
    shutil.copy(FIXTURE_MODEL, folder / "original.onnx")
    other_structure_model(folder / "narrow.onnx")
    (folder / "corrupt.onnx").write_bytes(np.random.default_rng(0).bytes(4000))
    (folder / "truncated.onnx").write_bytes(watermarked.read_bytes()[:20000])
    (folder / "notes.onnx").write_text("this is not a model\n")
    (folder / "README.txt").write_text("not a suspect, and not named .onnx\n")
    return folder


@pytest.fixture(scope="module")
def audited(suspects, watermarked_fixture, tmp_path_factory):
    output = tmp_path_factory.mktemp("audit") / "out"
    result = onnxmark("audit", suspects, "--key", watermarked_fixture["key"], "-o", output, "--workers", "2", "--json")
    return output, json.loads(result.stdout), result


def test_audit_lists_every_onnx_file(audited, suspects):
    _, summary, _ = audited

    names = [Path(row["file"]).name for row in summary["files"]]

    assert sorted(names) == sorted(["copy.onnx", "pruned.onnx", "half.ONNX", "original.onnx", "narrow.onnx",
                                    "corrupt.onnx", "truncated.onnx", "notes.onnx"])
    for row in summary["files"]:
        assert set(row) >= {"file", "sha256", "ssim_mean", "p_value", "error"}
        assert row["sha256"] == hashlib.sha256(Path(row["file"]).read_bytes()).hexdigest()


def test_audit_flags_watermarked_copies(audited):
    _, summary, _ = audited
    rows = rows_by_name(summary)

    for name in ("copy.onnx", "pruned.onnx", "half.ONNX"):
        assert rows[name]["error"] is None
        assert rows[name]["p_value"] < 1e-6
        assert rows[name]["ssim_mean"] > 0.5
        assert rows[name]["verdict"] == "see images"
    assert rows["original.onnx"]["p_value"] > 1e-3
    assert rows["original.onnx"]["ssim_mean"] < 0.15
    assert rows["original.onnx"]["verdict"] == ""


def test_audit_reports_broken_files_without_stopping(audited):
    _, summary, result = audited
    rows = rows_by_name(summary)

    for name in ("corrupt.onnx", "truncated.onnx", "notes.onnx"):
        assert "not a valid ONNX model" in rows[name]["error"]
        assert rows[name]["p_value"] is None
        assert rows[name]["verdict"] == ""
    assert "does not fit" in rows["narrow.onnx"]["error"]
    assert rows["narrow.onnx"]["ssim_mean"] is None
    assert result.stderr == ""


def test_audit_writes_csv_json_and_reports(audited):
    output, summary, _ = audited

    with open(output / "summary.csv", newline="") as file:
        table = list(csv.DictReader(file))
    written = json.loads((output / "summary.json").read_text())

    assert written["files"] == summary["files"]
    assert [row["file"] for row in table] == [row["file"] for row in summary["files"]]
    assert list(table[0]) == ["file", "sha256", "ssim_mean", "ssim_min", "p_value", "verdict", "report", "error"]
    for line, row in zip(table, summary["files"]):
        assert line["verdict"] == row["verdict"]
        if row["error"]:
            assert line["p_value"] == ""
            assert line["report"] == ""
            continue
        assert float(line["p_value"]) == pytest.approx(row["p_value"])
        report = Path(row["report"])
        assert report.parent.parts[-2:] in [(output.name, "reports"), ("reports", "deeper")]
        assert (report / "sheet.png").is_file()
        assert (report / "key10.png").is_file()
        scores = json.loads((report / "scores.json").read_text())
        assert scores["p_value"] == pytest.approx(row["p_value"])


def test_audit_text_output(suspects, watermarked_fixture, tmp_path):
    result = onnxmark("audit", suspects, "--key", watermarked_fixture["key"], "-o", tmp_path / "out",
                      "--null-keys", "50")
    lines = result.stdout.splitlines()

    assert any(line.startswith(str(suspects / "copy.onnx")) and "see images" in line for line in lines)
    assert any("notes.onnx: not checked:" in line for line in lines)
    assert "8 files, 3 with combined p-value under 0.001" in result.stdout
    assert "4 not checked" in result.stdout
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["null_keys"] == 50


def test_audit_does_not_overwrite_without_force(audited, suspects, watermarked_fixture):
    output, _, _ = audited
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}

    rerun = onnxmark("audit", suspects, "--key", watermarked_fixture["key"], "-o", output, check=False)

    assert rerun.returncode == 2
    assert "--force" in rerun.stderr
    assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == before


def test_audit_force_replaces_summary(audited, suspects, watermarked_fixture):
    output, summary, _ = audited

    result = onnxmark("audit", suspects, "--key", watermarked_fixture["key"], "-o", output, "--force",
                      "--workers", "1", "--json")

    assert [row["p_value"] for row in json.loads(result.stdout)["files"]] == [row["p_value"] for row in summary["files"]]


def test_audit_empty_folder(tmp_path, watermarked_fixture):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.txt").write_text("no ONNX here\n")

    result = onnxmark("audit", tmp_path / "empty", "--key", watermarked_fixture["key"], "-o", tmp_path / "out",
                      check=False)

    assert result.returncode == 2
    assert "No .onnx files found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_audit_missing_folder(tmp_path, watermarked_fixture):
    result = onnxmark("audit", tmp_path / "absent", "--key", watermarked_fixture["key"], "-o", tmp_path / "out",
                      check=False)

    assert result.returncode == 2
    assert "Folder not found" in result.stderr


def test_audit_imports_no_torch(suspects, watermarked_fixture, tmp_path):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "onnxmark", "audit", suspects / "deeper",
                             "--key", watermarked_fixture["key"], "-o", tmp_path / "out", "--workers", "1"],
                            capture_output=True, text=True, cwd=ROOT)

    assert result.returncode == 0, result.stderr
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert not [name for name in imported if name.split(".")[0] in ("torch", "onnx2torch")]


def fine_tuned_copy(source: Path, target: Path, preprocessing) -> None:
    """Train the watermarked model one more epoch on its task at learning rate 1e-3, with no watermark steps."""
    from onnxmark.embed import EmbedOptions, train_without_watermark

    options = EmbedOptions(data="mnist-sample", output_dir=target.parent, epochs=1, preprocessing=preprocessing,
                           seed=1)
    model_bytes, _ = train_without_watermark(source, options)
    target.write_bytes(model_bytes)


# A trained MNIST model whose default embed reaches mean SSIM 0.99 (see BENCHMARKS.md).
WATERMARKED_REAL_MODEL = "pytorch2.0.0_burn_mnist_bn.onnx"


@pytest.mark.slow
def test_audit_real_models_flags_exactly_the_copies(tmp_path, embedded_real_model):
    """The twelve real models, three altered copies of one of them watermarked, and a corrupt file."""
    from onnxmark.keyfile import load_key

    for name in ALL_REAL_MODELS:
        real_model(name)
    watermarked_real_model = embedded_real_model(WATERMARKED_REAL_MODEL)
    folder = tmp_path / "suspects"
    folder.mkdir()
    for name in ALL_REAL_MODELS:
        shutil.copy(SHARED_MODELS / name, folder / name)
    watermarked = Path(watermarked_real_model["model"])
    key = load_key(watermarked_real_model["key"])
    pruned_copy(watermarked, folder / "copy_pruned.onnx")
    fine_tuned_copy(watermarked, folder / "copy_finetuned.onnx", key.preprocessing)
    fp16_copy(watermarked, folder / "copy_fp16.onnx")
    (folder / "corrupt.onnx").write_bytes(watermarked.read_bytes()[:3000])

    result = onnxmark("audit", folder, "--key", watermarked_real_model["key"], "-o", tmp_path / "out", "--json")
    rows = rows_by_name(json.loads(result.stdout))

    assert len(rows) == 16
    flagged = {name for name, row in rows.items() if row["verdict"] == "see images"}
    assert flagged == {"copy_pruned.onnx", "copy_finetuned.onnx", "copy_fp16.onnx"}
    for name in flagged:
        assert rows[name]["p_value"] < 1e-6
    original = rows[WATERMARKED_REAL_MODEL]
    assert original["error"] is None
    assert original["p_value"] > 1e-3
    assert "not a valid ONNX model" in rows["corrupt.onnx"]["error"]
    others = [name for name in ALL_REAL_MODELS if name != WATERMARKED_REAL_MODEL]
    for name in others:
        assert "does not fit" in rows[name]["error"], rows[name]["error"]

