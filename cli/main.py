"""The onnxmark command line: parse arguments, show progress, print results. No method logic here.

`extract` and `inspect` must not import torch, so the embed machinery is imported inside `embed` only.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from onnxmark import __version__
from onnxmark.calibration import DEFAULT_NULL_KEYS, DEFAULT_NULL_SEED
from onnxmark.errors import OnnxmarkError

EXIT_USER_ERROR = 2
EXIT_VERIFICATION_FAILED = 1  # the check ran, and the key is tampered or the signature is invalid


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
@click.option("--key-range", type=click.FloatRange(0, min_open=True), default=None,
              help="Key vectors are drawn uniform in [-R, R]. Default: 10, or less for a model whose transposed "
                   "images differ between such keys by more than one pixel unit before training, in "
                   "proportion (the key file records R).")
@click.option("--input-range", nargs=2, type=float, default=None, callback=_float_pair,
              help="Model input value range LO HI that pixels 0..1 map to (default 0 1).")
@click.option("--mean", type=str, default=None, help="Per-channel mean (comma-separated) of mean/std input normalisation.")
@click.option("--std", type=str, default=None, help="Per-channel std (comma-separated) of mean/std input normalisation.")
@click.option("--ssim-target", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Mean SSIM at which hardening stops and that constraint training keeps up.")
@click.option("--max-hardening-steps", type=click.IntRange(0), default=2000, show_default=True,
              help="Step limit of hardening.")
@click.option("--epochs", type=click.IntRange(0), default=None,
              help="Epochs of constraint training (default 5 from scratch, 24 for a trained model, where an "
                   "epoch also covers 4 shifted copies of every training image).")
@click.option("--mode", type=click.Choice(["auto", "scratch", "trained"]), default="auto", show_default=True,
              help="scratch: hardening, then training on the labels; trained: training to agree with the "
                   "original's outputs (knowledge distillation), labels only measure accuracy; auto: trained when "
                   "held-out accuracy is at least twice chance level.")
@click.option("--teacher", is_flag=True,
              help="Teacher mode: trained mode without labels, so any images will do. Chosen automatically when "
                   "the data has no labels.")
@click.option("--held-out", type=click.IntRange(1), default=1000, show_default=True,
              help="Number of images held out to measure accuracy and agreement with the original.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Training batch size.")
@click.option("--seed", type=int, default=None,
              help="Seed of the key vectors, the default secret texts, the held-out split and training, for a "
                   "repeatable run. Without it the key vectors and secret texts come from the operating system's "
                   "random source, so that they cannot be rebuilt, and the split and training use seed 0.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def embed(model, data, output_dir, secret_texts, secret_images, key_count, key_range, input_range, mean, std, ssim_target,
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
        secret_images=[str(p) for p in secret_images], key_count=key_count, key_range=key_range,
        preprocessing=_preprocessing(input_range, mean, std), ssim_target=ssim_target,
        max_hardening_steps=max_hardening_steps, epochs=epochs, mode=mode, teacher=teacher, held_out=held_out,
        batch_size=batch_size, seed=0 if seed is None else seed, secure_keys=seed is None, force=force)

    progress = ProgressLine(enabled=True)
    try:
        result = embed_model(model, options, progress=progress)
    finally:
        progress.close()
    _print_result(result, as_json, [
        f"watermarked model: {result['model']}",
        f"key:               {result['key']} (keep it secret; keys in [-{result['key_range']:g}, "
        f"{result['key_range']:g}])",
        f"evidence:          {result['evidence']}",
        f"mean SSIM {result['ssim_mean']:.3f} (min {result['ssim_min']:.3f}), {_fidelity(result)}, "
        f"{result['hardening_steps']} hardening steps at learning rate {result['learning_rate']:g}, "
        f"{result['seconds']:.1f} s",
    ])


def _fidelity(result: dict) -> str:
    """Held-out accuracy where labels measured it, and agreement with the original, as one phrase."""
    agreement = f"{100 * result['agreement']:.1f}% agreement with the original"
    if result["accuracy_before"] is None:
        return f"teacher mode, {agreement}" if result["teacher"] else agreement
    accuracy = (f"held-out accuracy {100 * result['accuracy_before']:.1f}% -> "
                f"{100 * result['accuracy_after']:.1f}%")
    if result["mode"] == "scratch":
        return accuracy   # an untrained original's predictions are noise, so agreement with it means nothing
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


def _preprocessing_or_key(input_range, mean, std, key_path):
    """Return the preprocessing the options give, or the one the key records where no option gives one."""
    from onnxmark.keyfile import load_key

    if input_range is None and mean is None and std is None and key_path is not None:
        return load_key(key_path).preprocessing
    return _preprocessing(input_range, mean, std)


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
              show_default=True,
              help="Folder for the extracted images, sheet.png, report.html and scores.json.")
@click.option("--reference", "reference_path", type=click.Path(path_type=Path), default=None,
              help="Reference model (for example the original, or one trained independently) to run the same "
                   "key on; its images appear beside the suspect's.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@null_key_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def extract(suspect, key_path, output_dir, reference_path, force, null_keys, null_seed, as_json):
    """Extract the watermark images that KEY produces from SUSPECT."""
    from onnxmark.extract import extract as extract_images, extract_reference, write_evidence
    from onnxmark.files import OutputTransaction
    from onnxmark.keyfile import load_key
    from onnxmark.report import format_psnr

    key = load_key(key_path)
    with OutputTransaction(force=force) as transaction:
        extraction = extract_images(suspect, key, null_keys=null_keys, null_seed=null_seed)
        reference = extract_reference(reference_path, key) if reference_path is not None else None
        summary = write_evidence(extraction, output_dir, transaction, key=key, key_path=key_path,
                                 reference=reference)

    lines = [f"{suspect}: mean SSIM {summary['ssim_mean']:.3f} (min {summary['ssim_min']:.3f}) over "
             f"{len(summary['keys'])} keys"]
    if summary["p_value"] is not None:
        lines.append(f"combined p-value {summary['p_value']:.3g} (Fisher's method over the keys' p-values, "
                     f"{summary['null_keys']} random keys, seed {summary['null_seed']})")
    lines += [f"  key {k['index']:2d}: SSIM {k['ssim']:.3f}  MSE {k['mse']:.4f}  {format_psnr(k['psnr'])}"
              f"{_calibration_columns(k)}  {k['image']}" for k in summary["keys"]]
    lines += _reference_lines(summary["reference"])
    lines.append(f"key commitment: {summary['key_commitment']}")
    lines.append(f"side-by-side sheet: {summary['sheet']}")
    lines.append(f"report: {summary['report']}")
    lines += [f"note: {note}" for note in summary["notes"]]
    _print_result(summary, as_json, lines)


def _reference_lines(reference: dict | None) -> list[str]:
    if reference is None:
        return []
    if reference["mismatch"]:
        return [f"reference {reference['model']}: structure differs, the key does not apply. {reference['mismatch']}"]
    return [f"reference {reference['model']}: mean SSIM {reference['ssim_mean']:.3f} "
            f"(min {reference['ssim_min']:.3f})"]


@main.group(name="key")
def key_group():
    """Commit to a key, sign the commitment and verify a key against it."""


@key_group.command()
@click.argument("key_path", metavar="KEY", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def commit(key_path, as_json):
    """Print the SHA-256 commitment of KEY.

    Publish or timestamp the commitment before any dispute, so that `key verify` can show later that KEY is
    unchanged.
    """
    from onnxmark.commitment import COMMITMENT_SCHEME, key_commitment
    from onnxmark.extract import file_sha256
    from onnxmark.keyfile import load_key

    commitment = key_commitment(load_key(key_path))
    result = {"key": str(key_path), "commitment": commitment, "scheme": COMMITMENT_SCHEME,
              "key_sha256": file_sha256(key_path)}
    _print_result(result, as_json, [commitment])


@key_group.command()
@click.argument("private_key_path", metavar="PRIVATE_KEY", type=click.Path(path_type=Path))
@click.option("--public-key", "public_key_path", type=click.Path(path_type=Path), default=None,
              help="Where to write the public key (default: PRIVATE_KEY with .pub.pem in place of .pem).")
@click.option("--encrypt", is_flag=True,
              help="Encrypt the private key with a passphrase, read from the environment variable "
                   "ONNXMARK_KEY_PASSPHRASE or asked for in the terminal.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def keygen(private_key_path, public_key_path, encrypt, force, as_json):
    """Generate an Ed25519 key pair for signing commitments.

    Writes PRIVATE_KEY (PKCS#8 PEM, readable only by its owner) and the public key (SubjectPublicKeyInfo PEM).
    """
    from onnxmark.commitment import PASSPHRASE_ENV, generate_key_pair
    from onnxmark.files import OutputTransaction

    if public_key_path is None:
        public_key_path = _public_key_path(private_key_path)
    if public_key_path.absolute() == private_key_path.absolute():
        raise click.UsageError("The public key needs another path than the private key.")
    passphrase = None
    if encrypt:
        passphrase = os.environ.get(PASSPHRASE_ENV) or _prompt_passphrase(confirm=True)

    pair = generate_key_pair(passphrase)
    with OutputTransaction(force=force) as transaction:
        transaction.write_bytes(private_key_path, pair.private_pem, private=True)
        transaction.write_bytes(public_key_path, pair.public_pem)

    result = {"private_key": str(private_key_path), "public_key": str(public_key_path),
              "public_key_sha256": pair.fingerprint, "encrypted": passphrase is not None}
    _print_result(result, as_json, [f"private key: {private_key_path} (keep it secret)",
                                    f"public key:  {public_key_path} (SHA-256 {pair.fingerprint})"])


def _public_key_path(private_key_path: Path) -> Path:
    name = private_key_path.name.removesuffix(".pem")
    return private_key_path.with_name(f"{name}.pub.pem")


def _prompt_passphrase(confirm: bool) -> str:
    from onnxmark.commitment import PASSPHRASE_ENV

    if not sys.stdin.isatty():
        raise click.UsageError(f"No terminal to ask for the passphrase: set the environment variable {PASSPHRASE_ENV}.")
    return click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)


@key_group.command()
@click.argument("key_path", metavar="KEY", type=click.Path(path_type=Path))
@click.option("--private-key", "private_key_path", required=True, type=click.Path(path_type=Path),
              help="Ed25519 private key in PEM, as `onnxmark key keygen` writes it.")
@click.option("-o", "--output", "signature_path", type=click.Path(path_type=Path), default=None,
              help="Signature file to write (default: KEY.sig, for example key.json.sig).")
@click.option("--force", is_flag=True, help="Overwrite an existing signature file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def sign(key_path, private_key_path, signature_path, force, as_json):
    """Sign the commitment of KEY and write a signature file.

    Anyone with the public key can then check with `key verify` that KEY is the key that was signed.
    """
    from onnxmark.commitment import (PASSPHRASE_ENV, load_private_key, private_key_is_encrypted, sign_key,
                                     signature_to_json)
    from onnxmark.files import write_text_atomic
    from onnxmark.keyfile import load_key

    key = load_key(key_path)
    passphrase = None
    if private_key_is_encrypted(private_key_path):
        passphrase = os.environ.get(PASSPHRASE_ENV) or _prompt_passphrase(confirm=False)
    document = sign_key(key, load_private_key(private_key_path, passphrase), key_file=key_path.name)

    signature_path = signature_path or key_path.with_name(key_path.name + ".sig")
    write_text_atomic(signature_path, signature_to_json(document), force=force)
    result = {"key": str(key_path), "signature": str(signature_path), "commitment": document["commitment"],
              "public_key_sha256": document["public_key_sha256"]}
    _print_result(result, as_json, [f"commitment: {document['commitment']}", f"signature:  {signature_path}"])


@key_group.command()
@click.argument("key_path", metavar="KEY", type=click.Path(path_type=Path))
@click.option("--public-key", "public_key_path", type=click.Path(path_type=Path), default=None,
              help="PEM file with the Ed25519 public key of the signer of the commitment.")
@click.option("--signature", "signature_path", type=click.Path(path_type=Path), default=None,
              help="Signature file (default with --public-key: KEY.sig).")
@click.option("--commitment", "commitment", default=None,
              help="A published commitment (64 hex digits) to compare the key with.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def verify(key_path, public_key_path, signature_path, commitment, as_json):
    """Check that KEY still matches a signed or published commitment. Exit with status 1 when it does not."""
    from onnxmark.commitment import load_public_key, load_signature, parse_commitment, verify_key
    from onnxmark.keyfile import load_key

    if signature_path is not None and public_key_path is None:
        raise click.UsageError("--signature needs --public-key: a signature proves nothing without the signer's "
                               "public key.")
    if public_key_path is None and commitment is None:
        raise click.UsageError("Give --public-key (with --signature) or --commitment to check the key against.")

    key = load_key(key_path)
    expected = parse_commitment(commitment, "--commitment") if commitment is not None else None
    signature = public_key = None
    if public_key_path is not None:
        public_key = load_public_key(public_key_path)
        signature = load_signature(signature_path or key_path.with_name(key_path.name + ".sig"))
    outcome = verify_key(key, expected, signature, public_key, source=str(key_path))

    result = {"key": str(key_path), "status": outcome.status, "commitment": outcome.commitment,
              "expected": outcome.expected, "message": outcome.message}
    _print_result(result, as_json, [f"{outcome.status}: {outcome.message}"])
    if not outcome.valid:
        sys.exit(EXIT_VERIFICATION_FAILED)


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


# ----- attack -----

ATTACK_KINDS = ("finetune", "prune", "fineprune", "overwrite", "erase", "replace-head", "quantize", "fp16",
                "fold-bn", "optimize", "rename", "opset")


def _preprocessing_options(command):
    """Add embed's preprocessing options (--input-range, --mean, --std) to a command."""
    command = click.option("--std", type=str, default=None,
                           help="Per-channel std (comma-separated) of mean/std input normalisation.")(command)
    command = click.option("--mean", type=str, default=None,
                           help="Per-channel mean (comma-separated) of mean/std input normalisation.")(command)
    return click.option("--input-range", nargs=2, type=float, default=None, callback=_float_pair,
                        help="Model input value range LO HI that pixels 0..1 map to. Default: the preprocessing "
                             "that --key (or --watch-key) records, else 0 1.")(command)


@main.command()
@click.argument("kind", type=click.Choice(ATTACK_KINDS))
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Path of the attacked model.")
@click.option("--data", help="Images with labels (same sources as embed). Accuracy before and after is measured on "
                             "the part embed holds out; training attacks train on the rest.")
@click.option("--train-data", help="Other images for training attacks to train on, all of them, instead of --data.")
@_preprocessing_options
@click.option("--held-out", type=click.IntRange(1), default=1000, show_default=True,
              help="Images of --data held out for accuracy, split as embed splits them with the same --seed.")
@click.option("--epochs", type=click.IntRange(0), default=None,
              help="Training epochs (default 2 for finetune and replace-head, 1 for fineprune).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="Adam learning rate of training and of overwrite/erase steps (default 0.001, embed's training "
                   "learning rate).")
@click.option("--level", type=click.FloatRange(0, 1), default=None,
              help="prune, fineprune: fraction 0 to 1 of all conv and linear weights set to zero (default 0.5).")
@click.option("--mode", type=click.Choice(["dynamic", "static"]), default=None,
              help="quantize: dynamic (int8 weights) or static (int8 weights and activations, needs --data) "
                   "(default dynamic).")
@click.option("--calibration-size", type=click.IntRange(1), default=None,
              help="quantize --mode static: number of --data images that calibrate the activations (default 256).")
@click.option("--target", type=int, default=None, help="opset: the opset to convert to.")
@click.option("--classes", type=click.IntRange(2), default=None,
              help="replace-head: number of classes of the new last layer.")
@click.option("--head-only", is_flag=True, help="replace-head: train the new last layer alone.")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="overwrite, erase: number of adversarial hardening steps (default 300).")
@click.option("--measure-every", type=click.IntRange(1), default=None,
              help="overwrite, erase: steps between two measurements of accuracy and SSIM (default 10).")
@click.option("--attacker-keys", type=click.IntRange(1), default=None,
              help="overwrite: number of the attacker's own random keys and secrets (default 11).")
@click.option("--key", "key_path", type=click.Path(path_type=Path), default=None,
              help="erase: the known key file whose mark is erased.")
@click.option("--watch-key", type=click.Path(path_type=Path), default=None,
              help="overwrite, erase: the owner's key file, to report the owner's mean SSIM per step "
                   "(erase watches --key when this is not given).")
@click.option("--replacement", type=click.Choice(["black", "reference"]), default=None,
              help="erase: the image the key should extract afterwards, black or that of --reference "
                   "(default black).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="erase --replacement reference: an unwatermarked model of the same architecture.")
@click.option("--keep-io-types", is_flag=True, help="fp16: keep float32 model inputs and outputs.")
@click.option("--optimization", type=click.Choice(["basic", "extended"]), default=None,
              help="optimize: onnxruntime graph optimisation level (default basic).")
@click.option("--keep-io-names", is_flag=True, help="rename: keep the names of the graph inputs and outputs.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Training batch size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split, training and attacker keys.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def attack(kind, model, output, data, train_data, input_range, mean, std, held_out, epochs, lr, level, mode,
           calibration_size, target, classes, head_only, steps, measure_every, attacker_keys, key_path, watch_key,
           replacement, reference, keep_io_types, optimization, keep_io_names, batch_size, seed, force, as_json):
    """Attack MODEL with KIND and write the attacked model, as a suspect could have made it.

    \b
    Training attacks (need --data):
      finetune      train every weight for --epochs at --lr
      fineprune     prune at --level, then fine-tune with pruned weights kept at zero
      replace-head  new last layer for --classes classes, then fine-tune
    Watermark attacks:
      overwrite     hardening with the attacker's own random keys and secrets, --steps steps
      erase         train the known --key to extract a black or --reference image, --steps steps
    Rewrites:
      prune         global magnitude pruning at --level
      quantize      onnxruntime int8 quantization, --mode dynamic or static
      fp16          float16 conversion (onnxconverter-common)
      fold-bn       fold BatchNormalization into the preceding Conv or Gemm
      optimize      onnxruntime offline graph optimisation at --optimization
      rename        rename every node and tensor
      opset         convert to opset --target
    """
    from onnxmark.attacks import AttackOptions, run_attack

    options = AttackOptions(
        data=data, train_data=train_data, held_out=held_out,
        preprocessing=_preprocessing_or_key(input_range, mean, std, key_path or watch_key),
        batch_size=batch_size, seed=seed, force=force, epochs=epochs, lr=lr, level=level, mode=mode,
        calibration_size=calibration_size, target=target, classes=classes, head_only=head_only, steps=steps,
        measure_every=measure_every, attacker_keys=attacker_keys, key=key_path, watch_key=watch_key,
        replacement=replacement, reference=reference, keep_io_types=keep_io_types, optimization=optimization,
        keep_io_names=keep_io_names)

    progress = ProgressLine(enabled=True)
    try:
        result = run_attack(kind, model, output, options, progress=progress)
    finally:
        progress.close()
    _print_result(result, as_json, _attack_lines(result))


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _attack_lines(result: dict) -> list[str]:
    lines = [f"attacked model: {result['model']} ({result['attack']}, {result['seconds']:.1f} s)"]
    if result["accuracy_before"] is not None or result["accuracy_after"] is not None:
        lines.append(f"held-out accuracy {_percent(result['accuracy_before'])} -> {_percent(result['accuracy_after'])}")
    if result.get("folded") == []:
        lines.append("no BatchNormalization follows a Conv or Gemm, so the model was written unchanged")
    for row in result.get("history", []):
        ssim = "" if row["ssim_mean"] is None else f"  owner's mean SSIM {row['ssim_mean']:.3f}"
        lines.append(f"  step {row['step']:5d}: accuracy {_percent(row['accuracy'])}{ssim}  "
                     f"attack SSIM {row['attack_ssim']:.3f}")
    if result.get("ssim_mean") is not None:
        lines.append(f"owner's mean SSIM after the attack: {result['ssim_mean']:.3f}")
    return lines

# ----- robustness -----

def _attack_list(ctx, param, value):
    if value is None:
        return []
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in ATTACK_KINDS]
    if unknown:
        raise click.BadParameter(f"unknown attack(s) {', '.join(unknown)}. Choose from {', '.join(ATTACK_KINDS)}.")
    return names


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path), help="Key file written by embed.")
@click.option("--data", required=True,
              help="Images with labels (same sources as embed): the attacks train on the part embed trained on and "
                   "accuracy is measured on the part it held out.")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("robustness"),
              show_default=True,
              help="Folder for robustness.json, robustness.csv, pruning.png and the extracted images of each row.")
@click.option("--attacks", callback=_attack_list, default=None,
              help="Comma-separated attack kinds to run (default: all). The unattacked model is always the first row.")
@_preprocessing_options
@click.option("--held-out", type=click.IntRange(1), default=1000, show_default=True,
              help="Images of --data held out for accuracy, split as embed splits them with the same --seed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split, training and attacker keys.")
@click.option("--keep-models", is_flag=True, help="Also write every attacked model to OUTPUT/models/.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def robustness(model, key_path, data, output_dir, attacks, input_range, mean, std, held_out, seed, keep_models,
               force, as_json):
    """Attack MODEL at several strengths and report accuracy and mean SSIM of KEY's secrets for each."""
    from onnxmark.robustness import RobustnessOptions, robustness as run_grid

    options = RobustnessOptions(data=data, output_dir=output_dir,
                                preprocessing=_preprocessing_or_key(input_range, mean, std, key_path),
                                attacks=attacks, held_out=held_out, seed=seed, keep_models=keep_models, force=force)

    progress = ProgressLine(enabled=True)

    def report_row(done: int, total: int, row: dict) -> None:
        progress.close()   # end a progress line that a training attack left open
        progress.phase = None
        click.echo(f"[{done}/{total}] {_row_line(row)}", err=True)

    try:
        summary = run_grid(model, key_path, options, progress=progress, on_row=report_row)
    finally:
        progress.close()
    lines = [f"{'attack':14s} {'strength':30s} {'accuracy':>9s} {'SSIM':>6s}"]
    lines += [_table_line(row) for row in summary["rows"]]
    lines.append(f"table: {summary['json']} and {summary['csv']}")
    if "plot" in summary:
        lines.append(f"pruning plot: {summary['plot']}")
    _print_result(summary, as_json, lines)


def _row_line(row: dict) -> str:
    name = f"{row['attack']} {row['strength']}".strip()
    if row["error"]:
        return f"{name}: {row['error'].splitlines()[0]}"
    return f"{name}: accuracy {_percent(row['accuracy'])}, mean SSIM {row['ssim_mean']:.3f}"


def _table_line(row: dict) -> str:
    ssim = "error" if row["ssim_mean"] is None else f"{row['ssim_mean']:.3f}"
    return f"{row['attack']:14s} {row['strength']:30s} {_percent(row['accuracy']):>9s} {ssim:>6s}"

if __name__ == "__main__":
    main()
