"""The onnxmark command line: parse arguments, show progress, print results. No method logic here.

`extract` and `inspect` must not import torch, so the embed machinery is imported inside `embed` only.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from onnxmark import __version__
from onnxmark.calibration import DEFAULT_NULL_KEYS, DEFAULT_NULL_SEED
from onnxmark.errors import OnnxmarkError

EXIT_USER_ERROR = 2


class OnnxmarkGroup(click.Group):
    """Reports OnnxmarkError as one line on stderr with exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OnnxmarkError as error:
            click.echo(f"Error: {error}", err=True)
            ctx.exit(EXIT_USER_ERROR)


@click.group(cls=OnnxmarkGroup)
@click.version_option(__version__, prog_name="onnxmark")
@click.option("-v", "--verbose", is_flag=True, help="Log details of each step to stderr.")
def main(verbose: bool) -> None:
    """Embed visible watermarks into ONNX image classifiers and extract them from suspect models."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _print_result(result: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(result))
    else:
        for line in lines:
            click.echo(line)


class ProgressLine:
    """One self-updating stderr line per phase with the step count and the live SSIM and accuracy."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.phase = None

    def __call__(self, phase: str, done: int, total: int, stats: dict) -> None:
        if not self.enabled:
            return
        if phase != self.phase and self.phase is not None:
            click.echo("", err=True)
        self.phase = phase
        width = 30
        filled = int(width * done / max(total, 1))
        parts = [f"{name} {value:.3f}" for name, value in stats.items() if value == value]
        click.echo(f"\r{phase:10s} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}  " + "  ".join(parts),
                   err=True, nl=False)

    def close(self) -> None:
        if self.enabled and self.phase is not None:
            click.echo("", err=True)


def _float_pair(ctx, param, value):
    return value if value is None else tuple(float(v) for v in value)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True,
              help="Training data: mnist-sample, digits, an .npz with x and y, or a folder of class subfolders. "
                   "With --teacher also an .npz with x only or a folder of images without subfolders.")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("out"),
              show_default=True, help="Folder for MODEL.wm.onnx, key.json and evidence/.")
@click.option("--secret-text", "secret_texts", multiple=True,
              help="Text of one secret (repeat for more keys). Default: 11 random four-letter texts.")
@click.option("--secret-image", "secret_images", multiple=True, type=click.Path(path_type=Path),
              help="Image file used as one secret (repeat for more keys).")
@click.option("--keys", "key_count", type=click.IntRange(1, 1000), default=11, show_default=True,
              help="Number of keys when the secrets are the default texts.")
@click.option("--input-range", nargs=2, type=float, default=None, callback=_float_pair,
              help="Model input value range LO HI that pixels 0..1 map to (default 0 1).")
@click.option("--mean", type=str, default=None, help="Per-channel mean (comma-separated) of mean/std input normalisation.")
@click.option("--std", type=str, default=None, help="Per-channel std (comma-separated) of mean/std input normalisation.")
@click.option("--ssim-target", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Mean SSIM at which hardening stops and that constraint training keeps up.")
@click.option("--max-hardening-steps", type=click.IntRange(0), default=2000, show_default=True,
              help="Step limit of hardening.")
@click.option("--epochs", type=click.IntRange(0), default=None,
              help="Epochs of constraint training (default 5 from scratch, 6 for a trained model, 12 in teacher "
                   "mode, where an epoch also covers 4 shifted copies of every training image).")
@click.option("--mode", type=click.Choice(["auto", "scratch", "trained"]), default="auto", show_default=True,
              help="scratch: hardening then training; trained: keep accuracy, batch-norm statistics frozen; "
                   "auto: trained when held-out accuracy is at least twice chance level.")
@click.option("--teacher", is_flag=True,
              help="Teacher mode: train the model to agree with its original outputs (knowledge distillation) "
                   "instead of with labels, so any images will do. Chosen automatically when the data has no labels.")
@click.option("--held-out", type=click.IntRange(1), default=1000, show_default=True,
              help="Number of images held out to measure accuracy and agreement with the original.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Training batch size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of keys, secrets, split and training.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def embed(model, data, output_dir, secret_texts, secret_images, key_count, input_range, mean, std, ssim_target,
          max_hardening_steps, epochs, mode, teacher, held_out, batch_size, seed, force, as_json):
    """Watermark MODEL and write the watermarked model, the key and the evidence."""
    from onnxmark.embed import EmbedOptions, embed as embed_model

    if secret_texts and secret_images:
        raise click.UsageError("Use either --secret-text or --secret-image, not both.")
    if teacher and mode == "scratch":
        raise click.UsageError("--teacher keeps the outputs of an already trained model, so it cannot be combined "
                               "with --mode scratch.")
    options = EmbedOptions(
        data=data, output_dir=output_dir, secret_texts=list(secret_texts),
        secret_images=[str(p) for p in secret_images], key_count=key_count,
        preprocessing=_preprocessing(input_range, mean, std), ssim_target=ssim_target,
        max_hardening_steps=max_hardening_steps, epochs=epochs, mode=mode, teacher=teacher, held_out=held_out,
        batch_size=batch_size, seed=seed, force=force)

    progress = ProgressLine(enabled=True)
    try:
        result = embed_model(model, options, progress=progress)
    finally:
        progress.close()
    _print_result(result, as_json, [
        f"watermarked model: {result['model']}",
        f"key:               {result['key']} (keep it secret)",
        f"evidence:          {result['evidence']}",
        f"mean SSIM {result['ssim_mean']:.3f} (min {result['ssim_min']:.3f}), {_fidelity(result)}, "
        f"{result['hardening_steps']} hardening steps, {result['seconds']:.1f} s",
    ])


def _fidelity(result: dict) -> str:
    """Held-out accuracy where labels measured it, and agreement with the original, as one phrase."""
    agreement = f"{100 * result['agreement']:.1f}% agreement with the original"
    if result["accuracy_before"] is None:
        return f"teacher mode, {agreement}" if result["teacher"] else agreement
    accuracy = (f"held-out accuracy {100 * result['accuracy_before']:.1f}% -> "
                f"{100 * result['accuracy_after']:.1f}%")
    return f"teacher mode, {accuracy}, {agreement}" if result["teacher"] else f"{accuracy}, {agreement}"


def _preprocessing(input_range, mean, std):
    from onnxmark.data import Preprocessing

    if (mean is None) != (std is None):
        raise click.UsageError("--mean and --std go together.")
    if mean is not None and input_range is not None:
        raise click.UsageError("Use either --input-range or --mean/--std, not both.")
    if mean is not None:
        return Preprocessing(mean=_floats("--mean", mean), std=_floats("--std", std))
    if input_range is not None:
        return Preprocessing(low=input_range[0], high=input_range[1])
    return Preprocessing()


def _floats(option: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option)


def null_key_options(command):
    """Add --null-keys and --null-seed, the random keys that calibrate the p-values, to a command."""
    command = click.option(
        "--null-seed", type=int, default=DEFAULT_NULL_SEED, show_default=True,
        help="Seed of the random keys; the output records it, so the same seed repeats the same p-values.")(command)
    return click.option(
        "--null-keys", type=click.IntRange(0), default=DEFAULT_NULL_KEYS, show_default=True,
        help="Number of random keys, drawn like real keys from [-10, 10], whose SSIMs with each secret are the "
             "null distribution of the p-values. 0 skips the p-values.")(command)


@main.command()
@click.argument("suspect", type=click.Path(path_type=Path))
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path), help="Key file written by embed.")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("evidence"),
              show_default=True, help="Folder for the extracted images, sheet.png and scores.json.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@null_key_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def extract(suspect, key_path, output_dir, force, null_keys, null_seed, as_json):
    """Extract the watermark images that KEY produces from SUSPECT."""
    from onnxmark.extract import extract as extract_images, write_evidence
    from onnxmark.files import OutputTransaction
    from onnxmark.keyfile import load_key

    key = load_key(key_path)
    with OutputTransaction(force=force) as transaction:
        extraction = extract_images(suspect, key, null_keys=null_keys, null_seed=null_seed)
        summary = write_evidence(extraction, output_dir, transaction)

    lines = [f"{suspect}: mean SSIM {summary['ssim_mean']:.3f} (min {summary['ssim_min']:.3f}) over "
             f"{len(summary['keys'])} keys"]
    if summary["p_value"] is not None:
        lines.append(f"combined p-value {summary['p_value']:.3g} (Fisher's method over the keys' p-values, "
                     f"{summary['null_keys']} random keys, seed {summary['null_seed']})")
    lines += [f"  key {k['index']:2d}: SSIM {k['ssim']:.3f}  MSE {k['mse']:.4f}{_calibration_columns(k)}  "
              f"{k['image']}" for k in summary["keys"]]
    lines.append(f"side-by-side sheet: {summary['sheet']}")
    _print_result(summary, as_json, lines)


def _calibration_columns(entry: dict) -> str:
    if entry.get("p_value") is None:
        return ""
    z_score = "n/a" if entry["z_score"] is None else f"{entry['z_score']:.1f}"
    columns = (f"  p {entry['p_value']:.3g}  z {z_score}  random keys mean {entry['null_ssim_mean']:.3f}"
               f" max {entry['null_ssim_max']:.3f}")
    if entry["wrong_secret_ssim_max"] is not None:
        columns += f"  other secrets max {entry['wrong_secret_ssim_max']:.3f}"
    return columns


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path), help="Key file written by embed.")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("audit"),
              show_default=True, help="Folder for summary.csv, summary.json and reports/, one report folder per file.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Worker processes that check files in parallel. Default: one per available core, at most one "
                   "per file.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=1e-3, show_default=True,
              help="Combined p-value under which a file's verdict column is pre-filled with 'see images'.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@null_key_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def audit(folder, key_path, output_dir, workers, alpha, force, null_keys, null_seed, as_json):
    """Check every .onnx file under FOLDER with KEY and write a CSV and JSON summary and a report per file."""
    from onnxmark.audit import AuditOptions, audit as audit_folder
    from onnxmark.keyfile import load_key

    key = load_key(key_path)
    options = AuditOptions(output_dir=output_dir, workers=workers, null_keys=null_keys, null_seed=null_seed,
                           alpha=alpha, force=force)
    progress = ProgressLine(enabled=True)
    try:
        summary = audit_folder(folder, key, options, progress=progress)
    finally:
        progress.close()

    if as_json:
        click.echo(json.dumps(summary))
        return
    for row in summary["files"]:
        click.echo(_audit_line(row))
    suggested = sum(1 for row in summary["files"] if row["verdict"])
    failed = sum(1 for row in summary["files"] if row["error"])
    click.echo(f"{len(summary['files'])} files, {suggested} with combined p-value under {alpha:g} (verdict "
               f"'see images'), {failed} not checked")
    click.echo(f"summary: {summary['csv']}, {summary['json']}; reports: {summary['reports']}")


def _audit_line(row: dict) -> str:
    if row["error"]:
        return f"{row['file']}: not checked: {row['error']}"
    p_value = "n/a" if row["p_value"] is None else f"{row['p_value']:.3g}"
    verdict = f"  {row['verdict']}" if row["verdict"] else ""
    return f"{row['file']}: mean SSIM {row['ssim_mean']:.3f}  p {p_value}{verdict}"


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect(model, as_json):
    """Show MODEL's layers, the transposition plan and every node without a rule."""
    from onnxmark.inspect import inspect_model

    report = inspect_model(model)
    lines = [f"{report['model']}: opset {report['opset']}, input {report['input']} {report['input_shape']}, "
             f"logits {report['logits']}"]
    lines.append("forward nodes on the activation path:")
    lines += [f"  {n['name']:40s} {n['op_type']:20s} {n['status']}" for n in report["nodes"]]
    lines.append("transposed model (execution order):")
    lines += [f"  {i:3d} {s['op']:20s} {s['output_shape']} -> {s['input_shape']}" for i, s in enumerate(report["plan"])]
    if report["unsupported"]:
        lines.append(f"{len(report['unsupported'])} node(s) cannot be transposed:")
        lines += [f"  {u}" for u in report["unsupported"]]
    _print_result(report, as_json, lines)
    if report["unsupported"]:
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
