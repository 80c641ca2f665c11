"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A kill at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from mtl.errors import MTLError


def check_parent(path) -> Path:
    """Return the path, or raise a one-line error if its folder does not exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MTLError(f"cannot write {path}: folder {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it is renamed to `path`, on error removed."""
    path = check_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
        torch.save(obj, tmp)
    return Path(path)
