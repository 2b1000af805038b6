"""Accuracy on labelled inputs and agreement between two ONNX models, measured with onnxruntime on the files."""
from __future__ import annotations

import numpy as np

from onnxmark.errors import OnnxmarkError


def predict(model_bytes: bytes, inputs: np.ndarray) -> np.ndarray:
    """Return the arg-max class of every input (model layout and value range) using onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    info = session.get_inputs()[0]
    batch = info.shape[0] if isinstance(info.shape[0], int) and info.shape[0] > 0 else 256
    dtype = np.float16 if info.type == "tensor(float16)" else np.float32

    predictions = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch].astype(dtype)
        padding = batch - len(chunk) if isinstance(info.shape[0], int) and info.shape[0] > 0 else 0
        if padding:
            chunk = np.concatenate([chunk, np.zeros((padding, *chunk.shape[1:]), dtype)])
        (output,) = session.run([session.get_outputs()[0].name], {info.name: chunk})
        if output.ndim > 2 and all(size == 1 for size in output.shape[2:]):
            output = output.reshape(len(output), -1)   # [batch, classes, 1, 1] after a global pooling
        if output.ndim != 2:
            raise OnnxmarkError(f"The model's output has shape {output.shape}; expected [batch, classes]")
        predictions.append(output[:len(chunk) - padding].argmax(axis=1))
    return np.concatenate(predictions)


def accuracy(model_bytes: bytes, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((predict(model_bytes, inputs) == labels).mean())


def agreement(model_bytes: bytes, reference_bytes: bytes, inputs: np.ndarray) -> float:
    """Fraction in [0, 1] of inputs on which both models predict the same top-1 class."""
    return float((predict(model_bytes, inputs) == predict(reference_bytes, inputs)).mean())
