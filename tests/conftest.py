"""Shared test fixtures: paths of the shipped fixture model and of the real models beside the repository."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_MODEL = ROOT / "fixtures" / "mnist_cnn.onnx"
SHARED_MODELS = ROOT.parent / "shared" / "models"

# The trained MNIST models that embed without teacher mode, with the preprocessing each one expects.
REAL_MNIST_MODELS = [
    "cntk_mnist_opset7.onnx",
    "pytorch2.5.1_mnist_opset17.onnx",
    "pytorch2.0.0_burn_mnist_bn.onnx",
    "pytorch1.11_mnist_mlp_softmax.onnx",
    "keras2onnx_mnist_cnn_maxpool.onnx",
    "djl_mnist_mvn.onnx",
]

# Every model in ../shared/models.
ALL_REAL_MODELS = [
    *REAL_MNIST_MODELS,
    "caffe2_squeezenet1.1_fp16.onnx",
    "keras2onnx_mnist_mlp_softmax.onnx",
    "pytorch1.10_cifar10_resize.onnx",
    "pytorch1.7_cifar10_imageclassifier.onnx",
    "tf2onnx_gtsrb_43cls_nhwc.onnx",
    "tf2onnx_traffic_classifier64_nhwc.onnx",
]


def real_model(name: str) -> Path:
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.skip(f"real model {name} not found under {SHARED_MODELS}")
    return path


def real_model_options(name: str) -> list[str]:
    """The command-line preprocessing options that preprocessing.json records for a real model."""
    settings = json.loads((SHARED_MODELS / "preprocessing.json").read_text())
    return list(settings[name]["options"])


@pytest.fixture(scope="session")
def watermarked_fixture(tmp_path_factory):
    """Embed the shipped fixture model once per session with default settings; return embed's summary."""
    from onnxmark.embed import EmbedOptions, embed

    folder = tmp_path_factory.mktemp("watermarked_fixture")
    return embed(FIXTURE_MODEL, EmbedOptions(data="mnist-sample", output_dir=folder))


@pytest.fixture(scope="session")
def embedded_real_model(tmp_path_factory):
    """Return a function that embeds a real model with its recorded preprocessing, once per session.

    The function runs `onnxmark embed --json` with the default settings (teacher mode where preprocessing.json
    sets it, `extra` options appended) and returns its summary. It skips when the model is absent.
    """
    summaries = {}

    def embed_once(name: str, *extra: str) -> dict:
        if (name, extra) not in summaries:
            path = real_model(name)
            setting = json.loads((SHARED_MODELS / "preprocessing.json").read_text())[name]
            teacher = ["--teacher"] if setting["teacher"] else []
            folder = tmp_path_factory.mktemp(Path(name).stem)
            result = subprocess.run([sys.executable, "-m", "onnxmark", "embed", str(path), "--seed", "0", "--data", setting["data"],
                                     *setting["options"], *teacher, *extra, "-o", str(folder), "--json"],
                                    capture_output=True, text=True, cwd=ROOT)
            assert result.returncode == 0, result.stderr
            summaries[name, extra] = json.loads(result.stdout.strip().splitlines()[-1])
        return summaries[name, extra]

    return embed_once
