"""Photo decoding and the on-disk decoded-image cache.

`decode_image` is the one way a photo becomes pixels (RGB uint8, resized to the load size), used
by the cache, by direct decoding and by inference alike.

`ImageCache` keeps every photo decoded once, at one load size, in a raw uint8 file
(`pixels.u8`, shape rows x H x W x 3, readable as a numpy memmap) with an index keyed by the
source path and its mtime and size: a photo that changed on disk is decoded again, a new one is
appended. Reads go straight to the file (os.pread), so memory does not grow with the data set, and
DataLoader workers share the file through the OS page cache. Later epochs, runs and Optuna
trials never decode JPEG again. The cache never serves a row it did not write: see ImageCache.

A photo is refused (named, like an unreadable one) when a side is below MIN_PHOTO_SIDE pixels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from mtl.data import Problem
from mtl.errors import DataError

DEFAULT_CACHE_DIR = Path(os.environ.get("MTL_CACHE_DIR", Path.home() / ".cache" / "mtl"))
CACHE_FORMAT = 2  # NOTE: 2 added row checksums; a format-1 cache is rebuilt (an old truncation may have zeroed rows)
MIN_PHOTO_SIDE = 16  # NOTE: pixels; a smaller photo (e.g. a 1x1 placeholder) holds no face: refused like a broken one
SPOT_CHECKS = 8  # rows whose checksum is verified each time the cache is opened (plus its last row)


def read_photo(path, size=None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a photo fully (truncated files raise OSError) -> (RGB uint8 HxWx3 resized to size=(W, H), its (W, H)
    as stored)."""
    with Image.open(path) as im:
        stored = im.size
        if size is not None and im.format == "JPEG":
            im.draft("RGB", tuple(size))  # NOTE: JPEG decodes at 1/2, 1/4, 1/8 scale when that is still >= size
        im = ImageOps.exif_transpose(im)
        pixels = np.asarray(to_rgb(im))
    return fit_size(pixels, size), stored


def fit_size(pixels: np.ndarray, size=None) -> np.ndarray:
    """RGB uint8 HxWx3 pixels resized to size=(W, H) (area when shrinking, linear when enlarging), contiguous."""
    if size is not None and (pixels.shape[1], pixels.shape[0]) != tuple(size):
        shrink = pixels.shape[1] > size[0] or pixels.shape[0] > size[1]
        pixels = cv2.resize(pixels, tuple(int(s) for s in size),
                            interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(pixels)


def decode_image(path, size=None) -> np.ndarray:
    """Decode a photo fully (truncated files raise OSError) to RGB uint8 HxWx3, resized to size=(W, H)."""
    return read_photo(path, size)[0]


def to_rgb(im: Image.Image) -> Image.Image:
    """Any photo as 8-bit RGB: 16-bit grey keeps its top 8 bits (as Pillow does for 16-bit colour); alpha is dropped."""
    if im.mode.startswith("I;16") or im.mode == "I":
        # NOTE: Pillow's own convert("RGB") clips 16-bit grey at 255: a 16-bit PNG would turn pure white
        grey = np.asarray(im).astype(np.int64)
        if im.mode == "I" and (grey.min() < 0 or grey.max() > 65535):
            raise ValueError("32-bit grey values outside 0..65535 (not a 16-bit photo)")
        return Image.fromarray((grey >> 8).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        raise ValueError("floating-point pixels (mode F) are not a photo format")
    return im.convert("RGB")


def size_error(width, height) -> str | None:
    """Why a photo this size is refused (a side below MIN_PHOTO_SIDE), or None."""
    if min(width, height) < MIN_PHOTO_SIDE:
        return f"photo is {width}x{height} px, below the minimum side of {MIN_PHOTO_SIDE} px"
    return None


def image_error(path) -> str | None:
    """Why a photo cannot be used (it does not decode, or is too small), or None."""
    try:
        _, stored = read_photo(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad photo
        return describe_decode_error(exc)
    return size_error(*stored)


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

    def take(self, indices) -> DirectImages:
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

    def take(self, indices) -> CachedImages:
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
            raise DataError(f"{self.pixels_file}: row {self.rows[i]} lies past the end of the file (truncated while in "
                            f"use); run again and the missing rows are decoded again")
        return photo

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)


_WORKER_MAPS = {}


@dataclasses.dataclass
class Entry:
    """One photo's row of the cache, as index.json records it ([row, mtime_ns, file_size, width, height, crc32]):
    where its pixels lie, and the file they were decoded from; all but the row are None until the row is written."""
    row: int
    mtime_ns: int | None = None
    file_size: int | None = None
    width: int | None = None  # the photo's size as stored (before the resize to the load size)
    height: int | None = None
    crc32: int | None = None  # of the row's bytes

    @property
    def written(self) -> bool:
        return self.mtime_ns is not None

    @property
    def source(self) -> tuple:
        """(mtime_ns, file size) of the photo the row was decoded from: a changed file is decoded again."""
        return self.mtime_ns, self.file_size

    def forget(self):
        """Mark the row unwritten (its photo is decoded again)."""
        self.mtime_ns = self.file_size = self.width = self.height = self.crc32 = None

    def to_list(self) -> list:
        return [self.row, self.mtime_ns, self.file_size, self.width, self.height, self.crc32]

    @staticmethod
    def valid(item, rows: int) -> bool:
        """Whether an index.json item is an entry of a cache of `rows` rows (unwritten, or all whole numbers)."""
        if not (isinstance(item, list) and len(item) == 6 and type(item[0]) is int and 0 <= item[0] < rows):
            return False
        return item[1:] == [None] * 5 or all(type(v) is int for v in item[1:])


def _decode_into(job):
    """Worker: decode one photo into its row of the pixels file -> (error text or None, (width, height, crc32))."""
    pixels_file, rows_total, size, row, path = job
    key = (pixels_file, rows_total)
    if key not in _WORKER_MAPS:
        _WORKER_MAPS.clear()
        _WORKER_MAPS[key] = np.memmap(pixels_file, dtype=np.uint8, mode="r+", shape=(rows_total, size[1], size[0], 3))
    try:
        pixels, stored = read_photo(path, size)
    except Exception as exc:  # noqa: BLE001
        return describe_decode_error(exc), None
    _WORKER_MAPS[key][row] = pixels
    return None, (*stored, zlib.crc32(pixels))


def _file_key(path) -> tuple:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


class ImageCache:
    """Every photo decoded once at one load size, kept in `<cache_dir>/<W>x<H>/pixels.u8` + `index.json`.

    The index maps each photo's path to its `Entry` ([row, mtime_ns, file size, width, height, crc32 of the
    row] in index.json); all but the row stay null until the row is written (and the index is written only
    after the rows it names, so a kill mid-fill leaves those photos to decode again). Opening the cache checks
    it against the index: an unreadable index or a foreign file is rebuilt, rows a truncated file lost are
    decoded again, rows past the index (a killed fill) are cut off, and a few rows' checksums are compared; no
    row is served that the cache did not write.
    """

    def __init__(self, cache_dir=None, size=(192, 256)):
        self.size = (int(size[0]), int(size[1]))
        self.dir = Path(cache_dir or DEFAULT_CACHE_DIR) / f"{self.size[0]}x{self.size[1]}"
        self.pixels_file = self.dir / "pixels.u8"
        self.index_file = self.dir / "index.json"
        self.row_bytes = self.size[0] * self.size[1] * 3

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

    def _empty_index(self):
        return {"format": CACHE_FORMAT, "size": list(self.size), "row_bytes": self.row_bytes, "rows": 0, "entries": {}}

    def _read_index(self) -> tuple[dict, str | None]:
        """(the index, its entries as Entry, None), or (an empty index, why the one on disk cannot be trusted)."""
        if not self.index_file.is_file():
            return self._empty_index(), ("index.json is missing" if self.pixels_file.is_file() else None)
        try:
            index = json.loads(self.index_file.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            return self._empty_index(), f"index.json is unreadable ({str(exc).splitlines()[0][:80]})"
        why = self._index_error(index)
        if why is not None:
            return self._empty_index(), why
        index["entries"] = {path: Entry(*item) for path, item in index["entries"].items()}
        return index, None

    def _index_error(self, index) -> str | None:
        """Why a parsed index is not one this cache wrote, or None."""
        if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
            return f"index.json is not of format {CACHE_FORMAT}"
        if index.get("size") != list(self.size) or index.get("row_bytes") != self.row_bytes:
            return "index.json describes another photo size"
        rows, entries = index.get("rows"), index.get("entries")
        if type(rows) is not int or rows < 0 or not isinstance(entries, dict):
            return "index.json has no valid rows and entries"
        seen = set()
        for item in entries.values():
            if not Entry.valid(item, rows) or item[0] in seen:
                return "index.json holds an invalid or doubled row"
            seen.add(item[0])
        return None

    def _open(self, paths, log) -> tuple[dict, bool]:
        """(the index checked against the pixels file, whether the check changed it): whatever cannot be trusted
        is marked unwritten, or the whole cache reset."""
        index, why = self._read_index()
        if why is not None:
            log(f"image cache {self.dir}: {why}; rebuilding it")
            with open(self.pixels_file, "ab") as f:
                f.truncate(0)
        entries, expected, changed = index["entries"], index["rows"] * self.row_bytes, why is not None
        found = self.pixels_file.stat().st_size if self.pixels_file.is_file() else 0
        if found < expected:
            lost = [e for e in entries.values() if e.written and (e.row + 1) * self.row_bytes > found]
            for entry in lost:
                entry.forget()
            log(f"image cache {self.pixels_file}: holds {found // self.row_bytes} of {index['rows']} rows (truncated?)"
                f"; decoding {len(lost)} photo(s) again")
            self._grow(index["rows"])  # NOTE: only rows now marked unwritten get the new (zero) space
            changed = True
        elif found > expected:  # NOTE: rows a killed fill added past the index: never recorded, never served
            os.truncate(self.pixels_file, expected)
        written = [entries[p] for p in dict.fromkeys(paths) if p in entries and entries[p].written]
        if not written:
            return index, changed
        picks = [written[int(k)] for k in np.unique(np.linspace(0, len(written) - 1, SPOT_CHECKS).round())]
        last = max((e for e in entries.values() if e.written), key=lambda e: e.row)
        if self._corrupt(picks + [last]):  # NOTE: the last row is where a truncated, then regrown file has zeros
            bad = self._corrupt([e for e in entries.values() if e.written])
            for entry in bad:
                entry.forget()
            log(f"image cache {self.pixels_file}: {len(bad)} row(s) do not match their checksum; decoding them again")
            changed = True
        return index, changed

    def _corrupt(self, entries) -> list:
        """The entries whose row in the pixels file does not match its recorded checksum."""
        fd = os.open(self.pixels_file, os.O_RDONLY)
        try:
            return [e for e in entries if zlib.crc32(os.pread(fd, self.row_bytes, e.row * self.row_bytes)) != e.crc32]
        finally:
            os.close(fd)

    def _write_index(self, index):
        from mtl.io import atomic_write_text
        entries = {path: entry.to_list() for path, entry in index["entries"].items()}
        atomic_write_text(json.dumps({**index, "entries": entries}), self.index_file)

    def ensure(self, paths, workers=2, progress=True, log=print):
        """Decode every photo that is missing or stale; return (CachedImages for `paths`, [Problem])."""
        paths = [str(Path(p).resolve()) for p in paths]
        try:
            with self._locked():
                entries, problems = self._fill(paths, workers, progress, log)
        except OSError as exc:
            raise DataError(f"cannot use the image cache in {self.dir} ({exc.strerror or exc}); pass --cache-dir "
                            f"with another folder, or --no-cache") from None
        bad = {p.path for p in problems}
        rows = [entries[p].row if p not in bad else -1 for p in paths]
        return CachedImages(self.pixels_file, self.size, rows), problems

    def _fill(self, paths, workers, progress, log):
        """Under the lock: decode what is missing or stale into the file -> (index entries, [Problem])."""
        index, changed = self._open(paths, log)
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
                entry = entries[path] = Entry(rows_total)
                rows_total += 1
            if entry.source != key:
                todo.append((path, key))
        if todo:
            self._grow(rows_total)
            jobs = [(str(self.pixels_file), rows_total, self.size, entries[p].row, p) for p, _ in todo]
            bar = f"caching photos at {self.size[0]}x{self.size[1]}"
            decoded = map_photos(_decode_into, jobs, workers=workers, progress=progress, desc=bar)
            for (path, key), (error, facts) in zip(todo, decoded):
                if error is None:
                    entries[path] = Entry(entries[path].row, *key, *facts)
                else:
                    entries[path].forget()
                    problems.append(Problem(path, error))
            _WORKER_MAPS.clear()
            index["rows"] = rows_total
            with open(self.pixels_file, "rb+") as f:
                os.fsync(f.fileno())  # NOTE: the rows reach the disk before the index that names them
        if todo or changed:  # NOTE: rows found bad stay marked even when this run needs none of them
            self._write_index(index)
        found = {p.path for p in problems}
        for path in dict.fromkeys(paths):
            error = None if path in found else size_error(entries[path].width, entries[path].height)
            if error:
                problems.append(Problem(path, error))
        return entries, problems

    def _grow(self, rows_total):
        """Make room for rows_total rows; the space is allocated now, so a full disk is an error, not a crash."""
        with open(self.pixels_file, "ab") as f:
            have = os.fstat(f.fileno()).st_size
            if rows_total * self.row_bytes > have:
                # NOTE: a memmap write into a sparse file on a full disk is a SIGBUS; fallocate fails cleanly
                os.posix_fallocate(f.fileno(), have, rows_total * self.row_bytes - have)



def map_photos(work, jobs, *, workers, progress, desc) -> list:
    """[work(job) for job in jobs] with a progress bar: in this process for few jobs or one worker, else in a
    pool of `workers` processes (photos decode in parallel; results come back in order)."""
    results = []
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1 or len(jobs) < 64:
            for job in jobs:
                results.append(work(job))
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for result in pool.map(work, jobs, chunksize=32):
                    results.append(result)
                    bar.update()
    return results


def check_images(paths, workers=2, progress=True, desc="checking photos"):
    """Decode every photo once (no cache) and return a Problem for each one that fails."""
    paths = list(paths)
    errors = map_photos(image_error, paths, workers=workers, progress=progress, desc=desc)
    return [Problem(p, e) for p, e in zip(paths, errors) if e is not None]


def open_images(paths, size, *, cache_dir=None, use_cache=True, workers=2, progress=True, log=print):
    """Photos at `size` for these paths -> (image source, [Problem]); every photo is checked to decode and be
    at least MIN_PHOTO_SIDE on each side."""
    if use_cache:
        return ImageCache(cache_dir, size).ensure(paths, workers=workers, progress=progress, log=log)
    problems = check_images(paths, workers=workers, progress=progress)
    return DirectImages(paths, size), problems
