"""`onnxmark robustness` on the watermarked fixture model: the table, the pruning plot and the evidence per row."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from onnxmark.attacks import ATTACKS
from onnxmark.robustness import CSV_COLUMNS, PRUNE_LEVELS
from tests.test_attacks import PRUNE_60_SSIM, run_cli, watermarked_fixture
from tests.test_cli import last_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def watermarked(tmp_path_factory):
    return watermarked_fixture(tmp_path_factory)


def robustness(model, key, folder, *options, check=True):
    result = run_cli("robustness", model, "--key", key, "--data", "mnist-sample", "-o", folder, "--json", *options,
                     check=check)
    return last_json(result) if check else result


def test_pruning_grid_table_and_plot(watermarked, tmp_path):
    model, key = watermarked
    folder = tmp_path / "report"

    summary = robustness(model, key, folder, "--attacks", "prune")

    rows = summary["rows"]
    assert [row["attack"] for row in rows] == ["none"] + ["prune"] * 10
    assert [row["details"]["level"] for row in rows[1:]] == list(PRUNE_LEVELS)
    assert PRUNE_LEVELS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert all(row["error"] is None for row in rows)
    assert rows[1]["ssim_mean"] == pytest.approx(rows[0]["ssim_mean"], abs=1e-6)
    assert rows[7]["ssim_mean"] >= PRUNE_60_SSIM
    assert rows[-1]["ssim_mean"] < rows[1]["ssim_mean"]
    assert summary["held_out_images"] == 1000

    written = json.loads((folder / "robustness.json").read_text())
    assert written["rows"] == rows
    with open(folder / "robustness.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert tuple(table[0]) == CSV_COLUMNS
    assert [line["strength"] for line in table[1:]] == [row["strength"] for row in rows[1:]]
    assert float(table[7]["ssim_mean"]) == pytest.approx(rows[7]["ssim_mean"])
    assert (folder / "pruning.png").read_bytes().startswith(PNG_SIGNATURE)
    for row in rows:
        sheet = Path(row["evidence"])
        assert sheet.read_bytes().startswith(PNG_SIGNATURE)
        assert len(list(sheet.parent.glob("key*.png"))) == 11


def test_failed_extraction_is_a_row(watermarked, tmp_path):
    """A quantized model either extracts or records why not; the grid goes on either way."""
    model, key = watermarked

    summary = robustness(model, key, tmp_path / "report", "--attacks", "quantize,rename")

    rows = summary["rows"]
    assert [row["attack"] for row in rows] == ["none", "quantize", "quantize", "rename"]
    for row in rows:
        assert row["accuracy"] >= 0.9
        if row["ssim_mean"] is None:
            assert row["error"].startswith("extract failed: ")
            assert row["evidence"] is None
        else:
            assert row["error"] is None
    assert rows[-1]["ssim_mean"] == pytest.approx(rows[0]["ssim_mean"], abs=1e-6)
    assert "pruning.png" not in {path.name for path in (tmp_path / "report").iterdir()}
    assert "plot" not in summary


def test_keep_models_writes_attacked_files(watermarked, tmp_path):
    model, key = watermarked
    folder = tmp_path / "report"

    summary = robustness(model, key, folder, "--attacks", "rename", "--keep-models")

    renamed = summary["rows"][1]
    assert Path(renamed["model"]) == folder / "models" / "rename.onnx"
    assert Path(renamed["model"]).is_file()
    assert "model" not in summary["rows"][0]


def test_report_not_overwritten_without_force(watermarked, tmp_path):
    model, key = watermarked
    folder = tmp_path / "report"
    robustness(model, key, folder, "--attacks", "rename")
    before = (folder / "robustness.json").read_bytes()

    result = robustness(model, key, folder, "--attacks", "rename", check=False)

    assert result.returncode == 2
    assert "--force" in result.stderr
    assert (folder / "robustness.json").read_bytes() == before
    robustness(model, key, folder, "--attacks", "rename", "--force")


def test_unknown_attack_in_list(watermarked, tmp_path):
    model, key = watermarked

    result = robustness(model, key, tmp_path / "report", "--attacks", "prune,melt", check=False)

    assert result.returncode == 2
    assert "melt" in result.stderr
    assert not (tmp_path / "report").exists()


def test_missing_key_file(watermarked, tmp_path):
    model, _ = watermarked

    result = robustness(model, tmp_path / "absent.json", tmp_path / "report", check=False)

    assert result.returncode == 2
    assert "Key file not found" in result.stderr
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_full_grid_covers_every_attack(watermarked, tmp_path):
    model, key = watermarked

    summary = robustness(model, key, tmp_path / "report")

    rows = summary["rows"]
    assert {row["attack"] for row in rows} == set(ATTACKS) | {"none"}
    for row in rows:
        assert (row["ssim_mean"] is None) == (row["error"] is not None), row
        assert row["accuracy"] is not None, row
