"""Measure how the watermark of the fixture model survives each attack, and record it in BENCHMARKS.md.

Run from the repository root:  OMP_NUM_THREADS=1 python benchmarks/bench_attacks.py [--seed 0]

The script embeds `fixtures/mnist_cnn.onnx` with 11 keys on mnist-sample (or takes --model and --key),
attacks the watermarked model as `onnxmark attack` does, and extracts with `onnxmark.extract.extract`.
It replaces the section "Attacks on the watermarked fixture model" of BENCHMARKS.md, or appends it.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxmark.attacks import AttackOptions, run_attack  # noqa: E402
from onnxmark.embed import EmbedOptions, embed, train_without_watermark  # noqa: E402
from onnxmark.errors import OnnxmarkError  # noqa: E402
from onnxmark.extract import extract  # noqa: E402
from onnxmark.keyfile import load_key  # noqa: E402
from onnxmark.robustness import PRUNE_LEVELS  # noqa: E402

FIXTURE = ROOT / "fixtures" / "mnist_cnn.onnx"
SECTION = "## Attacks on the watermarked fixture model"
DATA = "mnist-sample"
# Bars that the attacks are measured against.
FINETUNE_SSIM, FINETUNE_TENTH_LR_SSIM = 0.85, 0.90
PRUNE_60_SSIM = 0.60
VISIBLE_SSIM, ACCURACY_WINDOW = 0.3, 0.05
REPLACED_HEAD_SSIM = 0.5


class Bench:
    """Runs attacks on one watermarked model into a scratch folder and scores them with the owner's key."""

    def __init__(self, model: Path, key_path: Path, folder: Path, seed: int):
        self.model = model
        self.key_path = key_path
        self.key = load_key(key_path)
        self.folder = folder
        self.seed = seed
        self.count = 0

    def attack(self, kind: str, **options) -> dict:
        """Run one attack and return its summary with the owner's mean SSIM, or with the extraction error."""
        self.count += 1
        output = self.folder / f"{self.count:02d}-{kind}.onnx"
        started = time.time()
        summary = run_attack(kind, self.model, output, AttackOptions(data=DATA, seed=self.seed, **options))
        summary["wall_seconds"] = time.time() - started
        try:
            summary["owner_ssim"] = float(extract(output, self.key).ssim.mean())
        except OnnxmarkError as error:
            summary["owner_ssim"] = None
            summary["extract_error"] = short_error(str(error))
        return summary


def short_error(message: str) -> str:
    """Shorten an extraction error to its first line without the scratch path, plus the op types it names."""
    first = message.splitlines()[0].split(": ", 1)[-1].rstrip(":")
    op_types = sorted(set(re.findall(r"\(op (\w+),", message)))
    return f"{first} ({', '.join(op_types)})" if op_types else first


def percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def ssim_text(summary: dict) -> str:
    if summary["owner_ssim"] is None:
        return f"extraction failed: {summary['extract_error']}"
    return f"{summary['owner_ssim']:.3f}"


def verdict(passed: bool) -> str:
    return "meets" if passed else "**misses**"


def visible_while_accurate(summary: dict) -> tuple[bool, float | None, int | None]:
    """Check that mean SSIM stays ≥ VISIBLE_SSIM at every measured step whose accuracy is within the window.

    Also return the lowest SSIM inside the window and the first step whose accuracy left it.
    """
    floor = summary["accuracy_before"] - ACCURACY_WINDOW
    inside = [row for row in summary["history"] if row["accuracy"] >= floor]
    outside = [row["step"] for row in summary["history"] if row["accuracy"] < floor]
    lowest = min(row["ssim_mean"] for row in inside)
    return lowest >= VISIBLE_SSIM, lowest, outside[0] if outside else None


def history_rows(summary: dict, steps: set[int]) -> list[str]:
    return [f"| {row['step']} | {percent(row['accuracy'])} | {row['ssim_mean']:.3f} | {row['attack_ssim']:.3f} |"
            for row in summary["history"] if row["step"] in steps]


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")


def measure(bench: Bench, folder: Path) -> str:
    """Run every measurement and return the Markdown section."""
    fine = {lr: bench.attack("finetune", epochs=2, lr=lr) for lr in (1e-3, 1e-4)}
    other = {lr: bench.attack("finetune", epochs=2, lr=lr, train_data="digits") for lr in (1e-3, 1e-4)}
    pruned = [bench.attack("prune", level=level) for level in PRUNE_LEVELS]
    fineprune = bench.attack("fineprune", level=0.6, epochs=1)
    overwrite = bench.attack("overwrite", steps=300, measure_every=10, watch_key=bench.key_path)
    erase_black = bench.attack("erase", key=bench.key_path, steps=100, measure_every=1)

    reference = folder / "unwatermarked.onnx"
    model_bytes, _ = train_without_watermark(FIXTURE, EmbedOptions(data=DATA, output_dir=folder, seed=bench.seed))
    reference.write_bytes(model_bytes)
    erase_reference = bench.attack("erase", key=bench.key_path, replacement="reference", reference=reference,
                                   steps=100, measure_every=1)

    head = bench.attack("replace-head", classes=10, epochs=2)
    # Extraction checks a new head with the head that the key stores; without it, with the new head.
    headless_key = copy.copy(bench.key)
    headless_key.head = []
    own_head_ssim = float(extract(head["model"], headless_key).ssim.mean())
    head_ssim = head["owner_ssim"]

    rewrites = [("quantize", "dynamic", {"mode": "dynamic"}), ("quantize", "static", {"mode": "static"}),
                ("fp16", "", {}), ("fold-bn", "", {}), ("optimize", "basic", {"optimization": "basic"}),
                ("optimize", "extended", {"optimization": "extended"}), ("rename", "", {}),
                ("opset", "17 to 19", {"target": 19})]
    rewritten = [(kind, strength, bench.attack(kind, **options)) for kind, strength, options in rewrites]

    original = pruned[0]
    lines = [
        f"{SECTION} (`benchmarks/bench_attacks.py`, {datetime.date.today().isoformat()})",
        "",
        f"Machine: {machine()}.",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_attacks.py --seed {bench.seed}`.",
        "",
        "`fixtures/mnist_cnn.onnx` embedded with 11 keys on mnist-sample (`onnxmark embed` defaults), then "
        "attacked with `onnxmark attack` defaults except where a row says otherwise. Accuracy is top-1 on the "
        "1,000 images embed holds out; training attacks train on the other 4,000 (or on all 1,797 of "
        "scikit-learn's `digits`, resized to 28×28, for \"other data\"). SSIM is the mean over the 11 keys of "
        "`onnxmark extract`. Embed's training learning rate is 1e-3 (Adam).",
        "",
        f"Watermarked model: held-out accuracy {percent(original['accuracy_before'])}, mean SSIM "
        f"{original['owner_ssim']:.3f}.",
        "",
        "| attack | accuracy after | mean SSIM | bar |",
        "|---|---|---|---|",
    ]
    for lr, name in ((1e-3, "training learning rate"), (1e-4, "1/10 of it")):
        bar = FINETUNE_SSIM if lr == 1e-3 else FINETUNE_TENTH_LR_SSIM
        lines.append(f"| finetune, 2 epochs at {lr:g} ({name}), same data | {percent(fine[lr]['accuracy_after'])} | "
                     f"{fine[lr]['owner_ssim']:.3f} | ≥ {bar}: {verdict(fine[lr]['owner_ssim'] >= bar)} |")
    for lr in (1e-3, 1e-4):
        lines.append(f"| finetune, 2 epochs at {lr:g}, other data (`digits`) | {percent(other[lr]['accuracy_after'])} | "
                     f"{other[lr]['owner_ssim']:.3f} | |")
    prune_60 = pruned[PRUNE_LEVELS.index(0.6)]
    lines.append(f"| prune 60 % | {percent(prune_60['accuracy_after'])} | {prune_60['owner_ssim']:.3f} | "
                 f"≥ {PRUNE_60_SSIM}: {verdict(prune_60['owner_ssim'] >= PRUNE_60_SSIM)} |")
    lines.append(f"| fineprune 60 %, 1 epoch at 1e-3 | {percent(fineprune['accuracy_after'])} | "
                 f"{fineprune['owner_ssim']:.3f} | |")
    lines.append(f"| replace-head, 10 new classes, 2 epochs at 1e-3; extracted with the new head | "
                 f"{percent(head['accuracy_after'])} | {own_head_ssim:.3f} | |")
    lines.append(f"| same, extracted as `extract` does, with the head stored in the key | "
                 f"{percent(head['accuracy_after'])} | {head_ssim:.3f} | ≥ {REPLACED_HEAD_SSIM}: "
                 f"{verdict(head_ssim >= REPLACED_HEAD_SSIM)} |")
    for kind, strength, summary in rewritten:
        if kind == "fold-bn" and not summary["folded"]:
            strength = "(the fixture has no BatchNormalization, so the file is unchanged)"
        lines.append(f"| {kind} {strength}".rstrip() + f" | {percent(summary['accuracy_after'])} | {ssim_text(summary)} | |")

    lines += ["", "### Global magnitude pruning, 0 to 90 %", "", "| level | accuracy | mean SSIM |", "|---|---|---|"]
    lines += [f"| {100 * level:.0f} % | {percent(row['accuracy_after'])} | {row['owner_ssim']:.3f} |"
              for level, row in zip(PRUNE_LEVELS, pruned)]

    lines += ["", "### Overwrite and erase, per adversarial step", "",
              f"Bar: the mark stays visible (mean SSIM ≥ {VISIBLE_SSIM}) at every measured step whose accuracy is "
              f"within {100 * ACCURACY_WINDOW:.0f} points of the original. Adam at 1e-3 on every weight, "
              "transposed-model loss only, as hardening. \"attack SSIM\" compares the attack's own keys' images "
              "with its targets.", ""]
    for name, summary, steps in (
            ("overwrite (11 attacker keys and secrets, 300 steps, measured every 10)", overwrite,
             {0, 10, 20, 30, 50, 100, 200, 300}),
            ("erase with the known key towards black (100 steps, measured every step)", erase_black,
             {0, 1, 2, 3, 4, 5, 6, 8, 10, 20, 50, 100}),
            ("erase with the known key towards the image of an unwatermarked trained model", erase_reference,
             {0, 1, 2, 3, 4, 5, 6, 8, 10, 20, 50, 100})):
        passed, lowest, left = visible_while_accurate(summary)
        left_text = "never left the window" if left is None else f"first left the window at step {left}"
        lines += [f"**{name}**: {verdict(passed)} the bar; lowest mean SSIM within the window {lowest:.3f}, accuracy "
                  f"{left_text}; after the attack accuracy {percent(summary['accuracy_after'])}, mean SSIM "
                  f"{summary['owner_ssim']:.3f}.", "",
                  "| step | accuracy | owner's mean SSIM | attack SSIM |", "|---|---|---|---|"]
        lines += history_rows(summary, steps)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace this script's section of the Markdown file, or append it, leaving every other section as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start < 0:
        path.write_text(text.rstrip() + "\n\n" + section)
        return
    following = text.find("\n## ", start + len(SECTION))
    rest = "" if following < 0 else text[following + 1:]
    path.write_text(text[:start] + section + ("\n" + rest if rest else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="A watermarked fixture model (default: embed one now).")
    parser.add_argument("--key", type=Path, help="Its key file (with --model).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of embed, the split and the attacks (default 0).")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update.")
    args = parser.parse_args()
    if (args.model is None) != (args.key is None):
        parser.error("--model and --key go together")

    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as scratch:
        folder = Path(scratch)
        model, key = args.model, args.key
        if model is None:
            summary = embed(FIXTURE, EmbedOptions(data=DATA, output_dir=folder / "embed", seed=args.seed))
            model, key = Path(summary["model"]), Path(summary["key"])
        section = measure(Bench(model, key, folder, args.seed), folder)

    write_section(args.output, section)
    print(section)


if __name__ == "__main__":
    main()
