"""Crop every train and eval photo to the face (MTCNN) and write the cropped data set in the same layout.

The winning team of the competition cropped to the face with MTCNN at training and at inference; this
command does that once for a whole data folder, with `mtl.face_crop` (the same crop predict.py applies to
raw photos for a model trained on crops): the largest face MTCNN finds, enlarged by --margin, grown to the
aspect ratio of --size, moved inside the photo and resized to --size; photos with no face found are cropped
around the place a face usually is in a competition photo, and counted.

OUT gets the input's layout (train/train.csv, train/images/<person>/<photo>, eval/info.csv,
eval/images/<ImageID>, eval_truth.csv when present), so every other command takes OUT as --data;
OUT/face_crop.json records the settings (training stores them in its checkpoints, so predict.py can
check its photos were cropped the same way), OUT/crop_run.json the source, the counts and the photos
that fell back, and OUT/boxes.csv the box of every photo (source pixels, after EXIF rotation), appended
as photos are done: after Ctrl-C, rerun the same command to go on where it stopped. Photos are written
atomically, never half, and face_crop.json last, once every photo is done. Run it as

    python -m data_tools.crop_faces data/train_data data/cropped                  # GPU if there is one
    python -m data_tools.crop_faces DATA OUT --margin 0.3 --size 240 320 --device cpu --batch-size 16
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mtl import data
from mtl.cli import ArgumentParser, main_guard
from mtl.data import FACE_CROP_RECORD
from mtl.errors import ConfigError, DataError
from mtl.face_crop import (  # noqa: F401
    CHUNK_BATCHES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MARGIN,
    DEFAULT_MIN_FACE,
    DEFAULT_SIZE,
    DEFAULT_THREADS,
    FaceDetector,
    crop_images,
    crop_region,
    crop_settings,
    cut,
    fallback_face,
)
from mtl.images import check_images, decode_image
from mtl.io import atomic_path, atomic_write_text

BOXES_FILE = "boxes.csv"
RUN_FILE = "crop_run.json"    # settings, source, progress and counts of the run that made OUT
BOX_COLUMNS = ("path", "x1", "y1", "x2", "y2", "prob", "fallback")
# NOTE: what must match for two crops to be the same preprocessing (the facenet-pytorch version may differ)
SETTINGS_KEYS = data.FACE_CROP_SETTINGS
JPEG_QUALITY = 95


# ---------------------------------------------------------------- the data set
def list_photos(root: Path, skip_bad: bool, log=print) -> list[str]:
    """Every train and eval photo of DATA, as DATA-relative paths; layout problems raise (or are skipped)."""
    has_train, has_eval = (root / "train" / "train.csv").is_file(), (root / "eval" / "info.csv").is_file()
    if not (has_train or has_eval):
        raise DataError(f"{root} holds neither train/train.csv nor eval/info.csv: not a data folder in the "
                        f"competition layout")
    paths, problems = [], []
    if has_train:
        samples, problems = data.train_samples(root, log=log)
        paths += list(samples["image_path"])
    if has_eval:
        _, table, eval_problems = data.read_eval(root)
        paths += list(table["image_path"])
        problems += eval_problems
    data.raise_or_skip(problems, skip_bad, log, "problem")
    return [os.path.relpath(p, root) for p in paths]


def read_done(boxes_csv: Path) -> dict:
    """boxes.csv -> {path: row}; the last row of a path wins, a row cut short by a kill is ignored."""
    done = {}
    if not boxes_csv.is_file():
        return done
    with open(boxes_csv, newline="") as f:
        for row in csv.DictReader(f):
            try:
                done[row["path"]] = {"box": tuple(float(row[k]) for k in ("x1", "y1", "x2", "y2")),
                                     "prob": float(row["prob"]), "fallback": int(row["fallback"])}
            except (KeyError, TypeError, ValueError):
                continue
    return done


def open_boxes(boxes_csv: Path):
    """boxes.csv opened for appending (header written once; a line cut short by a kill is ended first)."""
    new = not boxes_csv.is_file() or boxes_csv.stat().st_size == 0
    if not new:
        with open(boxes_csv, "rb") as f:
            f.seek(-1, os.SEEK_END)
            ends_clean = f.read(1) == b"\n"
    f = open(boxes_csv, "a", newline="")
    if new:
        csv.writer(f, lineterminator="\n").writerow(BOX_COLUMNS)
    elif not ends_clean:
        f.write("\n")
    return f


def save_photo(pixels: np.ndarray, path: Path):
    """Write RGB pixels in the format the file name says (JPEG unless .png), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))


def copy_atomic(src: Path, dst: Path):
    """Copy a file so that dst is either absent or complete."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def check_out(root: Path, out: Path, settings: dict):
    """Refuse an OUT that is DATA, is not a crop_faces output, or was made with other settings or from other data."""
    if out.resolve() == root:
        raise ConfigError(f"OUT must differ from DATA ({root}): crop_faces writes a new copy of the data set")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT {out} is a file, not a folder")
    if (out / RUN_FILE).is_file():
        run = json.loads((out / RUN_FILE).read_text())
        old = {**run["settings"], "source": run["source"]}
        new = {**settings, "source": str(root)}
        changed = [k for k in (*SETTINGS_KEYS, "source") if old.get(k) != new.get(k)]
        if changed:
            raise ConfigError(f"OUT {out} was cropped from {run['source']} with other settings "
                              f"({', '.join(f'{k} {old.get(k)!r}' for k in changed)}); rerun with those, or "
                              f"choose a new OUT")
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"OUT {out} is not empty and holds no {RUN_FILE}: not a crop_faces output; "
                          f"choose a new or empty folder")


def crop_photos(sources, targets, detector, settings: dict, workers=2, progress=True, on_chunk=None,
                batch_size=None) -> list:
    """Crop each photo to the face and write it to its target (atomically; the format the name says).

    Photos are decoded ahead in threads and detected a few detector batches at a time; on_chunk(index of the
    chunk's first photo, its crops) runs once a chunk is written. Returns every photo's mtl.face_crop.Crop
    without its pixels (box, prob, fallback).
    """
    found = []
    chunk_size = CHUNK_BATCHES * (batch_size or getattr(detector, "batch_size", DEFAULT_BATCH_SIZE))
    bar = tqdm(total=len(sources), desc="cropping faces", unit="img", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max(1, workers)) as pool, bar:
        for start in range(0, len(sources), chunk_size):
            images = list(pool.map(decode_image, sources[start:start + chunk_size]))
            crops = crop_images(images, detector, settings)
            list(pool.map(save_photo, [c.pixels for c in crops], targets[start:start + chunk_size]))
            crops = [dataclasses.replace(c, pixels=None) for c in crops]
            if on_chunk is not None:
                on_chunk(start, crops)
            found += crops
            bar.update(len(crops))
    return found


def crop_dataset(data_root, out, margin=DEFAULT_MARGIN, size=DEFAULT_SIZE, device="auto", batch_size=DEFAULT_BATCH_SIZE,
                 min_face=DEFAULT_MIN_FACE, skip_bad=False, workers=4, progress=True, detector=None,
                 threads=DEFAULT_THREADS, log=print) -> dict:
    """Crop every photo of DATA into OUT (resuming from OUT/boxes.csv); return the crop_run.json record."""
    root, out = Path(data_root).resolve(), Path(out)
    if not root.is_dir():
        raise DataError(f"data folder not found: {data_root}")
    settings = crop_settings(margin, size, min_face)
    check_out(root, out, settings)
    photos = list_photos(root, skip_bad, log)
    done = read_done(out / BOXES_FILE)
    todo = [p for p in photos if not (p in done and (out / p).is_file())]
    problems = check_images([root / p for p in todo], workers=workers, progress=progress, desc="checking photos")
    data.raise_or_skip(problems, skip_bad, log, "unreadable photo")
    bad = {os.path.relpath(p.path, root) for p in problems}
    todo = [p for p in todo if p not in bad]
    if len(photos) > len(todo) + len(bad):
        log(f"{len(photos) - len(todo) - len(bad)} photo(s) already cropped in {out}: skipped")

    out.mkdir(parents=True, exist_ok=True)
    run = {"settings": settings, "source": str(root), "complete": False}
    atomic_write_text(json.dumps(run, indent=2), out / RUN_FILE)
    if todo and detector is None:
        detector = FaceDetector(device, min_face, batch_size, threads)
    t0 = time.time()
    with open_boxes(out / BOXES_FILE) as boxes:
        writer = csv.writer(boxes, lineterminator="\n")

        def record(first, crops):  # NOTE: after each chunk's photos are written, so a kill loses no box
            for rel, crop in zip(todo[first:first + len(crops)], crops):
                writer.writerow([rel, *(f"{v:.1f}" for v in crop.box), f"{crop.prob:.4f}", int(crop.fallback)])
                done[rel] = {"box": crop.box, "prob": crop.prob, "fallback": int(crop.fallback)}
            boxes.flush()
        crop_photos([root / p for p in todo], [out / p for p in todo], detector, settings, workers, progress,
                    on_chunk=record, batch_size=batch_size)
    seconds = time.time() - t0

    for table in ("train/train.csv", "eval/info.csv", "eval_truth.csv"):
        if (root / table).is_file():
            copy_atomic(root / table, out / table)
    fallbacks = sorted(p for p in photos if p in done and done[p]["fallback"])
    counts = {"photos": len(photos) - len(bad), "detected": len(photos) - len(bad) - len(fallbacks),
              "fallback": len(fallbacks), "bad": len(bad)}
    run.update(complete=True, counts=counts, fallbacks=fallbacks)
    atomic_write_text(json.dumps(run, indent=2), out / RUN_FILE)
    atomic_write_text(json.dumps(settings, indent=2), out / FACE_CROP_RECORD)  # NOTE: last: marks OUT complete
    rate = f"; {seconds / len(todo):.3f} s per photo on {getattr(detector, 'device', 'the detector')}" if todo else ""
    log(f"cropped {len(todo)} photo(s) this run{rate}. {counts['photos']} photos in {out}: faces found in "
        f"{counts['detected']}, {counts['fallback']} fell back to the centre crop"
        + (f" (e.g. {', '.join(fallbacks[:5])}; all marked fallback=1 in {BOXES_FILE})" if fallbacks else "")
        + (f"; {len(bad)} unreadable photo(s) left out" if bad else "")
        + f". Train on it with --data {out}")
    return run


# ---------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m data_tools.crop_faces", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", metavar="DATA", help="data folder with train/ and/or eval/ (the competition layout)")
    parser.add_argument("out", metavar="OUT", help="new folder for the cropped copy (or the same one, to resume)")
    crop = parser.add_argument_group("crop")
    crop.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                      help=f"added on each side of the face box, as a fraction of its size (default {DEFAULT_MARGIN})")
    crop.add_argument("--size", type=int, nargs=2, default=list(DEFAULT_SIZE), metavar=("W", "H"),
                      help=f"output photo size (default {DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]}, the img_size of "
                           f"configs/default.yaml)")
    crop.add_argument("--min-face", type=float, default=DEFAULT_MIN_FACE,
                      help=f"smallest face searched, a fraction of the shorter side (default {DEFAULT_MIN_FACE})")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (cuda when there is a GPU), cuda, cuda:1 or cpu")
    run.add_argument("--batch-size", type=int, default=32, help="photos per MTCNN batch (default 32)")
    run.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                     help=f"CPU threads of the detector when it runs on CPU (default {DEFAULT_THREADS}: faster for "
                          f"MTCNN's many small operations; try more on an idle many-core machine)")
    run.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                     help="threads decoding and writing photos (default: CPU count, at most 4)")
    run.add_argument("--skip-bad", action="store_true",
                     help="leave out missing or unreadable photos instead of stopping")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def check_args(args):
    """One clear line for a bad flag, before any work."""
    from mtl.checks import check_device_name, size_pair
    if not 0 <= args.margin <= 2:
        raise ConfigError(f"--margin must be from 0 to 2 (a fraction of the face box), got {args.margin}")
    args.size = size_pair(args.size, "--size")
    if not 0 < args.min_face < 1:
        raise ConfigError(f"--min-face must be between 0 and 1 (a fraction of the shorter side), got {args.min_face}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    check_device_name(args.device)  # NOTE: whether this machine has it is checked where the detector is built


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    from mtl.inference import resolve_device
    resolve_device(args.device)  # NOTE: a GPU this machine lacks, before any photo is read
    try:
        crop_dataset(args.data, args.out, args.margin, args.size, args.device, args.batch_size, args.min_face,
                     args.skip_bad, args.workers, args.progress, threads=args.threads)
    except KeyboardInterrupt:
        print(f"interrupted: the photos done so far are kept (listed in {Path(args.out) / BOXES_FILE}); rerun "
              f"the same command to go on", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
