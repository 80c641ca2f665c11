"""Crop every train and eval photo to the face (MTCNN) and write the cropped data set in the same layout.

The winning team of the competition cropped to the face with MTCNN at training and at inference; this
command does that once for a whole data folder. For each photo it takes the largest face MTCNN finds
(the person photographed fills the frame; faces in the background are smaller), enlarges its box by
--margin (a fraction of the box's width and height on each side), widens or heightens it to the
aspect ratio of --size around the same centre, moves it inside the photo where it fits (it is padded
black only along a side longer than the photo) and resizes it to --size. When no face is found it
crops the same way around the place a face usually is in a competition photo (a square 45% of the
shorter side, centred at 50% of the width and 45% of the height) and counts it.

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
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from mtl import data
from mtl.cli import main_guard
from mtl.data import FACE_CROP_RECORD
from mtl.errors import ConfigError, DataError
from mtl.images import check_images, decode_image
from mtl.io import atomic_path, atomic_write_text

DEFAULT_MARGIN = 0.3
DEFAULT_SIZE = (240, 320)     # NOTE: the img_size of configs/default.yaml, so training resizes nothing
DEFAULT_MIN_FACE = 0.1        # smallest face searched, as a fraction of the photo's shorter side
DETECT_MAX_SIDE = 640         # photos larger than this are shrunk for detection only (the crop uses all pixels)
MIN_FACE_PIXELS = 20          # MTCNN's own default minimum face size
# NOTE: MTCNN runs hundreds of tiny operations per photo; on CPU one thread was 3-4x faster than two on a
# busy 2-core machine (0.08-0.19 s against 0.31-0.48 s per 384x512 photo), so --threads starts at 1
DEFAULT_THREADS = 1
FALLBACK_CENTRE = (0.5, 0.45)  # where a face usually is in a competition photo, fractions of width and height
FALLBACK_SIDE = 0.45          # its size, a fraction of the shorter side
BOXES_FILE = "boxes.csv"
RUN_FILE = "crop_run.json"    # settings, source, progress and counts of the run that made OUT
BOX_COLUMNS = ("path", "x1", "y1", "x2", "y2", "prob", "fallback")
# NOTE: what must match for two crops to be the same preprocessing (the facenet-pytorch version may differ)
SETTINGS_KEYS = data.FACE_CROP_SETTINGS
JPEG_QUALITY = 95


# ---------------------------------------------------------------- geometry
def crop_region(face, image_size, margin, size) -> tuple[float, float, float, float]:
    """The crop (x1, y1, x2, y2) for a face box: margin on each side, grown to the W:H of size, moved inside the photo.

    Along an axis where the crop is longer than the photo it stays centred on the face (cut() pads it black).
    """
    x1, y1, x2, y2 = face
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    w, h = (x2 - x1) * (1 + 2 * margin), (y2 - y1) * (1 + 2 * margin)
    aspect = size[0] / size[1]
    if w / h < aspect:
        w = h * aspect
    else:
        h = w / aspect
    start = []
    for centre, length, limit in ((cx, w, image_size[0]), (cy, h, image_size[1])):
        low = centre - length / 2
        if length <= limit:
            low = min(max(low, 0.0), limit - length)
        start.append(low)
    return start[0], start[1], start[0] + w, start[1] + h


def fallback_face(image_size) -> tuple[float, float, float, float]:
    """The face box assumed when none is found: FALLBACK_SIDE of the shorter side at FALLBACK_CENTRE."""
    width, height = image_size
    side = FALLBACK_SIDE * min(width, height)
    cx, cy = FALLBACK_CENTRE[0] * width, FALLBACK_CENTRE[1] * height
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def cut(pixels: np.ndarray, region, size) -> np.ndarray:
    """Cut a region (may leave the photo: padded black) out of HxWx3 pixels, resized to size=(W, H)."""
    h, w = pixels.shape[:2]
    x1, y1 = int(np.floor(region[0])), int(np.floor(region[1]))
    x2, y2 = max(int(np.ceil(region[2])), x1 + 1), max(int(np.ceil(region[3])), y1 + 1)
    pad = [max(0, -y1), max(0, y2 - h), max(0, -x1), max(0, x2 - w)]
    inside = pixels[max(0, y1):min(h, y2), max(0, x1):min(w, x2)]
    if any(pad):
        inside = cv2.copyMakeBorder(np.ascontiguousarray(inside), *pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    shrink = inside.shape[1] > size[0] or inside.shape[0] > size[1]
    return cv2.resize(inside, tuple(size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def crop_photo(image: np.ndarray, face, margin, size) -> tuple:
    """(face box used, prob, fell back?, cropped pixels) for a photo and its detection (None: no face found)."""
    height, width = image.shape[:2]
    fallback = face is None
    box, prob = (fallback_face((width, height)), 0.0) if fallback else face
    return box, prob, fallback, cut(image, crop_region(box, (width, height), margin, size), size)


def pick_face(boxes, probs):
    """The largest of the faces MTCNN found as ((x1, y1, x2, y2), prob), or None."""
    if boxes is None or len(boxes) == 0:
        return None
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    i = int(np.argmax(areas))
    return tuple(float(v) for v in boxes[i]), float(np.asarray(probs, dtype=np.float64).reshape(-1)[i])


# ---------------------------------------------------------------- detector
class FaceDetector:
    """MTCNN (facenet-pytorch) on batches of photos: photos of the same size are detected together."""

    def __init__(self, device="auto", min_face=DEFAULT_MIN_FACE, batch_size=32, threads=DEFAULT_THREADS):
        import torch
        from facenet_pytorch import MTCNN
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.min_face, self.batch_size, self.threads = float(min_face), int(batch_size), int(threads)
        self.mtcnn = MTCNN(keep_all=True, device=self.device)

    def detect(self, images) -> list:
        """For each RGB uint8 HxWx3 image: the largest face ((x1, y1, x2, y2), prob) in its pixels, or None."""
        import torch
        if self.device.type != "cpu":
            return self._detect(images)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._detect(images)
        finally:
            torch.set_num_threads(before)

    def _detect(self, images) -> list:
        found = [None] * len(images)
        groups = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape, []).append(i)
        for shape, members in groups.items():
            scale = min(1.0, DETECT_MAX_SIDE / max(shape[:2]))
            # NOTE: MTCNN's image pyramid starts at its minimum face size; faces here fill much of the photo
            self.mtcnn.min_face_size = max(MIN_FACE_PIXELS, int(self.min_face * min(shape[:2]) * scale))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                batch = [images[i] for i in chunk]
                if scale < 1.0:
                    size = (round(shape[1] * scale), round(shape[0] * scale))
                    batch = [cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in batch]
                for i, face in zip(chunk, self._detect_batch(np.stack(batch))):
                    if face is not None:
                        box, prob = face
                        found[i] = tuple(v / scale for v in box), prob
        return found

    def _detect_batch(self, batch: np.ndarray) -> list:
        try:
            boxes, probs = self.mtcnn.detect(batch)
        except (RuntimeError, ValueError, IndexError):
            if len(batch) == 1:
                return [None]  # NOTE: facenet-pytorch fails on a few degenerate photos; they fall back
            return [face for image in batch for face in self._detect_batch(image[None])]
        return [pick_face(b, p) for b, p in zip(boxes, probs)]


# ---------------------------------------------------------------- the data set
def crop_settings(margin, size, min_face) -> dict:
    """The face_crop.json record: the settings alone, so two crops made the same way have equal records."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        facenet_version = version("facenet-pytorch")
    except PackageNotFoundError:
        facenet_version = None
    return {"detector": "mtcnn", "choice": "largest", "margin": float(margin), "size": [int(s) for s in size],
            "min_face": float(min_face), "detect_max_side": DETECT_MAX_SIDE, "fallback": "center",
            "fallback_centre": list(FALLBACK_CENTRE), "fallback_side": FALLBACK_SIDE, "pad": "shift inside, then black",
            "facenet_pytorch": facenet_version}


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


def crop_dataset(data_root, out, margin=DEFAULT_MARGIN, size=DEFAULT_SIZE, device="auto", batch_size=32,
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
    with ThreadPoolExecutor(max(1, workers)) as pool, open_boxes(out / BOXES_FILE) as boxes, \
            tqdm(total=len(todo), desc="cropping faces", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        writer = csv.writer(boxes, lineterminator="\n")
        chunk_size = 4 * batch_size  # NOTE: decode ahead in threads, detect in batches, write, then log the boxes
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            images = list(pool.map(lambda p: decode_image(root / p), chunk))
            faces = detector.detect(images)
            crops = [crop_photo(image, face, margin, size) for image, face in zip(images, faces)]
            list(pool.map(save_photo, [c[3] for c in crops], [out / rel for rel in chunk]))
            for rel, (box, prob, fallback, _) in zip(chunk, crops):
                writer.writerow([rel, *(f"{v:.1f}" for v in box), f"{prob:.4f}", int(fallback)])
                done[rel] = {"box": box, "prob": prob, "fallback": int(fallback)}
            boxes.flush()
            bar.update(len(chunk))
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
    parser = argparse.ArgumentParser(prog="python -m data_tools.crop_faces", description=__doc__,
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
    from mtl.transforms import size_pair
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
    if args.device != "auto":
        import torch
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: no CUDA GPU here; use --device cpu (or auto)")
        try:
            torch.device(args.device)
        except RuntimeError:
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}") from None


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    check_args(args)
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
