"""Key commitments and Ed25519 signatures: `onnxmark key commit`, `keygen`, `sign` and `verify`."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from PIL import Image

from onnxmark.commitment import key_commitment
from onnxmark.keyfile import load_key
from tests.conftest import FIXTURE_MODEL, ROOT
from tests.test_cli import last_json, onnxmark

PASSPHRASE_ENV = "ONNXMARK_KEY_PASSPHRASE"


@pytest.fixture(scope="module")
def key_path(tmp_path_factory):
    """A key from a quick embed of the fixture CNN: 2 keys, short hardening, no training epochs."""
    folder = tmp_path_factory.mktemp("embed")
    result = onnxmark("embed", FIXTURE_MODEL, "--seed", 0, "--data", "mnist-sample", "-o", folder, "--keys", 2,
                      "--max-hardening-steps", 20, "--epochs", 0, "--json")
    return Path(last_json(result)["key"])


@pytest.fixture()
def key_copy(key_path, tmp_path):
    copy = tmp_path / "key.json"
    copy.write_text(key_path.read_text())
    return copy


@pytest.fixture(scope="module")
def signing_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signing")
    onnxmark("key", "keygen", folder / "owner.pem")
    return folder / "owner.pem", folder / "owner.pub.pem"


def commit(path) -> str:
    return onnxmark("key", "commit", path).stdout.strip()


def run_with_env(env: dict, *args):
    """Run onnxmark with extra environment variables and no terminal on stdin."""
    return subprocess.run([sys.executable, "-m", "onnxmark", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def rewrite(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document, indent=1))


def reencode_png(text: str, compress_level: int) -> str:
    picture = Image.open(io.BytesIO(base64.b64decode(text)))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=compress_level)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def with_pixel_changed(text: str) -> str:
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(text)))).copy()
    pixels.flat[0] = 255 - pixels.flat[0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def npy_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# The commitment.

def test_commit_prints_hex_and_json(key_path):
    plain = commit(key_path)
    result = last_json(onnxmark("key", "commit", key_path, "--json"))

    assert len(plain) == 64
    assert int(plain, 16) >= 0
    assert result["commitment"] == plain
    assert result["scheme"] == "onnxmark-key-commitment-v1"
    assert result["commitment"] == key_commitment(load_key(key_path))


def test_commit_ignores_json_layout(key_path, key_copy):
    document = json.loads(key_path.read_text())
    reordered = dict(reversed(list(document.items())))
    key_copy.write_text(json.dumps(reordered, separators=(",", ":")))

    assert key_copy.read_bytes() != key_path.read_bytes()
    assert commit(key_copy) == commit(key_path)


def test_commit_ignores_png_compression(key_path, key_copy):
    rewrite(key_copy, lambda d: d.update(secrets=[reencode_png(s, 0) for s in d["secrets"]]))

    assert json.loads(key_copy.read_text())["secrets"] != json.loads(key_path.read_text())["secrets"]
    assert commit(key_copy) == commit(key_path)


def _shift_key_value(document):
    document["keys"][0][0] = float(np.nextafter(np.float32(document["keys"][0][0]), np.float32(100)))


def _change_signature_shape(document):
    document["signature"][0]["weight_shapes"][0][0] += 1


FIELD_CHANGES = {
    "key vector by one float32 step": _shift_key_value,
    "secret pixel": lambda d: d["secrets"].__setitem__(0, with_pixel_changed(d["secrets"][0])),
    "secrets swapped": lambda d: d.update(secrets=d["secrets"][::-1]),
    "preprocessing range": lambda d: d["preprocessing"].update(high=2.0),
    "input layout": lambda d: d["input"].update(layout="NF"),
    "signature shape": _change_signature_shape,
    "frozen tensor added": lambda d: d["frozen"].update(extra=npy_base64(np.zeros((4,), np.float32))),
    "model hash": lambda d: d.update(model_sha256="0" * 64),
    "creation time": lambda d: d.update(created="2000-01-01T00:00:00+00:00"),
}


@pytest.mark.parametrize("change", FIELD_CHANGES.values(), ids=FIELD_CHANGES.keys())
def test_commitment_covers_field(key_path, key_copy, change):
    rewrite(key_copy, change)
    assert commit(key_copy) != commit(key_path)


def test_commitment_covers_frozen_order(key_path, tmp_path):
    """Extraction matches frozen tensors to branches by order, so swapping two changes the commitment."""
    key = load_key(key_path)
    first, second = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    key.frozen = {"a": first, "b": second}
    (tmp_path / "ab.json").write_text(key.to_json())
    key.frozen = {"b": second, "a": first}
    (tmp_path / "ba.json").write_text(key.to_json())
    key.frozen = {"a": first, "b": second.astype(np.float64)}
    (tmp_path / "float64.json").write_text(key.to_json())

    assert commit(tmp_path / "ab.json") != commit(tmp_path / "ba.json")
    assert commit(tmp_path / "ab.json") != commit(tmp_path / "float64.json")


def test_commitment_covers_key_range(key_path, tmp_path):
    """The key range sets the calibration's random keys; the default range leaves older commitments as they were."""
    key = load_key(key_path)
    document = json.loads(key_path.read_text())
    del document["key_range"]
    (tmp_path / "without.json").write_text(json.dumps(document))
    key.key_range = 1.0
    (tmp_path / "narrow.json").write_text(key.to_json())

    assert commit(tmp_path / "without.json") == commit(key_path)
    assert commit(tmp_path / "narrow.json") != commit(key_path)


def test_commit_missing_key_file(tmp_path):
    result = onnxmark("key", "commit", tmp_path / "absent.json", check=False)

    assert result.returncode == 2
    assert "Key file not found" in result.stderr


def test_commit_invalid_key_file(tmp_path):
    bad = tmp_path / "key.json"
    bad.write_text("{\"format\": \"onnxmark-key\", \"version\": 1")

    result = onnxmark("key", "commit", bad, check=False)

    assert result.returncode == 2
    assert "not a valid key file" in result.stderr


# Key pairs, signing and verification.

def test_keygen_writes_ed25519_pem_pair(signing_pair):
    private_path, public_path = signing_pair

    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    public_key = serialization.load_pem_public_key(public_path.read_bytes())
    assert type(public_key).__name__ == "Ed25519PublicKey"


def test_keygen_does_not_overwrite(signing_pair):
    private_path, _ = signing_pair
    before = private_path.read_bytes()

    result = onnxmark("key", "keygen", private_path, check=False)

    assert result.returncode == 2
    assert "--force" in result.stderr
    assert private_path.read_bytes() == before


def test_sign_then_verify(key_copy, signing_pair):
    private_path, public_path = signing_pair

    signed = last_json(onnxmark("key", "sign", key_copy, "--private-key", private_path, "--json"))
    verified = onnxmark("key", "verify", key_copy, "--public-key", public_path, "--json")

    assert Path(signed["signature"]) == key_copy.with_name("key.json.sig")
    assert signed["commitment"] == commit(key_copy)
    assert last_json(verified)["status"] == "valid"
    assert verified.returncode == 0


def test_verify_reports_tampered_key(key_copy, signing_pair):
    private_path, public_path = signing_pair
    onnxmark("key", "sign", key_copy, "--private-key", private_path)
    rewrite(key_copy, _shift_key_value)

    result = onnxmark("key", "verify", key_copy, "--public-key", public_path, check=False)

    assert result.returncode == 1
    assert result.stdout.startswith("tampered:")
    assert commit(key_copy) in result.stdout


def test_verify_rejects_other_signer(key_copy, signing_pair, tmp_path):
    private_path, _ = signing_pair
    onnxmark("key", "keygen", tmp_path / "other.pem")
    onnxmark("key", "sign", key_copy, "--private-key", private_path)

    result = onnxmark("key", "verify", key_copy, "--public-key", tmp_path / "other.pub.pem", check=False)

    assert result.returncode == 1
    assert result.stdout.startswith("bad-signature:")


def test_verify_rejects_repointed_signature(key_copy, signing_pair):
    """Editing the signed commitment to match a tampered key breaks the signature."""
    private_path, public_path = signing_pair
    onnxmark("key", "sign", key_copy, "--private-key", private_path)
    rewrite(key_copy, _shift_key_value)
    signature_path = key_copy.with_name("key.json.sig")
    rewrite(signature_path, lambda d: d.update(commitment=commit(key_copy)))

    result = onnxmark("key", "verify", key_copy, "--public-key", public_path, check=False)

    assert result.returncode == 1
    assert result.stdout.startswith("bad-signature:")


def test_verify_against_published_commitment(key_path, key_copy):
    published = commit(key_path)
    valid = onnxmark("key", "verify", key_copy, "--commitment", published.upper())
    rewrite(key_copy, lambda d: d["preprocessing"].update(low=-1.0))
    tampered = onnxmark("key", "verify", key_copy, "--commitment", published, "--json", check=False)

    assert valid.stdout.startswith("valid:")
    assert tampered.returncode == 1
    assert last_json(tampered)["status"] == "tampered"
    assert last_json(tampered)["expected"] == published


def test_sign_does_not_overwrite_signature(key_copy, signing_pair):
    private_path, _ = signing_pair
    signature_path = key_copy.with_name("key.json.sig")
    signature_path.write_text("an older signature\n")

    again = onnxmark("key", "sign", key_copy, "--private-key", private_path, check=False)
    content_after_rejection = signature_path.read_text()
    forced = onnxmark("key", "sign", key_copy, "--private-key", private_path, "-o", signature_path, "--force")

    assert again.returncode == 2
    assert "--force" in again.stderr
    assert content_after_rejection == "an older signature\n"
    assert forced.returncode == 0
    assert json.loads(signature_path.read_text())["commitment"] == commit(key_copy)


def test_encrypted_private_key(key_copy, tmp_path):
    passphrase = {PASSPHRASE_ENV: "correct horse"}
    created = run_with_env(passphrase, "key", "keygen", tmp_path / "locked.pem", "--encrypt", "--json")
    without = run_with_env({PASSPHRASE_ENV: ""}, "key", "sign", key_copy, "--private-key", tmp_path / "locked.pem")
    wrong = run_with_env({PASSPHRASE_ENV: "wrong"}, "key", "sign", key_copy, "--private-key", tmp_path / "locked.pem")
    right = run_with_env(passphrase, "key", "sign", key_copy, "--private-key", tmp_path / "locked.pem")
    verified = onnxmark("key", "verify", key_copy, "--public-key", tmp_path / "locked.pub.pem")

    assert created.returncode == 0, created.stderr
    assert last_json(created)["encrypted"] is True
    assert (tmp_path / "locked.pem").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert without.returncode == 2
    assert PASSPHRASE_ENV in without.stderr
    assert wrong.returncode == 2
    assert "passphrase is wrong" in wrong.stderr
    assert right.returncode == 0, right.stderr
    assert verified.stdout.startswith("valid:")


def test_openssl_key_pair(key_copy, tmp_path):
    """A key pair made by `openssl genpkey -algorithm ed25519` signs and verifies."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    private_path, public_path = tmp_path / "openssl.pem", tmp_path / "openssl.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", private_path], check=True)
    subprocess.run(["openssl", "pkey", "-in", private_path, "-pubout", "-out", public_path], check=True)

    onnxmark("key", "sign", key_copy, "--private-key", private_path)
    result = onnxmark("key", "verify", key_copy, "--public-key", public_path)

    assert result.stdout.startswith("valid:")


BAD_PEMS = {
    "corrupt": (b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n",
                "not a valid PEM private key"),
    "empty": (b"", "not a valid PEM private key"),
}


@pytest.mark.parametrize("content, message", BAD_PEMS.values(), ids=BAD_PEMS.keys())
def test_sign_with_corrupt_private_key(key_copy, tmp_path, content, message):
    pem = tmp_path / "bad.pem"
    pem.write_bytes(content)

    result = onnxmark("key", "sign", key_copy, "--private-key", pem, check=False)

    assert result.returncode == 2
    assert message in result.stderr
    assert str(pem) in result.stderr
    assert not key_copy.with_name("key.json.sig").exists()


def test_sign_with_rsa_key(key_copy, tmp_path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))

    result = onnxmark("key", "sign", key_copy, "--private-key", pem, check=False)

    assert result.returncode == 2
    assert "not an Ed25519 key" in result.stderr


def test_verify_with_private_key_as_public(key_copy, signing_pair):
    private_path, _ = signing_pair
    onnxmark("key", "sign", key_copy, "--private-key", private_path)

    result = onnxmark("key", "verify", key_copy, "--public-key", private_path, check=False)

    assert result.returncode == 2
    assert "give the .pub.pem file" in result.stderr


@pytest.mark.parametrize("case", ["missing", "not json", "bad base64", "short signature", "other format"])
def test_verify_with_bad_signature_file(key_copy, signing_pair, case):
    private_path, public_path = signing_pair
    onnxmark("key", "sign", key_copy, "--private-key", private_path)
    signature_path = key_copy.with_name("key.json.sig")
    if case == "missing":
        signature_path.unlink()
    elif case == "not json":
        signature_path.write_text("signed by me\n")
    elif case == "bad base64":
        rewrite(signature_path, lambda d: d.update(signature="@@@"))
    elif case == "short signature":
        rewrite(signature_path, lambda d: d.update(signature=base64.b64encode(b"x" * 10).decode()))
    else:
        rewrite(signature_path, lambda d: d.update(format="something-else"))

    result = onnxmark("key", "verify", key_copy, "--public-key", public_path, check=False)

    assert result.returncode == 2
    assert str(signature_path) in result.stderr


@pytest.mark.parametrize("args, message", [
    ([], "--public-key"),
    (["--signature", "key.json.sig"], "--signature needs --public-key"),
    (["--commitment", "abc"], "64 hex digits"),
])
def test_verify_usage_errors(key_copy, args, message):
    result = onnxmark("key", "verify", key_copy, *args, check=False)

    assert result.returncode == 2
    assert message in result.stderr


def test_verify_missing_key_file(signing_pair, tmp_path):
    _, public_path = signing_pair

    result = onnxmark("key", "verify", tmp_path / "absent.json", "--public-key", public_path, check=False)

    assert result.returncode == 2
    assert "Key file not found" in result.stderr
