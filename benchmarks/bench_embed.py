"""Measure hardening and extraction speed on the fixture model and write BENCHMARKS.md.

Run from the repository root:  python benchmarks/bench_embed.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxmark.data import InputSpec, Preprocessing  # noqa: E402
from onnxmark.embed import EmbedOptions, embed  # noqa: E402
from onnxmark.executors import ParameterStore  # noqa: E402,F401
from onnxmark.extract import extract  # noqa: E402
from onnxmark.graph import import_graph  # noqa: E402
from onnxmark.keyfile import load_key  # noqa: E402
from onnxmark.plan import build_plan  # noqa: E402
from onnxmark.secrets import default_texts, render_text  # noqa: E402
from onnxmark.training import TrainingConfig, Watermarker  # noqa: E402

FIXTURE = ROOT / "fixtures" / "mnist_cnn.onnx"
KEY_COUNT = 11
SSIM_TARGET = 0.95


def measure_hardening(seed: int) -> tuple[int, float, float]:
    """Hardening steps, seconds and final mean SSIM to reach SSIM_TARGET on the untrained fixture."""
    torch.manual_seed(seed)
    graph = import_graph(FIXTURE)
    plan = build_plan(graph)
    spec = InputSpec.from_dims(graph.input_dims)
    secrets = np.stack([render_text(t, 1, 28, 28) for t in default_texts(KEY_COUNT, seed)])
    keys = np.random.default_rng(seed).uniform(-10, 10, (KEY_COUNT, 10)).astype(np.float32)
    watermarker = Watermarker(graph, plan, spec, Preprocessing(), keys, secrets,
                              TrainingConfig(ssim_target=SSIM_TARGET, max_hardening_steps=5000))
    start = time.perf_counter()
    steps = watermarker.harden()
    seconds = time.perf_counter() - start
    return steps, seconds, float(watermarker.measure_ssim().mean())


def measure_extraction(folder: Path, repeats: int) -> tuple[list[float], list[float], dict]:
    """Cold (new process, CLI) and warm (in-process) extraction times from a freshly embedded fixture."""
    summary = embed(FIXTURE, EmbedOptions(data="mnist-sample", output_dir=folder / "embed", force=True))
    cold = []
    for index in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "onnxmark", "extract", summary["model"], "--key", summary["key"],
                        "-o", str(folder / f"cold{index}")], check=True, capture_output=True, cwd=ROOT)
        cold.append(time.perf_counter() - start)
    key = load_key(summary["key"])
    extract(summary["model"], key)
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        extract(summary["model"], key)
        warm.append(time.perf_counter() - start)
    return cold, warm, summary


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, " \
           f"torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="Repeats of each measurement (default 3).")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to write.")
    args = parser.parse_args()

    hardening = [measure_hardening(seed) for seed in range(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        cold, warm, summary = measure_extraction(Path(tmp), args.repeats)

    rows = [f"| {seed} | {steps} | {seconds:.2f} | {ssim:.3f} |" for seed, (steps, seconds, ssim) in enumerate(hardening)]
    text = f"""# Benchmarks

Machine: {machine()}.
Command: `python benchmarks/bench_embed.py --repeats {args.repeats}` (written {datetime.date.today().isoformat()}).

## Hardening to mean SSIM {SSIM_TARGET} on the untrained fixture model ({KEY_COUNT} keys)

`fixtures/mnist_cnn.onnx` (two 5x5 convs with 32 and 64 channels, linear 512, 256, 10), default secrets,
Adam at 1e-3, SSIM measured every 10 steps without dropout.

| seed | hardening steps | seconds | mean SSIM |
|---|---|---|---|
{chr(10).join(rows)}

## Full embed of the fixture model (`onnxmark embed fixtures/mnist_cnn.onnx --data mnist-sample`)

| mean SSIM | min SSIM | held-out accuracy before | after | hardening steps | main steps | watermark steps | seconds |
|---|---|---|---|---|---|---|---|
| {summary['ssim_mean']:.3f} | {summary['ssim_min']:.3f} | {100 * summary['accuracy_before']:.1f} % | {100 * summary['accuracy_after']:.1f} % | {summary['hardening_steps']} | {summary['main_steps']} | {summary['watermark_steps']} | {summary['seconds']:.1f} |

## Extraction of 11 keys from the watermarked fixture model

| run | median seconds | all runs |
|---|---|---|
| cold: `python -m onnxmark extract` in a new process | {statistics.median(cold):.2f} | {', '.join(f'{t:.2f}' for t in cold)} |
| warm: `onnxmark.extract.extract()` called again in the same process | {statistics.median(warm):.3f} | {', '.join(f'{t:.3f}' for t in warm)} |
"""
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
