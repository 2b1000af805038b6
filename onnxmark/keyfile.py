"""The key file: key vectors, secrets, preprocessing and the structure of the watermarked model.

The format is versioned JSON; docs/key-format.md describes every field.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxmark.calibration import KEY_HIGH
from onnxmark.data import InputSpec, Preprocessing
from onnxmark.errors import OnnxmarkError
from onnxmark.restore import BATCH_NORM_ARRAYS
from onnxmark.secrets import secret_from_png_bytes, secret_to_png_bytes

KEY_FORMAT = "onnxmark-key"
KEY_FORMAT_VERSION = 1


@dataclass
class Key:
    """Everything the verifier needs besides the suspect's weights."""

    keys: np.ndarray                 # [K, logits] float32 key vectors
    secrets: np.ndarray              # [K, C, H, W] float32 pixels in [0, 1]
    input_spec: InputSpec
    preprocessing: Preprocessing
    signature: list[dict]            # structure of the transposed layers, in execution order
    model_sha256: str = ""           # SHA-256 of the watermarked model file
    model_file: str = ""
    created: str = ""
    onnxmark_version: str = ""
    frozen: dict[str, np.ndarray] = field(default_factory=dict)   # tensors recorded from forward passes
    batch_norms: list[dict] = field(default_factory=list)   # batch norms after Convs, to undo their folding
    head: list[np.ndarray] = field(default_factory=list)    # classification head weight (and bias)
    key_range: float = KEY_HIGH   # key vectors are drawn uniform in [-key_range, key_range]

    def to_json(self) -> str:
        document = {
            "format": KEY_FORMAT,
            "version": KEY_FORMAT_VERSION,
            "created": self.created,
            "onnxmark_version": self.onnxmark_version,
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "input": self.input_spec.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "key_range": float(self.key_range),
            "keys": [[float(v) for v in row] for row in np.asarray(self.keys, dtype=np.float32)],
            "secrets": [base64.b64encode(secret_to_png_bytes(s)).decode("ascii") for s in self.secrets],
            "signature": self.signature,
            "frozen": {name: _encode_array(value) for name, value in self.frozen.items()},
            "batch_norms": [{name: _encode_array(value) if isinstance(value, np.ndarray) else value
                             for name, value in record.items()} for record in self.batch_norms],
            "head": [_encode_array(value) for value in self.head],
        }
        return json.dumps(document, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "key") -> "Key":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise OnnxmarkError(f"{source} is not a valid key file: {error}") from error
        if not isinstance(document, dict) or document.get("format") != KEY_FORMAT:
            raise OnnxmarkError(f"{source} is not an onnxmark key file (no \"format\": \"{KEY_FORMAT}\")")
        if document.get("version") != KEY_FORMAT_VERSION:
            raise OnnxmarkError(f"{source} has key format version {document.get('version')}; this onnxmark "
                                f"reads version {KEY_FORMAT_VERSION}")
        try:
            keys = np.asarray(document["keys"], dtype=np.float32)
            secrets = np.stack([secret_from_png_bytes(base64.b64decode(s)) for s in document["secrets"]])
            key = cls(
                keys=keys, secrets=secrets,
                input_spec=InputSpec.from_dict(document["input"]),
                preprocessing=Preprocessing.from_dict(document["preprocessing"]),
                signature=document["signature"],
                model_sha256=document.get("model_sha256", ""),
                model_file=document.get("model_file", ""),
                created=document.get("created", ""),
                onnxmark_version=document.get("onnxmark_version", ""),
                frozen={name: _decode_array(value) for name, value in document.get("frozen", {}).items()},
                batch_norms=[_decode_batch_norm(record) for record in document.get("batch_norms", [])],
                head=[_decode_array(value) for value in document.get("head", [])],
                key_range=float(document.get("key_range", KEY_HIGH)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise OnnxmarkError(f"{source} is not a valid key file: missing or invalid field ({error})") from error
        if keys.ndim != 2 or len(keys) != len(secrets):
            raise OnnxmarkError(f"{source} is not a valid key file: {len(keys)} key vectors for "
                                f"{len(secrets)} secrets")
        return key


def load_key(path: str | Path) -> Key:
    path = Path(path)
    if not path.is_file():
        raise OnnxmarkError(f"Key file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OnnxmarkError(f"{path} is not a valid key file: it is not UTF-8 text") from None
    except OSError as error:
        raise OnnxmarkError(f"Failed to read the key file {path}: {error}") from None
    return Key.from_json(text, str(path))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_sha256(model) -> str:
    """Return the SHA-256 of a model with all its weights inline, the same whether they came from one file or two.

    Loading external data leaves `data_location` set to its default on each tensor, which changes the
    serialized bytes, so the field is cleared first.
    """
    import onnx

    canonical = onnx.ModelProto()
    canonical.CopyFrom(model)
    for initializer in canonical.graph.initializer:
        if initializer.data_location == onnx.TensorProto.DEFAULT:
            initializer.ClearField("data_location")
    return sha256_bytes(canonical.SerializeToString())


def _decode_batch_norm(record: dict) -> dict:
    decoded = {name: _decode_array(record[name]) for name in BATCH_NORM_ARRAYS}
    decoded["layer_index"] = int(record["layer_index"])
    decoded["epsilon"] = float(record["epsilon"])
    return decoded


def _encode_array(value: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(value), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode_array(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)
