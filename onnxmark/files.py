"""Output files that appear complete or not at all, and replace existing files only with --force.

Every output is written to a temporary file in the target's folder and moved into place
when it is complete, so a crash or an error leaves either the old file or the new one,
never a half-written file. Without --force the move uses a hard link, which fails if the
target exists, so a file that appears while the work runs is not overwritten either.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Union

from onnxmark.errors import OnnxmarkError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike[str]]

PUBLIC_MODE = 0o644
PRIVATE_MODE = 0o600  # owner read and write only, for keys
TEMP_SUFFIX = ".tmp"

# os.link raises these where the filesystem has no hard links (FAT, some network and FUSE mounts).
_NO_HARD_LINK_ERRNOS = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}
)


def check_writable(path: PathLike, force: bool) -> None:
    """Raise OnnxmarkError unless an output can be written to `path`.

    The target must not exist unless `force` is set, and it must never be a folder. Its
    parent folder must exist and be writable, or be creatable inside the nearest existing
    ancestor. This check creates nothing.
    """
    path = Path(path)

    if path.is_dir():
        raise OnnxmarkError(f"{path} is a folder. Give a file name for the output.")
    if os.path.lexists(path) and not force:
        raise OnnxmarkError(f"{path} already exists; pass --force to overwrite it")

    _check_folder_writable(path.parent)


def write_bytes_atomic(path: PathLike, data: bytes, force: bool, private: bool = False) -> None:
    """Write `data` to `path` through a temporary file in the same folder, creating parent folders.

    The file gets mode 0o600 when `private` is set and 0o644 otherwise, whatever the umask.
    Raises OnnxmarkError if the target exists and `force` is not set, or if writing fails.
    """
    with OutputTransaction(force=force) as outputs:
        outputs.write_bytes(path, data, private=private)


def write_text_atomic(path: PathLike, text: str, force: bool, private: bool = False) -> None:
    """Write `text` as UTF-8 to `path` like `write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"), force, private=private)


@dataclass
class _PendingOutput:
    target: Path
    temp: Path
    mode: int
    written_by_caller: bool


class OutputTransaction:
    """Collects several outputs and moves them into place only when the block succeeds.

    Each output goes to a temporary file next to its target. When the `with` block ends
    normally, every temporary file gets its mode, is synced to disk and moved onto its
    target. When the block raises, the temporary files and any folders the transaction
    created are removed, and no target is created or changed.

    Without `force`, the move is all or nothing: if any target exists by then, the targets
    already moved are removed again and OnnxmarkError is raised. With `force`, each target
    is replaced atomically, but a failure halfway through the moves leaves the targets
    replaced so far in their new state.
    """

    def __init__(self, force: bool) -> None:
        self.force = force
        self._pending: dict[Path, _PendingOutput] = {}
        self._created_folders: list[Path] = []
        self._finished = False

    def __enter__(self) -> OutputTransaction:
        self._raise_if_finished()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._commit()
        else:
            self._roll_back()

    def check(self, path: PathLike) -> None:
        """Raise OnnxmarkError now if `path` cannot be written, before any long work starts."""
        check_writable(path, self.force)

    def write_bytes(self, path: PathLike, data: bytes, private: bool = False) -> None:
        """Write `data` to a temporary file that replaces `path` on commit.

        A file that already contains exactly `data` is left as it is, even without `force`, because
        writing it would change nothing: rerunning an extraction into the same folder succeeds.
        """
        if _holds_exactly(Path(path), data):
            return
        output = self._add_output(path, private, written_by_caller=False)

        try:
            with open(output.temp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            raise OnnxmarkError(f"Failed to write {output.target}: {error}") from error

    def write_text(self, path: PathLike, text: str, private: bool = False) -> None:
        """Write `text` as UTF-8 to a temporary file that replaces `path` on commit."""
        self.write_bytes(path, text.encode("utf-8"), private=private)

    def temp_path(self, path: PathLike, private: bool = False) -> Path:
        """Create an empty temporary file next to `path` for the caller to write, and return its path.

        Write it in place, for example with `onnx.save`, and do not rename it. On commit it
        gets its mode, is synced and moves onto `path`. On failure it is removed.
        """
        return self._add_output(path, private, written_by_caller=True).temp

    def _add_output(self, path: PathLike, private: bool, written_by_caller: bool) -> _PendingOutput:
        self._raise_if_finished()
        target = Path(path).absolute()
        if target in self._pending:
            raise ValueError(f"{target} is already an output of this transaction")

        check_writable(target, self.force)
        self._created_folders.extend(_make_folders(target.parent))

        try:
            handle, temp_name = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent
            )
        except OSError as error:
            message = f"Failed to create a temporary file next to {target}: {error}"
            raise OnnxmarkError(message) from error
        os.close(handle)

        mode = PRIVATE_MODE if private else PUBLIC_MODE
        output = _PendingOutput(target, Path(temp_name), mode, written_by_caller)
        self._pending[target] = output
        return output

    def _commit(self) -> None:
        self._raise_if_finished()
        try:
            for output in self._pending.values():
                _finish_temp_file(output)

            if self.force:
                for output in self._pending.values():
                    os.replace(output.temp, output.target)
            else:
                self._move_all_without_overwrite()
        except OSError as error:
            self._roll_back()
            raise OnnxmarkError(f"Failed to move the outputs into place: {error}") from error
        except BaseException:
            self._roll_back()
            raise

        self._finished = True
        for folder in {output.target.parent for output in self._pending.values()}:
            _sync_folder(folder)

    def _move_all_without_overwrite(self) -> None:
        moved: list[tuple[_PendingOutput, os.stat_result]] = []
        try:
            for output in self._pending.values():
                temp_status = os.stat(output.temp)
                _move_without_overwrite(output.temp, output.target)
                moved.append((output, temp_status))
        except BaseException:
            for output, temp_status in moved:
                _remove_if_same_file(output.target, temp_status)
            raise

    def _roll_back(self) -> None:
        self._finished = True

        for output in self._pending.values():
            try:
                output.temp.unlink(missing_ok=True)
            except OSError as error:
                logger.warning("Failed to remove the temporary file %s: %s", output.temp, error)

        # Innermost first. A folder that something else has written into since stays.
        for folder in reversed(self._created_folders):
            try:
                folder.rmdir()
            except OSError as error:
                logger.debug("Left the folder %s in place: %s", folder, error)

    def _raise_if_finished(self) -> None:
        if self._finished:
            raise RuntimeError("This OutputTransaction has already finished; start a new one")


def _holds_exactly(path: Path, data: bytes) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size == len(data) \
            and path.read_bytes() == data
    except OSError:
        return False


def _check_folder_writable(folder: Path) -> None:
    existing = folder
    while not os.path.lexists(existing):
        existing = existing.parent

    if not existing.is_dir():
        raise OnnxmarkError(f"Cannot create the folder {folder} because {existing} is an existing file, not a "
                            "folder. Give a folder path for the output.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OnnxmarkError(
            f"Cannot write to the folder {existing} (permission denied). Choose another output folder."
        )


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents, and return the folders created, outermost first."""
    missing = []
    current = folder
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OnnxmarkError(f"Failed to create the folder {folder}: {error}") from error
    return list(reversed(missing))


def _finish_temp_file(output: _PendingOutput) -> None:
    if output.written_by_caller:
        with open(output.temp, "rb+") as file:
            os.fsync(file.fileno())
    os.chmod(output.temp, output.mode)


def _move_without_overwrite(temp: Path, target: Path) -> None:
    """Move `temp` onto `target`, raising OnnxmarkError if the target exists."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise OnnxmarkError(f"{target} already exists; pass --force to overwrite it") from None
    except OSError as error:
        if error.errno not in _NO_HARD_LINK_ERRNOS:
            raise

        # NOTE: without hard links, a file created at the target between this check and
        # os.replace is overwritten.
        if os.path.lexists(target):
            raise OnnxmarkError(f"{target} already exists; pass --force to overwrite it") from None
        os.replace(temp, target)
        return

    temp.unlink()


def _remove_if_same_file(path: Path, expected: os.stat_result) -> None:
    try:
        current = os.stat(path)
        if (current.st_dev, current.st_ino) == (expected.st_dev, expected.st_ino):
            path.unlink()
    except OSError as error:
        logger.warning("Failed to remove %s after a failed commit: %s", path, error)


def _sync_folder(folder: Path) -> None:
    """Sync a folder's entries to disk so that the renames survive a power loss (POSIX only)."""
    if os.name != "posix":
        return
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError as error:
        logger.debug("Failed to open the folder %s to sync it: %s", folder, error)
        return
    try:
        os.fsync(handle)
    except OSError as error:
        logger.debug("Failed to sync the folder %s: %s", folder, error)
    finally:
        os.close(handle)
