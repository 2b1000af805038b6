"""Audit: check every ONNX file under a folder against one key, in worker processes, and write one summary.

Each file is extracted in a worker process, so a file that crashes onnxruntime ends only its own worker.
The parent writes a report folder per file (the same images, sheet and scores as `onnxmark extract`) and a
CSV and JSON summary, all in one OutputTransaction. Like extraction, this module imports no torch.
"""
from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from onnxmark.calibration import DEFAULT_NULL_KEYS, DEFAULT_NULL_SEED
from onnxmark.errors import OnnxmarkError
from onnxmark.extract import Extraction, extract, write_evidence
from onnxmark.files import OutputTransaction
from onnxmark.graph import set_runtime_threads
from onnxmark.keyfile import Key

log = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
REPORTS_FOLDER = "reports"
CSV_COLUMNS = ["file", "sha256", "ssim_mean", "ssim_min", "p_value", "verdict", "report", "error"]
# The verdict is the person's decision after looking at the images: one of VERDICTS. The audit only
# pre-fills SUGGESTED_VERDICT where the combined p-value is below alpha, and leaves every other row empty.
VERDICTS = ("match", "no match", "see images")
SUGGESTED_VERDICT = "see images"
DEFAULT_ALPHA = 1e-3
ONNX_SUFFIX = ".onnx"
HASH_CHUNK_BYTES = 1 << 20


@dataclass
class AuditOptions:
    """Everything `onnxmark audit` can be asked for, with the command line's defaults."""

    output_dir: Path
    workers: int | None = None          # None: one per available core, at most one per file
    null_keys: int = DEFAULT_NULL_KEYS
    null_seed: int = DEFAULT_NULL_SEED
    alpha: float = DEFAULT_ALPHA
    force: bool = False


def find_onnx_files(folder: str | Path) -> list[Path]:
    """Return every file whose name ends in .onnx (any case) under `folder`, sorted by path."""
    folder = Path(folder)
    if not folder.exists():
        raise OnnxmarkError(f"Folder not found: {folder}")
    if not folder.is_dir():
        raise OnnxmarkError(f"{folder} is not a folder. Give the folder that contains the suspect models.")
    files = sorted(path for path in folder.rglob("*") if path.name.lower().endswith(ONNX_SUFFIX) and path.is_file())
    if not files:
        raise OnnxmarkError(f"No .onnx files found under {folder}")
    return files


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not every platform has sched_getaffinity
        return os.cpu_count() or 1


def audit(folder: str | Path, key: Key, options: AuditOptions, progress=None) -> dict:
    """Check every ONNX file under `folder` with `key`, write the reports and summaries, and return the summary.

    A file that cannot be checked (not valid ONNX, another structure, a crash) gets a row with the reason
    in `error`, and the audit goes on.
    """
    started = time.time()
    folder = Path(folder)
    progress = progress or (lambda *args: None)
    files = find_onnx_files(folder)
    workers = options.workers or min(len(files), available_cores())
    output_dir = Path(options.output_dir)
    summary_paths = {"csv": output_dir / SUMMARY_CSV, "json": output_dir / SUMMARY_JSON}
    report_folders = _report_folders(files, folder, output_dir / REPORTS_FOLDER)

    rows = {}
    with OutputTransaction(force=options.force) as transaction:
        for path in summary_paths.values():
            transaction.check(path)

        progress("audit", 0, len(files), {})
        for path, row, extraction in _check_all(files, key, options, workers):
            if extraction is not None:
                write_evidence(extraction, report_folders[path], transaction, key=key)
                row["report"] = str(report_folders[path])
                row["verdict"] = _suggested_verdict(row["p_value"], options.alpha)
            else:
                log.info("%s not checked: %s", path, row["error"])
            rows[path] = row
            progress("audit", len(rows), len(files), {})

        ordered = [rows[path] for path in files]
        summary = {
            "folder": str(folder), "null_keys": options.null_keys, "null_seed": options.null_seed,
            "alpha": options.alpha, "verdicts": list(VERDICTS), "workers": workers,
            "csv": str(summary_paths["csv"]), "json": str(summary_paths["json"]),
            "reports": str(output_dir / REPORTS_FOLDER), "seconds": round(time.time() - started, 2),
            "files": ordered,
        }
        transaction.write_text(summary_paths["csv"], _csv_text(ordered))
        transaction.write_text(summary_paths["json"], json.dumps(summary, indent=1) + "\n")
    return summary


def _suggested_verdict(p_value: float | None, alpha: float) -> str:
    return SUGGESTED_VERDICT if p_value is not None and p_value < alpha else ""


def _report_folders(files: list[Path], folder: Path, reports: Path) -> dict[Path, Path]:
    """Give each file its report folder: its path under `folder` without .onnx, numbered where two collide."""
    folders, used = {}, set()
    for path in files:
        relative = path.relative_to(folder)
        candidate = reports / relative.with_name(relative.name[:-len(ONNX_SUFFIX)])
        base, number = candidate, 2
        while candidate in used:
            candidate = base.with_name(f"{base.name}-{number}")
            number += 1
        used.add(candidate)
        folders[path] = candidate
    return folders


def _check_all(files: list[Path], key: Key, options: AuditOptions, workers: int):
    """Yield (path, row, extraction or None) for every file as its worker finishes it.

    When a worker process dies, the pool breaks and every file it had not finished comes back with
    BrokenProcessPool. Those files are then checked again one at a time, each in a fresh process, so only
    the file that kills its worker is reported as such.
    """
    threads = max(1, available_cores() // workers)
    orphans = []
    for path, outcome in _run_pool(files, key, options, workers, threads):
        if isinstance(outcome, BrokenProcessPool):
            orphans.append(path)
        else:
            yield (path, *outcome)

    # NOTE: untested, because no test makes a worker process die.
    for path in orphans:
        (_, outcome), = _run_pool([path], key, options, 1, threads)
        if isinstance(outcome, BrokenProcessPool):
            message = ("the worker process checking this file stopped unexpectedly (a crash in onnxruntime, "
                       "or out of memory)")
            log.error("%s: %s", path, message)
            yield path, _error_row(path, _file_sha256(path), message), None
        else:
            yield (path, *outcome)


def _run_pool(files: list[Path], key: Key, options: AuditOptions, workers: int, threads: int):
    """Yield (path, (row, extraction)) per file, or (path, BrokenProcessPool) where the pool broke first."""
    context = multiprocessing.get_context("spawn")
    executor = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_start_worker,
        initargs=(key, options.null_keys, options.null_seed, threads))
    try:
        futures = {executor.submit(_check_file, str(path)): path for path in files}
        for future in concurrent.futures.as_completed(futures):
            try:
                yield futures[future], future.result()
            except BrokenProcessPool as error:
                yield futures[future], error
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


_worker_state: dict = {}


def _start_worker(key: Key, null_keys: int, null_seed: int, threads: int) -> None:
    set_runtime_threads(threads)
    _worker_state.update(key=key, null_keys=null_keys, null_seed=null_seed)


def _check_file(path: str) -> tuple[dict, Extraction | None]:
    """Extract the worker's key from one file, and return its summary row and the extraction (None on error)."""
    digest = _file_sha256(Path(path))
    try:
        extraction = extract(path, _worker_state["key"], null_keys=_worker_state["null_keys"],
                             null_seed=_worker_state["null_seed"])
    except OnnxmarkError as error:
        return _error_row(path, digest, str(error)), None
    except Exception as error:  # onnx and onnxruntime raise many types on unusual files; one must not stop the audit
        log.debug("Checking %s failed", path, exc_info=True)
        return _error_row(path, digest, f"{type(error).__name__}: {error}"), None

    calibration = extraction.calibration
    row = {"file": path, "sha256": digest, "ssim_mean": float(extraction.ssim.mean()),
           "ssim_min": float(extraction.ssim.min()),
           "p_value": None if calibration is None else calibration.p_value,
           "verdict": "", "report": None, "error": None}
    return row, extraction


def _error_row(path, digest: str | None, message: str) -> dict:
    return {"file": str(path), "sha256": digest, "ssim_mean": None, "ssim_min": None, "p_value": None,
            "verdict": "", "report": None, "error": message}


def _file_sha256(path: Path) -> str | None:
    """Return the SHA-256 of the file's bytes as stored (what sha256sum prints), or None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(HASH_CHUNK_BYTES), b""):
                digest.update(chunk)
    except OSError as error:
        log.warning("Failed to read %s to hash it: %s", path, error)
        return None
    return digest.hexdigest()


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: "" if row[column] is None else row[column] for column in CSV_COLUMNS})
    return buffer.getvalue()
