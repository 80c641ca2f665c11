"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A kill at any moment leaves either the old file or the new one, never half of one; the temporary
file (`.<name>.XXXXXXXX.tmp`) of a killed write is removed by `remove_stale_temps` when the next run
of that folder starts. Files get the permissions the user's umask gives (0666 & ~umask), like any
other file they create. A failed write (disk full, read-only, no permission) is a one-line
`WriteError` that says the target is unchanged.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from mtl.errors import ConfigError, MTLError

# NOTE: mkstemp names are prefix + 8 characters from [a-z0-9_] + suffix
STALE_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


class WriteError(MTLError, OSError):
    """An output could not be written; the message names the file and why (also an OSError for callers)."""

    def __init__(self, path, reason):
        super().__init__(f"cannot write {path} ({reason}); it is unchanged")
        self.path, self.reason = path, reason


def check_parent(path) -> Path:
    """Return the path, or raise a one-line error if its folder does not exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MTLError(f"cannot write {path}: folder {path.parent} does not exist")
    return path


def current_umask() -> int:
    """The process umask, read from /proc where possible (setting it to read it races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def os_error(exc: BaseException) -> OSError | None:
    """The OSError behind an exception: itself, or the one a C++ writer (torch.save) turned into a RuntimeError."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        if not isinstance(exc, RuntimeError):
            return None
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it is renamed to `path`, on error removed."""
    path = check_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # NOTE: mkstemp creates 0600, unreadable to the user's group
        finally:
            os.close(fd)
    except OSError as exc:
        raise WriteError(path, _why(exc)) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = None if isinstance(exc, MTLError) else os_error(exc)
        if cause is not None:
            raise WriteError(path, _why(cause)) from None
        raise


def atomic_write_text(text: str, path) -> Path:
    """Write text to path atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_csv(table, path, **kwargs) -> Path:
    """Write a pandas DataFrame as CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, **kwargs)
    return Path(path)


def atomic_torch_save(obj, path) -> Path:
    """torch.save atomically, so a kill never leaves a broken checkpoint."""
    import torch
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # NOTE: a file object, so a full disk surfaces as the OSError, not a C++ message
            torch.save(obj, f)
    return Path(path)


def atomic_copy(source, path) -> Path:
    """Copy a file atomically."""
    import shutil
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)


def check_writable(folder, flag="--out"):
    """Prove a file can be written in folder (one 4 KiB block, removed again), or raise a one-line ConfigError naming
    the flag: a read-only or already full disk, or a folder the user may not write, is found before any work."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)  # NOTE: one block: a disk that is already full fails here, not after compute
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{flag} {folder}: cannot write there ({_why(exc)})") from None


def prepare_folder(folder, flag="--out") -> bool:
    """Create an output folder (and its parents) and prove a file can be written there; True if it was created."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{flag} {folder} is a file, not a folder") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {folder}: cannot write there ({_why(exc)})") from None
    check_writable(folder, flag)
    return created


def remove_stale_temps(folder) -> list[Path]:
    """Remove the temporary files killed atomic writes left in folder (only `.<name>.XXXXXXXX.tmp`, not below it)."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            if STALE_TEMP.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed
