"""Photo decoding and the on-disk decoded-image cache.

`decode_image` is the one way a photo becomes pixels (RGB uint8, resized to the load size), used
by the cache, by direct decoding and by inference alike.

`ImageCache` keeps every photo decoded once, at one load size, in a raw uint8 file
(`pixels.u8`, shape rows x H x W x 3, readable as a numpy memmap) with an index keyed by the
source path and its mtime and size: a photo that changed on disk is decoded again, a new one is
appended. Reads go straight to the file (os.pread), so memory does not grow with the data set, and
DataLoader workers share the file through the OS page cache. Later epochs, runs and Optuna
trials never decode JPEG again.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from mtl.data import Problem

DEFAULT_CACHE_DIR = Path(os.environ.get("MTL_CACHE_DIR", Path.home() / ".cache" / "mtl"))
CACHE_FORMAT = 1


def decode_image(path, size=None) -> np.ndarray:
    """Decode a photo fully (truncated files raise OSError) to RGB uint8 HxWx3, resized to size=(W, H)."""
    with Image.open(path) as im:
        if size is not None and im.format == "JPEG":
            im.draft("RGB", tuple(size))  # NOTE: JPEG decodes at 1/2, 1/4, 1/8 scale when that is still >= size
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        pixels = np.asarray(im)
    return fit_size(pixels, size)


def fit_size(pixels: np.ndarray, size=None) -> np.ndarray:
    """RGB uint8 HxWx3 pixels resized to size=(W, H) (area when shrinking, linear when enlarging), contiguous."""
    if size is not None and (pixels.shape[1], pixels.shape[0]) != tuple(size):
        shrink = pixels.shape[1] > size[0] or pixels.shape[0] > size[1]
        pixels = cv2.resize(pixels, tuple(int(s) for s in size),
                            interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(pixels)


def image_error(path) -> str | None:
    """Why a photo cannot be decoded, or None if it decodes."""
    try:
        decode_image(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad photo
        return describe_decode_error(exc)
    return None


def describe_decode_error(exc) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"unreadable image ({text})"


class DirectImages:
    """Decode each photo from its file at every access (no cache): the baseline the cache is measured against."""

    def __init__(self, paths, size):
        self.paths, self.size = list(paths), tuple(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i) -> np.ndarray:
        return decode_image(self.paths[i], self.size)

    def take(self, indices) -> "DirectImages":
        """The images at these positions, as a new source."""
        return DirectImages([self.paths[i] for i in indices], self.size)


class CachedImages:
    """Photos read from an ImageCache file, one row each; picklable, so DataLoader workers can use it."""

    def __init__(self, pixels_file, size, rows):
        self.pixels_file, self.size = str(pixels_file), tuple(size)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._fd = None
        self._pid = None

    def __len__(self):
        return len(self.rows)

    def take(self, indices) -> "CachedImages":
        """The images at these positions, as a new source."""
        return CachedImages(self.pixels_file, self.size, self.rows[np.asarray(indices, dtype=np.int64)])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state

    def __getitem__(self, i) -> np.ndarray:
        if self._fd is None or self._pid != os.getpid():  # NOTE: a forked worker must open its own descriptor
            self._fd, self._pid = os.open(self.pixels_file, os.O_RDONLY), os.getpid()
        w, h = self.size
        photo = np.empty((h, w, 3), dtype=np.uint8)
        if os.preadv(self._fd, [photo], int(self.rows[i]) * photo.nbytes) != photo.nbytes:
            raise OSError(f"{self.pixels_file}: short read at row {self.rows[i]} (cache file truncated?)")
        return photo

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)


_WORKER_MAPS = {}


def _decode_into(job):
    """Worker: decode one photo into its row of the pixels file; return an error text or None."""
    pixels_file, rows_total, size, row, path = job
    key = (pixels_file, rows_total)
    if key not in _WORKER_MAPS:
        _WORKER_MAPS.clear()
        _WORKER_MAPS[key] = np.memmap(pixels_file, dtype=np.uint8, mode="r+", shape=(rows_total, size[1], size[0], 3))
    try:
        _WORKER_MAPS[key][row] = decode_image(path, size)
    except Exception as exc:  # noqa: BLE001
        return describe_decode_error(exc)
    return None


def _file_key(path):
    stat = os.stat(path)
    return [stat.st_mtime_ns, stat.st_size]


class ImageCache:
    """Every photo decoded once at one load size, kept in `<cache_dir>/<W>x<H>/pixels.u8` + `index.json`."""

    def __init__(self, cache_dir=None, size=(192, 256)):
        self.size = (int(size[0]), int(size[1]))
        self.dir = Path(cache_dir or DEFAULT_CACHE_DIR) / f"{self.size[0]}x{self.size[1]}"
        self.pixels_file = self.dir / "pixels.u8"
        self.index_file = self.dir / "index.json"

    @contextlib.contextmanager
    def _locked(self):
        """Hold an exclusive lock so parallel runs (tuning workers) never build the same cache at once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_index(self):
        if self.index_file.is_file() and self.pixels_file.is_file():
            with contextlib.suppress(ValueError, KeyError):
                index = json.loads(self.index_file.read_text())
                if index["format"] == CACHE_FORMAT and index["size"] == list(self.size):
                    return index
        return {"format": CACHE_FORMAT, "size": list(self.size), "rows": 0, "entries": {}}

    def _write_index(self, index):
        from mtl.io import atomic_write_text
        atomic_write_text(json.dumps(index), self.index_file)

    def ensure(self, paths, workers=2, progress=True):
        """Decode every photo that is missing or stale; return (CachedImages for `paths`, [Problem])."""
        paths = [str(Path(p).resolve()) for p in paths]
        with self._locked():
            index = self._read_index()
            entries, rows_total = index["entries"], index["rows"]
            todo, problems = [], []
            for path in dict.fromkeys(paths):
                try:
                    key = _file_key(path)
                except OSError as exc:
                    problems.append(Problem(path, f"cannot be read ({exc.strerror})"))
                    entries.pop(path, None)
                    continue
                entry = entries.get(path)
                if entry is None:
                    entry = entries[path] = [rows_total, None, None]
                    rows_total += 1
                if entry[1:] != key:
                    todo.append((path, key))
            if todo:
                self._grow(rows_total)
                jobs = [(str(self.pixels_file), rows_total, self.size, entries[p][0], p) for p, _ in todo]
                errors = self._run(jobs, workers, progress)
                for (path, key), error in zip(todo, errors):
                    if error is None:
                        entries[path][1:] = key
                    else:
                        entries[path][1:] = [None, None]
                        problems.append(Problem(path, error))
                index["rows"] = rows_total
                self._write_index(index)
        bad = {p.path for p in problems}
        rows = [entries[p][0] if p not in bad else -1 for p in paths]
        return CachedImages(self.pixels_file, self.size, rows), problems

    def _grow(self, rows_total):
        w, h = self.size
        with open(self.pixels_file, "ab") as f:
            f.truncate(max(os.path.getsize(self.pixels_file), rows_total * h * w * 3))

    def _run(self, jobs, workers, progress):
        bar = tqdm(total=len(jobs), desc=f"caching photos at {self.size[0]}x{self.size[1]}", unit="img",
                   disable=not progress, dynamic_ncols=True)
        errors = []
        with bar:
            if workers <= 1 or len(jobs) < 64:
                for job in jobs:
                    errors.append(_decode_into(job))
                    bar.update()
            else:
                with ProcessPoolExecutor(workers) as pool:
                    for error in pool.map(_decode_into, jobs, chunksize=32):
                        errors.append(error)
                        bar.update()
        _WORKER_MAPS.clear()
        return errors


def check_images(paths, workers=2, progress=True, desc="checking photos"):
    """Decode every photo once (no cache) and return a Problem for each one that fails."""
    paths = list(paths)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers <= 1 or len(paths) < 64:
            errors = []
            for p in paths:
                errors.append(image_error(p))
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                errors = []
                for e in pool.map(image_error, paths, chunksize=32):
                    errors.append(e)
                    bar.update()
    return [Problem(p, e) for p, e in zip(paths, errors) if e is not None]


def open_images(paths, size, cache_dir=None, use_cache=True, workers=2, progress=True):
    """Photos at `size` for these paths -> (image source, [Problem]); every photo is checked to decode."""
    if use_cache:
        return ImageCache(cache_dir, size).ensure(paths, workers=workers, progress=progress)
    problems = check_images(paths, workers=workers, progress=progress)
    return DirectImages(paths, size), problems
