"""The robustness report: a grid of attacks at several strengths, each row scored by accuracy and extracted SSIM.

Every row attacks the watermarked model in memory, measures held-out accuracy with onnxruntime, extracts
the key's images with `onnxmark.extract.extract` and writes them as that row's evidence. A row whose attack
or extraction fails records the error and the grid goes on. The report is written as robustness.json,
robustness.csv and pruning.png, a plot of accuracy against mean SSIM for pruning levels 0 to 90 %.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import onnx

from onnxmark.attacks import ATTACKS, AttackOptions, attacked_model
from onnxmark.attacks.base import AttackContext, measured_accuracy, output_width
from onnxmark.data import Preprocessing
from onnxmark.errors import OnnxmarkError
from onnxmark.extract import extract, write_evidence
from onnxmark.files import OutputTransaction
from onnxmark.graph import load_onnx, main_opset
from onnxmark.keyfile import load_key

log = logging.getLogger(__name__)

PRUNE_LEVELS = tuple(round(0.1 * step, 1) for step in range(10))     # 0 % to 90 % in steps of 10
# The opset row converts two opsets up, but not past this one, so that older onnxruntime releases run the result.
NEWEST_GRID_OPSET = 19
CSV_COLUMNS = ("attack", "strength", "accuracy", "ssim_mean", "ssim_min", "seconds", "evidence", "error")
BASELINE = "none"


@dataclass
class GridRow:
    """One attack at one strength: the attack kind, a short label of its strength, and its options."""

    attack: str
    strength: str
    options: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """A file-name-safe name of the row, such as prune-level-0.3."""
        text = f"{self.attack}-{self.strength}" if self.strength else self.attack
        return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def default_grid(model: onnx.ModelProto, key_path: Path, class_count: int) -> list[GridRow]:
    """Return the attacks and strengths that `onnxmark robustness` runs when no subset is requested."""
    rows = [GridRow(BASELINE, "")]
    rows += [GridRow("prune", f"level {level:.1f}", {"level": level}) for level in PRUNE_LEVELS]
    rows += [
        GridRow("finetune", "2 epochs, lr 0.001", {"epochs": 2, "lr": 1e-3}),
        GridRow("finetune", "2 epochs, lr 0.0001", {"epochs": 2, "lr": 1e-4}),
        GridRow("fineprune", "level 0.6, 1 epoch, lr 0.001", {"level": 0.6, "epochs": 1, "lr": 1e-3}),
        GridRow("overwrite", "50 steps", {"steps": 50, "measure_every": 50}),
        GridRow("overwrite", "200 steps", {"steps": 200, "measure_every": 200}),
        GridRow("erase", "black, 10 steps", {"key": key_path, "steps": 10, "measure_every": 10}),
        GridRow("erase", "black, 100 steps", {"key": key_path, "steps": 100, "measure_every": 100}),
        GridRow("replace-head", f"{class_count} classes, 2 epochs", {"classes": class_count, "epochs": 2}),
        GridRow("quantize", "dynamic", {"mode": "dynamic"}),
        GridRow("quantize", "static", {"mode": "static"}),
        GridRow("fp16", ""),
        GridRow("fold-bn", ""),
        GridRow("optimize", "basic", {"optimization": "basic"}),
        GridRow("optimize", "extended", {"optimization": "extended"}),
        GridRow("rename", ""),
    ]
    opset = main_opset(model)
    target = opset + 2 if opset + 2 <= NEWEST_GRID_OPSET else opset - 2
    rows.append(GridRow("opset", f"{opset} to {target}", {"target": target}))
    return rows


def select_rows(rows: list[GridRow], attacks: list[str] | None) -> list[GridRow]:
    """Keep the baseline and the rows of the requested attack kinds, and raise for an unknown kind."""
    if not attacks:
        return rows
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise OnnxmarkError(f"Unknown attack(s) {', '.join(unknown)}. Known attacks: {', '.join(sorted(ATTACKS))}")
    return [row for row in rows if row.attack == BASELINE or row.attack in attacks]


@dataclass
class RobustnessOptions:
    """Settings of `onnxmark robustness`."""

    data: str
    output_dir: Path
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    attacks: list[str] = field(default_factory=list)    # empty: every attack kind of the default grid
    held_out: int = 1000
    seed: int = 0
    keep_models: bool = False
    force: bool = False


RowCallback = Callable[[int, int, dict], None]


def robustness(model_path: str | Path, key_path: str | Path, options: RobustnessOptions,
               progress=None, on_row: RowCallback | None = None) -> dict:
    """Run the grid on a watermarked model, write the report, and return the summary `--json` prints."""
    started = time.time()
    model_path, key_path = Path(model_path), Path(key_path)
    key = load_key(key_path)
    original = load_onnx(model_path)
    folder = options.output_dir
    paths = {"json": folder / "robustness.json", "csv": folder / "robustness.csv", "plot": folder / "pruning.png"}

    with OutputTransaction(force=options.force) as transaction:
        for path in paths.values():
            transaction.check(path)
        base = AttackOptions(data=options.data, preprocessing=options.preprocessing, held_out=options.held_out,
                             seed=options.seed)
        baseline = AttackContext(model_path, original, base)
        held = baseline.held_out()
        rows = select_rows(default_grid(original, key_path, baseline.class_count), options.attacks)

        results = []
        for index, row in enumerate(rows):
            result = _run_row(row, model_path, original, key, base, baseline, held, folder, transaction, progress,
                              options.keep_models)
            results.append(result)
            if on_row is not None:
                on_row(index + 1, len(rows), result)

        report = {"model": str(model_path), "key": str(key_path), "data": options.data,
                  "held_out_images": len(held.inputs), "rows": results}
        transaction.write_text(paths["json"], json.dumps(report, indent=1) + "\n")
        transaction.write_text(paths["csv"], _csv_text(results))
        pruning = [result for result in results if result["attack"] == "prune" and result["ssim_mean"] is not None]
        if pruning:
            transaction.write_bytes(paths["plot"], pruning_plot_png(pruning, model_path.name))
        else:
            paths.pop("plot")

    return {**report, **{name: str(path) for name, path in paths.items()},
            "seconds": round(time.time() - started, 2)}


def _run_row(row: GridRow, model_path: Path, original: onnx.ModelProto, key, base: AttackOptions,
             baseline: AttackContext, held, folder: Path, transaction: OutputTransaction, progress,
             keep_models: bool) -> dict:
    started = time.time()
    result = {"attack": row.attack, "strength": row.strength, "accuracy": None, "ssim_mean": None,
              "ssim_min": None, "evidence": None, "error": None}
    stage = "attack"
    try:
        if row.attack == BASELINE:
            model = original
        else:
            attacked, _ = attacked_model(row.attack, model_path, replace(base, **row.options), progress, original,
                                         data_cache=baseline.data_cache)
            model = attacked.model
            result["details"] = {name: value for name, value in attacked.details.items() if name != "history"}
        result["accuracy"] = measured_accuracy(model, held, output_width(model))
        if keep_models and row.attack != BASELINE:
            model_path_out = folder / "models" / f"{row.slug}.onnx"
            transaction.write_bytes(model_path_out, model.SerializeToString())
            result["model"] = str(model_path_out)

        stage = "extract"
        extraction = extract(f"{row.slug}.onnx", key, model)
        evidence = write_evidence(extraction, folder / "rows" / row.slug, transaction)
        result.update(ssim_mean=evidence["ssim_mean"], ssim_min=evidence["ssim_min"], evidence=evidence["sheet"])
    except OnnxmarkError as error:
        result["error"] = f"{stage} failed: {error}"
        log.info("Row %s %s: %s", row.attack, row.strength, result["error"])
    result["seconds"] = round(time.time() - started, 2)
    return result


def _csv_text(results: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for result in results:
        writer.writerow({name: "" if result.get(name) is None else result[name] for name in CSV_COLUMNS})
    return buffer.getvalue()


def pruning_plot_png(rows: list[dict], title: str) -> bytes:
    """Plot held-out accuracy against mean SSIM for the pruning rows, and both against the pruning level."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    levels = [100 * row["details"]["level"] for row in rows]
    ssim = [row["ssim_mean"] for row in rows]
    accuracy = [float("nan") if row["accuracy"] is None else 100 * row["accuracy"] for row in rows]
    figure, (trade_off, by_level) = pyplot.subplots(1, 2, figsize=(11, 4.5), dpi=100)

    trade_off.plot(ssim, accuracy, marker="o")
    for index, (level, x, y) in enumerate(zip(levels, ssim, accuracy)):
        # Neighbouring levels often lie close together, so their labels alternate above and below the point.
        offset = (4, 5) if index % 2 == 0 else (4, -11)
        trade_off.annotate(f"{level:.0f}%", (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    trade_off.set_xlabel("mean SSIM of the extracted secrets")
    trade_off.set_ylabel("held-out accuracy (%)")
    trade_off.set_xlim(min(0.0, min(ssim)), 1.0)
    trade_off.set_title("accuracy against mean SSIM")
    trade_off.grid(True, alpha=0.3)

    by_level.plot(levels, ssim, marker="o", color="tab:orange", label="mean SSIM")
    by_level.set_xlabel("pruned weights (%)")
    by_level.set_ylabel("mean SSIM")
    by_level.set_ylim(min(0.0, min(ssim)), 1.0)
    accuracy_axis = by_level.twinx()
    accuracy_axis.plot(levels, accuracy, marker="s", color="tab:blue", label="accuracy")
    accuracy_axis.set_ylabel("held-out accuracy (%)")
    by_level.set_title("by pruning level")
    by_level.grid(True, alpha=0.3)
    by_level.legend(handles=[*by_level.get_lines(), *accuracy_axis.get_lines()], loc="lower left")

    figure.suptitle(f"{title}: global magnitude pruning")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()
