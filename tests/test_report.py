"""The evidence report of `onnxmark extract`: report.html, the sheet, --reference, and a Chromium screenshot."""
from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxmark.extract import Extraction, sheet_png, write_evidence
from onnxmark.files import OutputTransaction
from onnxmark.report import render_report
from tests.conftest import FIXTURE_MODEL
from tests.test_cli import last_json, onnxmark

KEY_COUNT = 3
TILE_PIXELS = 112  # a 28x28 image scaled up 4 times


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A quick embed of the fixture CNN: 3 keys, short hardening and two epochs."""
    folder = tmp_path_factory.mktemp("embed")
    result = onnxmark("embed", FIXTURE_MODEL, "--seed", 0, "--data", "mnist-sample", "-o", folder, "--keys", KEY_COUNT,
                      "--max-hardening-steps", 300, "--epochs", 2, "--json")
    return last_json(result)


@pytest.fixture(scope="module")
def evidence(embedded, tmp_path_factory):
    """Extraction from the watermarked model with the unwatermarked fixture as reference."""
    folder = tmp_path_factory.mktemp("evidence") / "evidence"
    result = onnxmark("extract", embedded["model"], "--key", embedded["key"], "--reference", FIXTURE_MODEL,
                      "-o", folder, "--json")
    return folder, last_json(result)


class ImageCollector(HTMLParser):
    """HTML parser that records every tag name and the attributes of every img."""

    def __init__(self):
        super().__init__()
        self.tags = []
        self.images = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))


def parse_report(path: Path) -> ImageCollector:
    collector = ImageCollector()
    collector.feed(path.read_text(encoding="utf-8"))
    return collector


def decode_data_uri(src: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))).convert("RGB"))


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def mlp_model(path: Path) -> Path:
    """Save a one-layer classifier for 28x28 inputs, a structure the fixture CNN's key does not fit."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("fc.weight", TensorProto.FLOAT, [10, 784],
                                rng.normal(0, 0.05, (10, 784)).astype(np.float32).ravel())
    bias = helper.make_tensor("fc.bias", TensorProto.FLOAT, [10], np.zeros(10, np.float32))
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], [weight, bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_extract_writes_report_files(evidence):
    folder, summary = evidence

    assert Path(summary["report"]) == folder / "report.html"
    assert (folder / "report.html").is_file()
    assert (folder / "sheet.png").is_file()
    assert sorted(p.name for p in folder.glob("reference*.png")) == [f"reference{i:02d}.png" for i in range(KEY_COUNT)]
    assert json.loads((folder / "scores.json").read_text()) == summary


def test_summary_records_hashes_and_versions(embedded, evidence):
    import onnxruntime

    _, summary = evidence
    commit = onnxmark("key", "commit", embedded["key"]).stdout.strip()

    assert summary["file_sha256"] == sha256_of(embedded["model"])
    assert summary["key_sha256"] == sha256_of(embedded["key"])
    assert summary["key_commitment"] == commit
    assert summary["key_model_sha256"] == summary["model_sha256"]
    assert summary["date"] == datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert summary["onnxruntime_version"] == onnxruntime.__version__
    assert summary["reference"]["file_sha256"] == sha256_of(FIXTURE_MODEL)


def test_psnr_matches_mse(evidence):
    _, summary = evidence
    for entry in summary["keys"] + summary["reference"]["keys"]:
        assert entry["psnr"] == pytest.approx(10 * np.log10(1 / entry["mse"]), rel=1e-9)
    assert min(entry["psnr"] for entry in summary["keys"]) > max(entry["psnr"]
                                                                 for entry in summary["reference"]["keys"])


def test_reference_shows_no_watermark(evidence):
    _, summary = evidence
    assert summary["ssim_mean"] >= 0.9
    assert summary["reference"]["mismatch"] is None
    assert summary["reference"]["ssim_mean"] <= 0.1


def test_report_is_self_contained(evidence):
    folder, _ = evidence
    text = (folder / "report.html").read_text(encoding="utf-8")
    report = parse_report(folder / "report.html")

    assert "script" not in report.tags
    assert "link" not in report.tags
    assert "http://" not in text
    assert "https://" not in text
    assert "url(" not in text
    assert len(report.images) == 3 * KEY_COUNT
    for image in report.images:
        assert decode_data_uri(image["src"]).shape == (TILE_PIXELS, TILE_PIXELS, 3)
        assert image["alt"]


def test_report_images_are_the_extracted_ones(evidence):
    """Each row shows the secret, then key NN.png and referenceNN.png, scaled up 4 times."""
    folder, _ = evidence
    images = parse_report(folder / "report.html").images

    for index in range(KEY_COUNT):
        secret, suspect, reference = (decode_data_uri(image["src"]) for image in images[3 * index:3 * index + 3])
        extracted = np.asarray(Image.open(folder / f"key{index:02d}.png").convert("RGB"))
        control = np.asarray(Image.open(folder / f"reference{index:02d}.png").convert("RGB"))
        assert np.array_equal(suspect[::4, ::4], extracted)
        assert np.array_equal(reference[::4, ::4], control)
        assert not np.array_equal(secret, suspect)


def test_report_shows_hashes_and_scores(evidence):
    folder, summary = evidence
    text = (folder / "report.html").read_text(encoding="utf-8")

    for value in (summary["file_sha256"], summary["key_sha256"], summary["key_commitment"],
                  summary["reference"]["file_sha256"], summary["date"], summary["onnxruntime_version"]):
        assert value in text
    for entry in summary["keys"]:
        assert f"SSIM {entry['ssim']:.3f}" in text
        assert f"PSNR {entry['psnr']:.1f} dB" in text


def test_sheet_has_reference_column(embedded, evidence, tmp_path):
    """Every reference image appears on the sheet, scaled up 4 times, and not on a sheet without --reference."""
    folder, _ = evidence
    onnxmark("extract", embedded["model"], "--key", embedded["key"], "-o", tmp_path / "plain")
    sheet = np.asarray(Image.open(folder / "sheet.png").convert("L"))
    plain = np.asarray(Image.open(tmp_path / "plain" / "sheet.png").convert("L"))

    places = []
    for index in range(KEY_COUNT):
        control = np.asarray(Image.open(folder / f"reference{index:02d}.png").convert("L"))
        tile = np.kron(control, np.ones((4, 4), np.uint8))
        places.append(_find_tile(sheet, tile, tolerance=0))
        assert places[-1] is not None, f"reference image {index} is not on the sheet"
        assert _find_tile(plain, tile, tolerance=0) is None
    assert len({column for _, column in places}) == 1


def test_report_escapes_file_names(embedded, tmp_path):
    odd = tmp_path / "<b>suspect&co<i>.onnx"
    shutil.copy(embedded["model"], odd)

    onnxmark("extract", odd, "--key", embedded["key"], "-o", tmp_path / "evidence")
    text = (tmp_path / "evidence" / "report.html").read_text(encoding="utf-8")

    assert "&lt;b&gt;suspect&amp;co&lt;i&gt;.onnx" in text
    assert "<b>suspect" not in text


def test_reference_of_other_structure(embedded, tmp_path):
    reference = mlp_model(tmp_path / "mlp.onnx")

    result = onnxmark("extract", embedded["model"], "--key", embedded["key"], "--reference", reference,
                      "-o", tmp_path / "evidence", "--json")
    summary = last_json(result)
    text = (tmp_path / "evidence" / "report.html").read_text(encoding="utf-8")

    assert summary["reference"]["file_sha256"] == sha256_of(reference)
    assert "does not fit" in summary["reference"]["mismatch"]
    assert "structure differs" in text
    assert len(parse_report(tmp_path / "evidence" / "report.html").images) == 2 * KEY_COUNT
    assert not list((tmp_path / "evidence").glob("reference*.png"))


def test_reference_of_other_structure_text_output(embedded, tmp_path):
    reference = mlp_model(tmp_path / "mlp.onnx")

    result = onnxmark("extract", embedded["model"], "--key", embedded["key"], "--reference", reference,
                      "-o", tmp_path / "evidence")

    assert "structure differs" in result.stdout
    assert "does not fit" in result.stdout


@pytest.mark.parametrize("case", ["missing", "not onnx", "folder"])
def test_unreadable_reference(embedded, tmp_path, case):
    reference = tmp_path / "reference.onnx"
    if case == "not onnx":
        reference.write_text("not a model\n")
    elif case == "folder":
        reference.mkdir()

    result = onnxmark("extract", embedded["model"], "--key", embedded["key"], "--reference", reference,
                      "-o", tmp_path / "evidence", check=False)

    assert result.returncode == 2
    assert str(reference) in result.stderr
    assert not (tmp_path / "evidence").exists()


def test_missing_key_file(embedded, tmp_path):
    result = onnxmark("extract", embedded["model"], "--key", tmp_path / "absent.json", "-o", tmp_path / "evidence",
                      check=False)

    assert result.returncode == 2
    assert "Key file not found" in result.stderr
    assert not (tmp_path / "evidence").exists()


def rgb_extraction(rng) -> Extraction:
    secrets = rng.uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    images = np.clip(secrets + rng.normal(0, 0.1, secrets.shape), 0, 1).astype(np.float32)
    mse = ((images - secrets) ** 2).reshape(2, -1).mean(axis=1)
    return Extraction(model="rgb.onnx", model_sha256="0" * 64, images=images, secrets=secrets,
                      ssim=np.array([0.8, 0.7]), mse=mse)


def test_report_of_rgb_images(tmp_path):
    """Colour images keep their colours in the report, scaled up 4 times from 32x32."""
    extraction = rgb_extraction(np.random.default_rng(0))
    with OutputTransaction(force=False) as transaction:
        write_evidence(extraction, tmp_path, transaction)
    images = [decode_data_uri(image["src"]) for image in parse_report(tmp_path / "report.html").images]

    assert len(images) == 4
    for index in range(2):
        expected_secret = np.rint(extraction.secrets[index].transpose(1, 2, 0) * 255).astype(np.uint8)
        expected_image = np.rint(extraction.images[index].transpose(1, 2, 0) * 255).astype(np.uint8)
        assert np.array_equal(images[2 * index][::4, ::4], expected_secret)
        assert np.array_equal(images[2 * index + 1][::4, ::4], expected_image)


def test_optional_statistics_rendered_when_present():
    """p-values, z-scores and the wrong-secret control appear only when the summary has them."""
    extraction = rgb_extraction(np.random.default_rng(1))
    plain = extraction.summary()
    with_statistics = extraction.summary()
    with_statistics["p_value"] = 3.2e-9
    for entry in with_statistics["keys"]:
        entry.update(p_value=1.5e-5, z_score=6.31, control_ssim=0.0123)

    plain_text = render_report(plain, extraction.secrets, extraction.images)
    text = render_report(with_statistics, extraction.secrets, extraction.images)

    assert "Combined p-value 3.20e-09" in text
    assert "p-value 1.50e-05" in text
    assert "z-score 6.3" in text
    assert "SSIM with a wrong secret 0.012" in text
    assert "p-value" not in plain_text
    assert "z-score" not in plain_text
    assert "wrong secret" not in plain_text
    assert sheet_png(extraction, with_statistics) != sheet_png(extraction, plain)


# Chromium, headless: the report as a reader sees it.

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
# Flags that keep Chromium off the network: no background services, and no host name resolves.
CHROMIUM_OFFLINE_FLAGS = ["--disable-background-networking", "--disable-component-update", "--disable-sync",
                          "--no-first-run", "--no-default-browser-check", "--host-resolver-rules=MAP * ~NOTFOUND"]
SCREENSHOT_SIZE = (1000, 2200)


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="Chromium is not installed (apt-get install chromium)")


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}", *CHROMIUM_OFFLINE_FLAGS,
               *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def screenshot(report: Path, tmp_path: Path) -> np.ndarray:
    shot = tmp_path / "report.png"
    run_chromium(tmp_path, f"--screenshot={shot}", f"--window-size={SCREENSHOT_SIZE[0]},{SCREENSHOT_SIZE[1]}",
                 report.resolve().as_uri())
    return np.asarray(Image.open(shot).convert("L"))


def _find_tile(page: np.ndarray, tile: np.ndarray, tolerance: int = 3) -> tuple[int, int] | None:
    """Return (row, column) of the top-left corner where `tile` appears in `page`, gray levels within tolerance."""
    height, width = tile.shape
    if height > page.shape[0] or width > page.shape[1]:
        return None
    page = page.astype(np.int16)
    tile = tile.astype(np.int16)

    # Candidates: corners where the tile's most varied row matches, checked one tile column at a time.
    probe = int(np.argmax(tile.std(axis=1)))
    rows = page.shape[0] - height + 1
    columns = page.shape[1] - width + 1
    candidates = np.ones((rows, columns), bool)
    for x in range(width):
        candidates &= np.abs(page[probe:probe + rows, x:x + columns] - tile[probe, x]) <= tolerance
        if not candidates.any():
            return None

    for top, left in zip(*np.nonzero(candidates)):
        if np.abs(page[top:top + height, left:left + width] - tile).max() <= tolerance:
            return int(top), int(left)
    return None


@needs_chromium
def test_screenshot_shows_every_image(evidence, tmp_path):
    folder, _ = evidence
    page = screenshot(folder / "report.html", tmp_path)
    tiles = [np.asarray(Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))).convert("L"))
             for image in parse_report(folder / "report.html").images]

    assert page.std() > 20, "the screenshot is blank"
    for index in range(KEY_COUNT):
        places = [_find_tile(page, tile) for tile in tiles[3 * index:3 * index + 3]]
        assert None not in places, f"key {index}: tile not on screen at {places}"
        rows = {row for row, _ in places}
        columns = [column for _, column in places]
        assert len(rows) == 1, f"key {index}: secret, suspect and reference are not side by side: {places}"
        assert columns == sorted(columns), f"key {index}: columns out of order: {places}"


@needs_chromium
def test_screenshot_of_broken_images(evidence, tmp_path):
    """The screenshot check finds nothing in a report whose image data is corrupt."""
    folder, _ = evidence
    text = (folder / "report.html").read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace("data:image/png;base64,", "data:image/png;base64,AAAA"), encoding="utf-8")
    page = screenshot(broken, tmp_path)
    first_secret = decode_data_uri(parse_report(folder / "report.html").images[0]["src"])[:, :, 0]

    assert _find_tile(page, first_secret) is None


@needs_chromium
def test_printed_report_keeps_images(evidence, tmp_path):
    """Printing to PDF keeps every image: one image object per picture in the report."""
    folder, _ = evidence
    pdf = tmp_path / "report.pdf"
    report = (folder / "report.html").resolve().as_uri()
    run_chromium(tmp_path, f"--print-to-pdf={pdf}", "--no-pdf-header-footer", report)
    data = pdf.read_bytes()

    assert data.startswith(b"%PDF")
    assert data.count(b"/Subtype /Image") >= 3 * KEY_COUNT
