import errno
import os
import stat

import pytest

from onnxmark.errors import OnnxmarkError
from onnxmark.files import OutputTransaction, check_writable, write_bytes_atomic, write_text_atomic

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX permissions")


def file_mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def restrictive_umask():
    """Set umask 0o077 for the test, so that a written 0o644 proves the umask was not applied."""
    previous = os.umask(0o077)
    yield
    os.umask(previous)


def test_write_bytes_atomic_creates_file(tmp_path):
    target = tmp_path / "model.wm.onnx"

    write_bytes_atomic(target, b"\x00\x01weights", force=False)

    assert target.read_bytes() == b"\x00\x01weights"
    assert sorted(os.listdir(tmp_path)) == ["model.wm.onnx"]


def test_write_bytes_atomic_creates_parent_folders(tmp_path):
    target = tmp_path / "out" / "evidence" / "sheet.png"

    write_bytes_atomic(target, b"png", force=False)

    assert target.read_bytes() == b"png"


def test_write_bytes_atomic_no_overwrite_without_force(tmp_path):
    target = tmp_path / "key.json"
    target.write_text("old key")

    with pytest.raises(OnnxmarkError, match="already exists; pass --force to overwrite it") as caught:
        write_bytes_atomic(target, b"new key", force=False)

    assert str(target) in str(caught.value)
    assert target.read_text() == "old key"
    assert sorted(os.listdir(tmp_path)) == ["key.json"]


def test_write_bytes_atomic_overwrites_with_force(tmp_path):
    target = tmp_path / "key.json"
    target.write_text("old key")

    write_bytes_atomic(target, b"new key", force=True)

    assert target.read_text() == "new key"
    assert sorted(os.listdir(tmp_path)) == ["key.json"]


@posix_only
def test_write_bytes_atomic_private_mode(tmp_path):
    target = tmp_path / "key.json"

    write_bytes_atomic(target, b"{}", force=False, private=True)

    assert file_mode(target) == 0o600


@posix_only
def test_write_bytes_atomic_public_mode_ignores_umask(tmp_path, restrictive_umask):
    target = tmp_path / "model.wm.onnx"

    write_bytes_atomic(target, b"model", force=False)

    assert file_mode(target) == 0o644


@posix_only
def test_write_bytes_atomic_force_resets_mode(tmp_path):
    target = tmp_path / "key.json"
    target.write_text("old key")
    os.chmod(target, 0o666)

    write_bytes_atomic(target, b"new key", force=True, private=True)

    assert file_mode(target) == 0o600


def test_write_text_atomic_encodes_utf8(tmp_path):
    target = tmp_path / "licence.txt"

    write_text_atomic(target, "Lizenz für Ωmega", force=False)

    assert target.read_bytes() == "Lizenz für Ωmega".encode("utf-8")


def test_write_bytes_atomic_parent_is_file(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")

    with pytest.raises(OnnxmarkError, match="is an existing file, not a folder"):
        write_bytes_atomic(blocker / "key.json", b"{}", force=True)

    assert blocker.read_text() == "not a folder"


def test_write_bytes_atomic_without_hard_links(tmp_path, monkeypatch):
    def link_unsupported(source, destination):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link_unsupported)
    target = tmp_path / "key.json"
    existing = tmp_path / "existing.json"
    existing.write_text("old")

    write_bytes_atomic(target, b"new", force=False)
    with pytest.raises(OnnxmarkError, match="already exists"):
        write_bytes_atomic(existing, b"new", force=False)

    assert target.read_bytes() == b"new"
    assert existing.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["existing.json", "key.json"]


def test_check_writable_existing_file(tmp_path):
    target = tmp_path / "model.wm.onnx"
    target.write_bytes(b"model")

    with pytest.raises(OnnxmarkError, match="--force"):
        check_writable(target, force=False)
    check_writable(target, force=True)


def test_check_writable_creates_nothing(tmp_path):
    target = tmp_path / "out" / "evidence" / "sheet.png"

    check_writable(target, force=False)

    assert os.listdir(tmp_path) == []


def test_check_writable_rejects_folder_target(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()

    with pytest.raises(OnnxmarkError, match="is a folder"):
        check_writable(folder, force=True)


def test_check_writable_rejects_file_as_parent(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")

    with pytest.raises(OnnxmarkError, match="is an existing file, not a folder"):
        check_writable(blocker / "evidence" / "sheet.png", force=False)


def test_check_writable_dangling_symlink(tmp_path):
    target = tmp_path / "key.json"
    target.symlink_to(tmp_path / "missing.json")

    with pytest.raises(OnnxmarkError, match="already exists"):
        check_writable(target, force=False)


@posix_only
def test_transaction_creates_all_targets(tmp_path, restrictive_umask):
    model = tmp_path / "out" / "model.wm.onnx"
    key = tmp_path / "out" / "key.json"
    sheet = tmp_path / "out" / "evidence" / "sheet.png"

    with OutputTransaction(force=False) as outputs:
        outputs.check(model)
        outputs.check(key)
        outputs.write_bytes(key, b"{}", private=True)
        outputs.write_text(sheet, "image")
        model_temp = outputs.temp_path(model)
        model_temp.write_bytes(b"weights")

        assert not model.exists()
        assert not key.exists()
        assert model_temp.parent == model.parent
        assert model_temp.name.startswith(".model.wm.onnx")

    assert model.read_bytes() == b"weights"
    assert key.read_bytes() == b"{}"
    assert sheet.read_text() == "image"
    assert file_mode(key) == 0o600
    assert file_mode(model) == 0o644
    assert file_mode(sheet) == 0o644
    assert sorted(os.listdir(tmp_path / "out")) == ["evidence", "key.json", "model.wm.onnx"]
    assert os.listdir(tmp_path / "out" / "evidence") == ["sheet.png"]


def test_transaction_exception_leaves_nothing(tmp_path):
    existing = tmp_path / "model.wm.onnx"
    existing.write_bytes(b"old weights")

    with pytest.raises(RuntimeError, match="training failed"):
        with OutputTransaction(force=True) as outputs:
            outputs.write_bytes(existing, b"new weights")
            outputs.write_text(tmp_path / "key.json", "{}", private=True)
            outputs.temp_path(tmp_path / "out" / "evidence" / "sheet.png").write_bytes(b"png")
            raise RuntimeError("training failed")

    assert existing.read_bytes() == b"old weights"
    assert sorted(os.listdir(tmp_path)) == ["model.wm.onnx"]


def test_transaction_check_fails_before_work(tmp_path):
    existing = tmp_path / "key.json"
    existing.write_text("old key")
    work_done = []

    with pytest.raises(OnnxmarkError, match="already exists"):
        with OutputTransaction(force=False) as outputs:
            outputs.check(tmp_path / "model.wm.onnx")
            outputs.check(existing)
            work_done.append("trained")

    assert work_done == []
    assert existing.read_text() == "old key"
    assert sorted(os.listdir(tmp_path)) == ["key.json"]


def test_transaction_target_appearing_during_work(tmp_path):
    model = tmp_path / "model.wm.onnx"
    key = tmp_path / "key.json"

    with pytest.raises(OnnxmarkError, match="key.json already exists"):
        with OutputTransaction(force=False) as outputs:
            outputs.check(model)
            outputs.check(key)
            outputs.write_bytes(model, b"new weights")
            outputs.write_bytes(key, b"new key")
            key.write_text("key written by another process")

    assert key.read_text() == "key written by another process"
    assert not model.exists()
    assert sorted(os.listdir(tmp_path)) == ["key.json"]


def test_transaction_force_failure_midway(tmp_path, monkeypatch):
    first = tmp_path / "a.json"
    second = tmp_path / "b.json"
    first.write_text("old a")
    second.write_text("old b")
    real_replace = os.replace
    calls = []

    def replace_failing_second_time(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_failing_second_time)

    with pytest.raises(OnnxmarkError, match="No space left on device"):
        with OutputTransaction(force=True) as outputs:
            outputs.write_text(first, "new a")
            outputs.write_text(second, "new b")

    assert first.read_text() == "new a"
    assert second.read_text() == "old b"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json"]


def test_transaction_rejects_duplicate_output(tmp_path):
    target = tmp_path / "key.json"

    with pytest.raises(ValueError, match="already an output"):
        with OutputTransaction(force=False) as outputs:
            outputs.write_text(target, "first")
            outputs.write_text(target, "second")

    assert os.listdir(tmp_path) == []


def test_transaction_cannot_be_reused(tmp_path):
    outputs = OutputTransaction(force=False)
    with outputs:
        outputs.write_text(tmp_path / "a.txt", "a")

    with pytest.raises(RuntimeError, match="already finished"):
        outputs.write_text(tmp_path / "b.txt", "b")
    with pytest.raises(RuntimeError, match="already finished"):
        with outputs:
            pass

    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_identical_existing_file_needs_no_force(tmp_path):
    target = tmp_path / "scores.json"
    target.write_bytes(b"same")
    before = target.stat().st_mtime_ns

    with OutputTransaction(force=False) as transaction:
        transaction.write_bytes(target, b"same")

    assert target.read_bytes() == b"same"
    assert target.stat().st_mtime_ns == before


def test_different_existing_file_still_needs_force(tmp_path):
    target = tmp_path / "scores.json"
    target.write_bytes(b"old")

    with pytest.raises(OnnxmarkError):
        with OutputTransaction(force=False) as transaction:
            transaction.write_bytes(target, b"new")

    assert target.read_bytes() == b"old"
