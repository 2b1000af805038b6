"""Measure false positives and the calibration of the combined p-value, and write them into BENCHMARKS.md.

Run from the repository root:  python benchmarks/bench_false_positives.py [--epochs 1] [--images 1500]

Three tables:
1. The fixture model, watermarked with default settings: its key extracted from the watermarked model, from
   the untrained original and from five copies of the architecture trained without a watermark (seeds 1-5).
2. Every real model in ../shared/models, watermarked with its recorded preprocessing (teacher mode where
   recorded) on a subset of mnist-sample: the key extracted from the watermarked model and from the original.
3. How often Fisher's combined p-value falls below a level on unwatermarked models, computed exactly for
   independent keys and for the worst case of the shared random keys (all secrets rank the images alike).

The script replaces its own section of BENCHMARKS.md and leaves the rest of the file as it is.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxmark.calibration import DEFAULT_NULL_KEYS  # noqa: E402
from onnxmark.data import load_dataset  # noqa: E402
from onnxmark.embed import EmbedOptions, train_without_watermark  # noqa: E402

FIXTURE = ROOT / "fixtures" / "mnist_cnn.onnx"
SHARED_MODELS = ROOT.parent / "shared" / "models"
SECTION_TITLE = "## False positives and calibrated p-values"
COPY_SEEDS = [1, 2, 3, 4, 5]
KEY_COUNT = 11
LEVELS = [1e-2, 1e-3, 1e-4, 1e-6, 1e-8, 1e-10]
# The bounds that the false-positive test applies to every unwatermarked model of the key's structure.
MAX_SSIM_MEAN = 0.15
MIN_P_VALUE = 1e-3
# Width of the bins that the exact tail computation rounds each key's Fisher term up to.
FISHER_BIN = 0.002


def run_json(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "onnxmark", *args, "--json"], capture_output=True, text=True,
                            cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"onnxmark {' '.join(args)} failed: {result.stderr.strip()}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def extract_scores(model: Path, key: str, folder: Path) -> dict:
    started = time.perf_counter()
    scores = run_json("extract", str(model), "--key", key, "-o", str(folder), "--force")
    scores["seconds"] = time.perf_counter() - started
    return scores


def fixture_rows(folder: Path, unmarked: list[tuple[str, dict]]) -> list[str]:
    embedded = run_json("embed", str(FIXTURE), "--data", "mnist-sample", "-o", str(folder / "fixture"), "--force")
    key = embedded["key"]
    suspects = [("watermarked (seed 0)", Path(embedded["model"])), ("untrained original", FIXTURE)]

    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "fixtures" / "make_fixtures.py")
    make_fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fixtures)
    for seed in COPY_SEEDS:
        untrained = make_fixtures.export_onnx(make_fixtures.build_default_cnn(seed), folder / f"copy{seed}.onnx")
        model_bytes, accuracy = train_without_watermark(untrained, EmbedOptions(data="mnist-sample",
                                                                                output_dir=folder, seed=seed))
        trained = folder / f"copy{seed}.trained.onnx"
        trained.write_bytes(model_bytes)
        suspects.append((f"copy trained without watermark, seed {seed} ({100 * accuracy:.1f} % accuracy)", trained))

    rows = []
    for label, path in suspects:
        scores = extract_scores(path, key, folder / "evidence")
        if path != Path(embedded["model"]):
            unmarked.append((f"fixture {label.split(' (')[0]}", scores))
        rows.append(f"| {label} | {scores['ssim_mean']:.3f} | {_p(scores['p_value'])} | "
                    f"{_p(max(k['p_value'] for k in scores['keys']))} | {_p(min(k['p_value'] for k in scores['keys']))} |")
        print(rows[-1], flush=True)
    return rows


def subset_npz(images: int, folder: Path) -> Path:
    """Save the first `images` digits of mnist-sample with their labels, for shorter embeds."""
    dataset = load_dataset("mnist-sample")
    path = folder / f"mnist-sample-{images}.npz"
    np.savez(path, x=dataset.images[:images], y=dataset.labels[:images])
    return path


def real_model_rows(folder: Path, epochs: int, images: int, unmarked: list[tuple[str, dict]]) -> list[str]:
    settings = json.loads((SHARED_MODELS / "preprocessing.json").read_text())
    data = subset_npz(images, folder)
    held_out = str(images // 3)
    rows = []
    for name in sorted(settings):
        setting = settings[name]
        teacher = ["--teacher"] if setting["teacher"] else []
        started = time.perf_counter()
        try:
            embedded = run_json("embed", str(SHARED_MODELS / name), "--data", str(data), "--held-out", held_out,
                                "--epochs", str(epochs), *setting["options"], *teacher,
                                "-o", str(folder / Path(name).stem), "--force")
        except RuntimeError as error:
            rows.append(f"| `{name}` | embed failed: {error} | | | | | |")
            print(rows[-1], flush=True)
            continue
        embed_seconds = time.perf_counter() - started
        marked = extract_scores(Path(embedded["model"]), embedded["key"], folder / "evidence")
        original = extract_scores(SHARED_MODELS / name, embedded["key"], folder / "evidence")
        unmarked.append((f"`{name}`", original))
        mode = "teacher" if embedded["teacher"] else embedded["mode"]
        rows.append(f"| `{name}` | {mode} | {marked['ssim_mean']:.3f} | {_p(marked['p_value'])} | "
                    f"{original['ssim_mean']:.3f} | {_p(original['p_value'])} | "
                    f"{embed_seconds:.0f} | {original['seconds']:.1f} |")
        print(rows[-1], flush=True)
    return rows


def fisher_tail_rows(null_keys: int, key_count: int) -> tuple[list[str], bool]:
    """Return the table rows and whether every probability is below its level."""
    independent = _tail_independent(null_keys, key_count)
    shared = _tail_shared(null_keys, key_count)
    rows, below = [], True
    for level in LEVELS:
        values = (independent(level), shared(level))
        below = below and all(value < level for value in values)
        rows.append(f"| {level:g} | {_p(values[0])} | {_p(values[1])} |")
    return rows, below


def _tail_verdict(below: bool) -> str:
    if below:
        return ("Both columns stay under their level, so at these sizes the combined p-value is conservative "
                "even though the keys share their random keys.")
    return "Some probabilities exceed their level: there the combined p-value understates the false-positive rate."


def _fisher_terms(null_keys: int) -> np.ndarray:
    """Fisher's term -2 ln p of a key with r = 0..N random keys at or above it, in bins rounded up."""
    p_values = (1.0 + np.arange(null_keys + 1)) / (null_keys + 1)
    return np.ceil(-2.0 * np.log(p_values) / FISHER_BIN).astype(np.int64)


def _statistic_at(level: float, key_count: int) -> float:
    """Find by bisection the Fisher statistic whose chi-square (2K degrees of freedom) survival probability is `level`."""
    from onnxmark.calibration import chi2_even_sf

    low, high = 0.0, 1000.0
    for _ in range(200):
        middle = (low + high) / 2
        if chi2_even_sf(middle, 2 * key_count) > level:
            low = middle
        else:
            high = middle
    return high


def _tail_function(distribution: np.ndarray, key_count: int):
    """Turn a distribution over binned statistics into level -> P(combined p-value <= level)."""
    at_least = np.cumsum(distribution[::-1])[::-1]

    def tail(level: float) -> float:
        first_bin = math.ceil(_statistic_at(level, key_count) / FISHER_BIN)
        return float(at_least[first_bin]) if first_bin < len(at_least) else 0.0

    return tail


def _tail_independent(null_keys: int, key_count: int):
    """Return the exact tail when every key has its own random keys, so each r is uniform on 0..N, independently."""
    terms = _fisher_terms(null_keys)
    single = np.zeros(terms.max() + 1)
    np.add.at(single, terms, 1.0 / (null_keys + 1))
    distribution = np.array([1.0])
    for _ in range(key_count):
        distribution = np.convolve(distribution, single)
    return _tail_function(distribution, key_count)


def _tail_shared(null_keys: int, key_count: int):
    """Return the exact tail when all secrets rank the N random keys' and K real keys' images in the same order.

    The real images are then a uniformly random K-subset of the N + K ranked positions. A dynamic program
    over the positions, from the highest score down, counts the subsets by their binned Fisher statistic.
    """
    terms = _fisher_terms(null_keys)
    size = int(terms.max()) * key_count + 1
    # counts[m] = number of ways to have placed m real images so far, per binned statistic.
    counts = np.zeros((key_count + 1, size))
    counts[0, 0] = 1.0
    for position in range(null_keys + key_count):
        for placed in range(min(position, key_count - 1), -1, -1):
            above = position - placed            # random images above a real image placed here
            if above > null_keys:
                continue
            shift = int(terms[above])
            counts[placed + 1, shift:] += counts[placed, :size - shift]
    distribution = counts[key_count] / math.comb(null_keys + key_count, key_count)
    return _tail_function(distribution, key_count)


def bound_summary(unmarked: list[tuple[str, dict]]) -> str:
    """Say which unwatermarked models break the false-positive test's bounds."""
    high_ssim = [f"{label} ({scores['ssim_mean']:.3f})" for label, scores in unmarked
                 if scores["ssim_mean"] > MAX_SSIM_MEAN]
    low_p = [f"{label} ({scores['p_value']:.2g})" for label, scores in unmarked if scores["p_value"] < MIN_P_VALUE]
    return (f"Over all {len(unmarked)} unwatermarked models above, mean SSIM above {MAX_SSIM_MEAN}: "
            f"{', '.join(high_ssim) or 'none'}. Combined p-value below {MIN_P_VALUE:g}: {', '.join(low_p) or 'none'}.")


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def write_section(path: Path, text: str) -> None:
    """Replace this script's section of the Markdown file (or append it), keeping every other section."""
    document = path.read_text() if path.exists() else "# Benchmarks\n"
    start = document.find(SECTION_TITLE)
    if start < 0:
        document = document.rstrip("\n") + "\n\n" + text
    else:
        end = document.find("\n## ", start + len(SECTION_TITLE))
        document = document[:start] + text + (document[end + 1:] if end >= 0 else "")
    path.write_text(document)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="Epochs of each real model's embed (default 1).")
    parser.add_argument("--images", type=int, default=1500,
                        help="mnist-sample digits for each real model's embed, a third held out (default 1500).")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update.")
    args = parser.parse_args()

    command = f"python benchmarks/bench_false_positives.py --epochs {args.epochs} --images {args.images}"
    unmarked: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fixture = fixture_rows(Path(tmp), unmarked)
        real = real_model_rows(Path(tmp), args.epochs, args.images, unmarked) if SHARED_MODELS.is_dir() else []
    tails, tails_below = fisher_tail_rows(DEFAULT_NULL_KEYS, KEY_COUNT)

    real_table = "\n".join(real) if real else "| (../shared/models not found) | | | | | | | |"
    text = f"""{SECTION_TITLE}

Machine: {machine()}, `OMP_NUM_THREADS=1`.
Command: `{command}` (written {datetime.date.today().isoformat()}).
Every extraction uses the default {DEFAULT_NULL_KEYS} random keys with seed 0. The p-value columns are
Fisher's combined p-value over the {KEY_COUNT} keys and the largest and smallest per-key p-value; with
{DEFAULT_NULL_KEYS} random keys no per-key p-value is below 1/{DEFAULT_NULL_KEYS + 1} = {1 / (DEFAULT_NULL_KEYS + 1):.4f}.

### The fixture model's key on copies of its architecture

`onnxmark embed fixtures/mnist_cnn.onnx --data mnist-sample` (seed 0). The copies are
`fixtures/make_fixtures.py` models with their own initial weights, trained like embed trains (5 epochs)
with no watermark steps.

| suspect | mean SSIM | combined p | largest key p | smallest key p |
|---|---|---|---|---|
{chr(10).join(fixture)}

### Real models: the key on the watermarked model and on the original

Each model in `../shared/models` embedded with its recorded preprocessing and mode, on the first
{args.images} mnist-sample digits ({args.images // 3} held out) for {args.epochs} epoch(s), so the watermarks
are weaker than with the default settings. Only the original shares the watermarked model's
structure, so it is the one unwatermarked model the key can score.

| model | mode | watermarked mean SSIM | watermarked combined p | original mean SSIM | original combined p | embed seconds | extract seconds |
|---|---|---|---|---|---|---|---|
{real_table}

{bound_summary(unmarked)}

### How often the combined p-value reaches a level without a watermark

Exact probabilities, for {KEY_COUNT} keys and {DEFAULT_NULL_KEYS} random keys, that Fisher's combined p-value
is at or below each level on a model without the watermark. In the first column every key has its own
random keys, so the per-key p-values are independent. In the second, all keys share one set of random
keys, and every secret ranks the images in the same order. Then the keys' p-values depend on each other
most, and the real images are a uniformly random subset of the ranked positions. Each key's Fisher term is
rounded up to a multiple of {FISHER_BIN}, which can only raise these probabilities.

| level | independent keys | shared random keys, worst case |
|---|---|---|
{chr(10).join(tails)}

{_tail_verdict(tails_below)}
"""
    write_section(args.output, text)
    print(text)


if __name__ == "__main__":
    main()
