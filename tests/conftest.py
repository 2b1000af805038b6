"""Shared test fixtures: paths of the shipped fixture model and of the real models beside the repository."""
from __future__ import annotations

import json
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
]

# Every model in ../shared/models.
ALL_REAL_MODELS = [
    *REAL_MNIST_MODELS,
    "caffe2_squeezenet1.1_fp16.onnx",
    "djl_mnist_mvn.onnx",
    "keras2onnx_mnist_cnn_maxpool.onnx",
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
