"""Key commitments and their Ed25519 signatures.

A commitment is the SHA-256 of a canonical form of a key: every field the key reader reads, with the
arrays replaced by the SHA-256 of their raw little-endian bytes. It does not depend on JSON whitespace,
field order or how the PNG secrets are compressed. Published or timestamped before a dispute, it shows later
that the key was not changed. Because it covers the random key vectors, the commitment reveals nothing
about the key. A signature file contains an Ed25519 signature over the commitment. docs/key-format.md
describes both.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from onnxmark.errors import OnnxmarkError
from onnxmark.calibration import KEY_HIGH
from onnxmark.keyfile import KEY_FORMAT, KEY_FORMAT_VERSION, Key

COMMITMENT_SCHEME = "onnxmark-key-commitment-v1"
SIGNATURE_FORMAT = "onnxmark-key-signature"
SIGNATURE_FORMAT_VERSION = 1
SIGNATURE_ALGORITHM = "Ed25519"
SIGNATURE_BYTES = 64
PASSPHRASE_ENV = "ONNXMARK_KEY_PASSPHRASE"
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENCRYPTED_PEM_MARKER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


def canonical_key(key: Key) -> bytes:
    """Serialize the canonical form of a key: sorted, compact, ASCII-only JSON.

    Frozen tensors stay a list in file order, because extraction matches them to the suspect's branches by
    that order.
    """
    secrets = np.rint(np.clip(key.secrets, 0.0, 1.0) * 255.0).astype(np.uint8)
    document = {
        "scheme": COMMITMENT_SCHEME,
        "format": KEY_FORMAT,
        "version": KEY_FORMAT_VERSION,
        "created": key.created,
        "onnxmark_version": key.onnxmark_version,
        "model_file": key.model_file,
        "model_sha256": key.model_sha256,
        "input": key.input_spec.to_dict(),
        "preprocessing": key.preprocessing.to_dict(),
        "signature": key.signature,
        "keys": _array_digest(np.asarray(key.keys, dtype=np.float32)),
        "secrets": _array_digest(secrets),
        "frozen": [[name, _array_digest(value)] for name, value in key.frozen.items()],
        "batch_norms": [{name: _array_digest(value) if isinstance(value, np.ndarray) else value
                         for name, value in record.items()} for record in key.batch_norms],
        "head": [_array_digest(value) for value in key.head],
    }
    # The range that the random keys of the calibration come from. Only a range other than the default is
    # part of the form, so that keys written before it was recorded keep their commitments.
    if key.key_range != KEY_HIGH:
        document["key_range"] = float(key.key_range)
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def key_commitment(key: Key) -> str:
    """Return the commitment of a key: the SHA-256 (hex) of its canonical form."""
    return hashlib.sha256(canonical_key(key)).hexdigest()


def _array_digest(array: np.ndarray) -> dict:
    """Describe an array by dtype, shape and the SHA-256 of its little-endian C-order bytes."""
    array = np.asarray(array)
    little_endian = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"dtype": little_endian.dtype.str, "shape": list(array.shape),
            "sha256": hashlib.sha256(little_endian.tobytes()).hexdigest()}


def signed_message(commitment: str) -> bytes:
    """Return the bytes that an Ed25519 signature covers: the scheme name, a colon and the hex commitment."""
    return f"{COMMITMENT_SCHEME}:{commitment}".encode("ascii")


def parse_commitment(text: str, source: str = "commitment") -> str:
    """Return a commitment as 64 lowercase hex digits, or raise OnnxmarkError naming the invalid value."""
    normalized = text.strip().lower()
    if not _HEX_SHA256.fullmatch(normalized):
        raise OnnxmarkError(f"Invalid {source} {text!r}: expected a SHA-256 as 64 hex digits, as "
                            "`onnxmark key commit` prints it.")
    return normalized


# Ed25519 key pairs in PEM: PKCS#8 for the private key, SubjectPublicKeyInfo for the public key.

@dataclass(frozen=True)
class KeyPair:
    """A new Ed25519 key pair in PEM, with the public key's fingerprint."""

    private_pem: bytes
    public_pem: bytes
    fingerprint: str


def generate_key_pair(passphrase: str | None = None) -> KeyPair:
    """Generate an Ed25519 key pair, encrypting the private key's PEM when a passphrase is given."""
    private_key = Ed25519PrivateKey.generate()
    if passphrase:
        encryption = serialization.BestAvailableEncryption(passphrase.encode("utf-8"))
    else:
        encryption = serialization.NoEncryption()
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            encryption)
    public_key = private_key.public_key()
    public_pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return KeyPair(private_pem, public_pem, public_key_fingerprint(public_key))


def public_key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """Return the SHA-256 (hex) of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def private_key_is_encrypted(path: str | Path) -> bool:
    return _ENCRYPTED_PEM_MARKER in _read_pem(path, "Private key")


def load_private_key(path: str | Path, passphrase: str | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PKCS#8 PEM file, decrypting it with `passphrase` when it is encrypted."""
    data = _read_pem(path, "Private key")
    encrypted = _ENCRYPTED_PEM_MARKER in data
    if encrypted and passphrase is None:
        raise OnnxmarkError(f"Private key {path} is encrypted: set its passphrase in the environment variable "
                            f"{PASSPHRASE_ENV}, or run the command in a terminal to be asked for it.")
    try:
        private_key = serialization.load_pem_private_key(
            data, passphrase.encode("utf-8") if encrypted else None)
    except ValueError as error:
        hint = "the passphrase is wrong or the file is corrupt" if encrypted else "it is not a valid PEM private key"
        raise OnnxmarkError(f"Failed to load the private key {path}: {hint} ({error})") from None
    except (TypeError, UnsupportedAlgorithm) as error:
        raise OnnxmarkError(f"Failed to load the private key {path}: {error}") from None

    if not isinstance(private_key, Ed25519PrivateKey):
        raise OnnxmarkError(f"Private key {path} is a {type(private_key).__name__}, not an Ed25519 key. "
                            "Create one with `onnxmark key keygen`.")
    return private_key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a SubjectPublicKeyInfo PEM file."""
    data = _read_pem(path, "Public key")
    try:
        public_key = serialization.load_pem_public_key(data)
    except ValueError as error:
        hint = " (this is a private key: give the .pub.pem file)" if b"PRIVATE KEY-----" in data else ""
        raise OnnxmarkError(f"Failed to load the public key {path}: it is not a valid PEM public key{hint} "
                            f"({error})") from None
    except UnsupportedAlgorithm as error:
        raise OnnxmarkError(f"Failed to load the public key {path}: {error}") from None

    if not isinstance(public_key, Ed25519PublicKey):
        raise OnnxmarkError(f"Public key {path} is a {type(public_key).__name__}, not an Ed25519 key.")
    return public_key


def _read_pem(path: str | Path, description: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise OnnxmarkError(f"{description} file not found: {path}")
    try:
        return path.read_bytes()
    except OSError as error:
        raise OnnxmarkError(f"Failed to read the {description.lower()} file {path}: {error}") from None


# Signature files.

def sign_key(key: Key, private_key: Ed25519PrivateKey, key_file: str = "") -> dict:
    """Sign the key's commitment and return the signature file's document."""
    commitment = key_commitment(key)
    signature = private_key.sign(signed_message(commitment))
    return {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_FORMAT_VERSION,
        "algorithm": SIGNATURE_ALGORITHM,
        "commitment_scheme": COMMITMENT_SCHEME,
        "commitment": commitment,
        "signature": base64.b64encode(signature).decode("ascii"),
        "public_key_sha256": public_key_fingerprint(private_key.public_key()),
        "key_file": key_file,
        "signed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def signature_to_json(document: dict) -> str:
    return json.dumps(document, indent=1) + "\n"


@dataclass(frozen=True)
class SignatureFile:
    """The fields of a signature file that verification uses."""

    commitment: str
    signature: bytes
    public_key_sha256: str


def load_signature(path: str | Path) -> SignatureFile:
    """Read a signature file written by `sign_key`, or raise OnnxmarkError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise OnnxmarkError(f"Signature file not found: {path}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OnnxmarkError(f"{path} is not a valid signature file: {error}") from None
    except OSError as error:
        raise OnnxmarkError(f"Failed to read the signature file {path}: {error}") from None

    if not isinstance(document, dict) or document.get("format") != SIGNATURE_FORMAT:
        raise OnnxmarkError(f"{path} is not an onnxmark signature file (no \"format\": \"{SIGNATURE_FORMAT}\")")
    if document.get("version") != SIGNATURE_FORMAT_VERSION:
        raise OnnxmarkError(f"{path} has signature format version {document.get('version')}, but this "
                            f"onnxmark reads only version {SIGNATURE_FORMAT_VERSION}")
    if document.get("algorithm") != SIGNATURE_ALGORITHM or document.get("commitment_scheme") != COMMITMENT_SCHEME:
        raise OnnxmarkError(f"{path} uses algorithm {document.get('algorithm')!r} over commitment scheme "
                            f"{document.get('commitment_scheme')!r}, but this onnxmark checks only "
                            f"{SIGNATURE_ALGORITHM} over {COMMITMENT_SCHEME}")

    commitment = parse_commitment(str(document.get("commitment", "")), f"commitment in {path}")
    try:
        signature = base64.b64decode(str(document.get("signature", "")), validate=True)
    except binascii.Error as error:
        raise OnnxmarkError(f"{path} is not a valid signature file: the signature is not base64 ({error})") from None
    if len(signature) != SIGNATURE_BYTES:
        raise OnnxmarkError(f"{path} is not a valid signature file: the signature has {len(signature)} bytes, "
                            f"an Ed25519 signature has {SIGNATURE_BYTES}")
    return SignatureFile(commitment, signature, str(document.get("public_key_sha256", "")))


# Verification.

VALID = "valid"
TAMPERED = "tampered"
BAD_SIGNATURE = "bad-signature"


@dataclass(frozen=True)
class Verification:
    """The outcome of checking a key against a published commitment and/or a signature file."""

    status: str           # VALID, TAMPERED or BAD_SIGNATURE
    commitment: str       # the key's commitment as computed now
    expected: str         # the commitment it was checked against
    message: str

    @property
    def valid(self) -> bool:
        return self.status == VALID


def verify_key(key: Key, commitment: str | None = None, signature: SignatureFile | None = None,
               public_key: Ed25519PublicKey | None = None, source: str = "key") -> Verification:
    """Check a key against a published commitment, a signature file with its public key, or both.

    A key whose commitment differs from the published or signed one is TAMPERED. A signature that the
    public key does not verify is BAD_SIGNATURE, whether the signature file was altered or another key
    signed it.
    """
    if commitment is None and signature is None:
        raise ValueError("verify_key needs a commitment or a signature")
    if signature is not None and public_key is None:
        raise ValueError("verify_key needs the public key to check a signature")
    actual = key_commitment(key)

    if commitment is not None and commitment != actual:
        return Verification(TAMPERED, actual, commitment,
                            f"{source} is tampered: its commitment is now {actual}, the published commitment is "
                            f"{commitment}")
    if signature is None:
        return Verification(VALID, actual, commitment, f"{source} matches the published commitment {commitment}")

    try:
        public_key.verify(signature.signature, signed_message(signature.commitment))
    except InvalidSignature:
        fingerprint = public_key_fingerprint(public_key)
        return Verification(BAD_SIGNATURE, actual, signature.commitment,
                            f"The signature does not verify with the public key {fingerprint[:16]}...: the "
                            "signature file was altered or another private key made it")
    if signature.commitment != actual:
        return Verification(TAMPERED, actual, signature.commitment,
                            f"{source} is tampered: its commitment is now {actual}, the signed commitment is "
                            f"{signature.commitment}")
    return Verification(VALID, actual, signature.commitment,
                        f"{source} matches the commitment {actual}, signed by the public key "
                        f"{public_key_fingerprint(public_key)[:16]}...")
