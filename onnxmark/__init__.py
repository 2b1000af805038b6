"""onnxmark: embed and extract visible ClearMark watermarks in ONNX image classifiers."""

__version__ = "0.1.0"
