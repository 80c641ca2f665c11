"""Predictions for anyone's photos: the Python API (`Predictor`) and predict.py --images, a thin command line over it.

A Predictor holds one checkpoint or an ensemble (paths or globs) and answers for photo files,
folders, globs, PIL images or uint8 RGB arrays, with each checkpoint's own preprocessing: the
same decoding, image cache, forward passes (`members.predict_members`) and ensemble
(`ensemble.combine`) as the competition path, so a photo gets the same answer either way. A
checkpoint trained on `crop_faces` output (its preprocess record holds `face_crop`) gets its photos
cropped first with exactly those settings (`mtl.face_crop.crop_images`, the function crop_faces
itself runs), batched, on the GPU when there is one.

Every answer is one flat row: path, mask, gender, age (names; the age groups named at the
checkpoints' threshold, e.g. 30-58 and 59+ at 59), class (0..17), then p_<task>_<class> per task
(p_mask_wear, ..., p_age_60+), age_years when every member regresses age, and face_found for
face-crop models. Unreadable photos are named before any forward pass (or left out with skip_bad).
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pandas as pd

from mtl import labels
from mtl.errors import ConfigError, DataError

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PREDICT_BLOCK = 1024  # NOTE: face crops are held in memory this many photos at a time (240x320: ~240 MB)


# ---------------------------------------------------------------- finding photos
def is_photo_name(name: str) -> bool:
    from mtl.data import is_ignored
    return not is_ignored(name) and os.path.splitext(name)[1].lower() in PHOTO_EXTENSIONS


def photos_in(folder) -> list[str]:
    """Every photo under a folder (recursively, sorted; hidden files and folders and ._* left out)."""
    from mtl.data import is_ignored
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_ignored(d))
        found += [os.path.join(root, f) for f in sorted(files) if is_photo_name(f)]
    return found


def find_photos(patterns, flag="--images") -> list[str]:
    """Files, folders (recursive) and globs -> photo paths, in the order given, each once; a miss is a ConfigError."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths = []
    for pattern in map(str, patterns):
        if os.path.isfile(pattern):
            paths.append(pattern)
        elif os.path.isdir(pattern):
            found = photos_in(pattern)
            if not found:
                raise ConfigError(f"{flag} {pattern}: the folder holds no photos ({', '.join(PHOTO_EXTENSIONS)})")
            paths += found
        elif glob.has_magic(pattern):
            found = []
            for match in sorted(glob.glob(pattern, recursive=True)):
                if os.path.isdir(match):
                    found += photos_in(match)
                elif is_photo_name(os.path.basename(match)):
                    found.append(match)
            if not found:
                raise ConfigError(f"{flag} {pattern!r} matches no photo")
            paths += found
        else:
            raise ConfigError(f"{flag} {pattern}: no such file or folder")
    return list(dict.fromkeys(paths))


# ---------------------------------------------------------------- inputs
class MemoryImages:
    """Photos already decoded (RGB uint8 at one load size), as an image source for FaceDataset."""

    def __init__(self, images):
        self.images = list(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i) -> np.ndarray:
        return self.images[i]

    def take(self, indices) -> MemoryImages:
        return MemoryImages([self.images[i] for i in indices])


def as_pixels(image, index: int) -> np.ndarray:
    """A PIL image (EXIF rotation applied, converted to RGB) or a uint8 HxWx3 RGB array -> contiguous pixels."""
    from PIL import Image, ImageOps

    from mtl.images import to_rgb
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(to_rgb(ImageOps.exif_transpose(image))))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ConfigError(f"image {index}: expected a uint8 RGB array of shape (H, W, 3), got {image.dtype} "
                              f"{tuple(image.shape)}")
        return np.ascontiguousarray(image)
    raise ConfigError(f"image {index}: expected a file path, a PIL image or a uint8 HxWx3 RGB array, got "
                      f"{type(image).__name__}")


def read_inputs(images) -> tuple[list, list, bool]:
    """(names, items, single): paths (folders and globs expanded) stay strings, PIL images and arrays become pixels.

    `single` is True when exactly one photo was given (one file, image or HxWx3 array), not a list.
    """
    from PIL import Image
    single = isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3) or (
        isinstance(images, (str, os.PathLike)) and os.path.isfile(images))
    if single or isinstance(images, (str, os.PathLike)):
        images = [images]
    elif isinstance(images, np.ndarray):
        images = list(images)  # a batch (N, H, W, 3)
    names, items = [], []
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            found = find_photos([image], "photo")
            names += found
            items += found
        else:
            pixels = as_pixels(image, i)
            names.append(getattr(image, "filename", None) or None)
            items.append(pixels)
    if not items:
        raise DataError("no photos given")
    return names, items, single


def unreadable_error(problems) -> DataError:
    """One line for one unreadable photo; a summary and one line each for several."""
    from mtl.data import format_problems
    if len(problems) == 1:
        return DataError(f"{problems[0]}; fix or remove it, or leave it out with --skip-bad (skip_bad=True)")
    return DataError(format_problems(problems, "unreadable photo") + "\nFix or remove them, or leave them out with "
                                                                      "--skip-bad (skip_bad=True).")


def check_device(name):
    """--device as a torch.device (mtl.inference.resolve_device: a one-line error for a device this machine lacks)."""
    import torch

    from mtl.inference import resolve_device
    return name if isinstance(name, torch.device) else resolve_device(str(name))


# ---------------------------------------------------------------- the API
class Predictor:
    """A checkpoint (or an ensemble of them) that answers for any photos, as plain dicts or a DataFrame.

    `checkpoints`: a path, a glob, or a list of them (several make a soft ensemble, or `ensemble="hard"`
    with optional `weights`); `tta=("hflip",)` averages each photo with its mirror image. `predict`
    takes photo paths, folders, globs, PIL images or uint8 (H, W, 3) RGB arrays; one photo gives one
    dict, several a list of them; `predict_frame` gives a pandas DataFrame, one row per photo.

    >>> from mtl import Predictor
    >>> predictor = Predictor("runs/demo/best.pt", device="cpu")
    >>> answer = predictor.predict("photo.jpg")
    >>> answer["mask"] in ("wear", "incorrect", "not wear"), answer["age"] in ("<30", "30-59", "60+")
    (True, True)
    >>> round(answer["p_mask_wear"] + answer["p_mask_incorrect"] + answer["p_mask_not_wear"], 4)
    1.0
    >>> predictor.schema.class_name(answer["class"]) == f"{answer['mask']}/{answer['gender']}/{answer['age']}"
    True
    >>> list(predictor.predict_frame(["photo.jpg", "photo.jpg"]).columns[:5])
    ['path', 'mask', 'gender', 'age', 'class']
    """

    def __init__(self, checkpoints, device="auto", batch_size=64, tta=(), ensemble="soft", weights=None,
                 amp="auto", workers=0, cache_dir=None, use_cache=False, crop_batch_size=None, progress=False,
                 log=None):
        from mtl import checkpoint as ckpt_io
        from mtl.ensemble import check_weights
        from mtl.face_crop import DEFAULT_BATCH_SIZE, check_settings
        from mtl.inference import check_tta
        from mtl.members import load_members
        from mtl.names import ENSEMBLES
        items = [checkpoints] if isinstance(checkpoints, (str, os.PathLike, dict)) else list(checkpoints)
        if not items:
            raise ConfigError("give at least one checkpoint")
        if all(isinstance(c, dict) for c in items):
            self.members = items
        else:
            self.members = load_members([str(c) for c in items])
        if ensemble not in ENSEMBLES:
            raise ConfigError(f"--ensemble must be one of {', '.join(ENSEMBLES)}, got {ensemble!r}")
        if int(batch_size) < 1 or int(workers) < 0:
            raise ConfigError("--batch-size must be at least 1 and --workers at least 0")
        self.weights = check_weights(weights, len(self.members))
        self.tta = check_tta((tta,) if isinstance(tta, str) else tta)
        self.device = check_device(device)
        self.ensemble, self.batch_size, self.amp, self.workers = ensemble, int(batch_size), amp, int(workers)
        self.cache_dir, self.use_cache, self.progress = cache_dir, bool(use_cache), bool(progress)
        self.crop_batch_size = int(crop_batch_size or DEFAULT_BATCH_SIZE)
        self.log = log or (lambda *_: None)
        self.schema = ckpt_io.label_schema(self.members[0])  # NOTE: load_members checked that all members share it
        self.class_names = self.schema.class_names
        self.face_crops = [m["preprocess"].get("face_crop") for m in self.members]
        for member, record in zip(self.members, self.face_crops):
            if record is not None:
                check_settings(record, member["path"])
        self._detectors = {}

    # ------------------------------------------------------------ answers
    def predict(self, images, skip_bad=False, as_frame=False):
        """Answers for photos: one dict for one photo, a list of dicts for several (a DataFrame with as_frame)."""
        names, items, single = read_inputs(images)
        table = self.table(names, items, skip_bad)["table"]
        if as_frame:
            return table
        rows = [{k: plain(v) for k, v in row.items()} for row in table.to_dict("records")]
        return rows[0] if single and rows else rows

    def predict_frame(self, images, skip_bad=False) -> pd.DataFrame:
        """Answers for photos as a DataFrame, one row per photo (columns as the module docstring lists)."""
        return self.predict(images, skip_bad=skip_bad, as_frame=True)

    def table(self, names, items, skip_bad=False) -> dict:
        """{'table', 'member_probs', 'result', 'skipped'} for decoded inputs (read_inputs); the CLI's entry point."""
        from mtl.ensemble import combine
        member_probs, kept, face_found, skipped = self.member_probs(items, skip_bad)
        result = combine(member_probs, self.weights, self.ensemble)
        parts = labels.decode(result.pred)
        table = {"path": [names[i] for i in kept]}
        for task, part in zip(labels.TASKS, parts):
            table[task] = [self.class_names[task][k] for k in part]
        table["class"] = result.pred.astype(np.int64)
        for task in labels.TASKS:
            for j, name in enumerate(self.class_names[task]):
                table[probability_column(task, name)] = result.probs[task][:, j].astype(np.float64)
        if "age_reg" in result.probs:  # NOTE: only when every member regresses age (ensemble.soft_mean)
            table["age_years"] = np.asarray(result.probs["age_reg"], dtype=np.float64)
        if face_found is not None:
            table["face_found"] = face_found
        return {"table": pd.DataFrame(table), "member_probs": member_probs, "result": result, "skipped": skipped,
                "kept": kept}

    # ------------------------------------------------------------ probabilities
    def member_probs(self, items, skip_bad=False) -> tuple[list, list, np.ndarray | None, list]:
        """(every member's per-task probabilities, kept input positions, face found per kept photo, skipped Problems).

        items are photo paths (str) or RGB uint8 pixels; every path is checked to decode before any forward pass.
        """
        from mtl.data import sample_table
        plain_groups = [i for i, r in enumerate(self.face_crops) if r is None]
        crop_groups = {}
        for i, record in enumerate(self.face_crops):
            if record is not None:
                crop_groups.setdefault(json_key(record), []).append(i)
        all_paths = all(isinstance(item, str) for item in items)
        paths = [item for item in items if isinstance(item, str)]

        # 1) every photo checked (and, through the cache, decoded) before any forward pass
        sources, problems = {}, []
        if plain_groups and all_paths:
            from mtl.images import open_images
            for size in dict.fromkeys(self.load_size(i) for i in plain_groups):
                sources[size], found = open_images(paths, size, cache_dir=self.cache_dir, use_cache=self.use_cache,
                                                   workers=self.workers, progress=self.progress)
                problems += [p for p in found if p.path not in {q.path for q in problems}]
        elif paths:
            from mtl.images import check_images
            problems = check_images(paths, workers=max(1, self.workers), progress=self.progress)
        if problems and not skip_bad:
            raise unreadable_error(problems)
        if problems:
            from mtl.data import format_problems
            self.log(f"--skip-bad: left out {format_problems(problems, 'unreadable photo')}")
        bad = {str(Path(p.path).resolve()) for p in problems}
        kept = [i for i, item in enumerate(items) if not (isinstance(item, str) and str(Path(item).resolve()) in bad)]
        if not kept:
            raise DataError("no readable photo left to predict")
        items = [items[i] for i in kept]
        samples = sample_table([(item if isinstance(item, str) else f"<image {i}>", str(i), "photo", labels.UNKNOWN,
                                 labels.UNKNOWN, labels.UNKNOWN, "predict") for i, item in zip(kept, items)])

        # 2) members on uncropped photos: the competition path's sources and forward passes
        results = [None] * len(self.members)
        if plain_groups:
            if all_paths:  # NOTE: items are the paths here, so kept positions are positions in the sources
                group_sources = {size: (src.take(kept) if problems else src) for size, src in sources.items()}
            else:
                group_sources = {size: self.memory_source(items, size)
                                 for size in dict.fromkeys(self.load_size(i) for i in plain_groups)}
            for i, probs in zip(plain_groups, self.forward(plain_groups, samples, group_sources, all_paths)):
                results[i] = probs
        # 3) members trained on face crops: crop a block of photos with their settings, then predict on it
        face_found = None
        for indices in crop_groups.values():
            parts, found = self.predict_cropped(indices, samples, items)
            for i, probs in zip(indices, parts):
                results[i] = probs
            face_found = found if face_found is None else face_found
        return results, kept, face_found, problems

    def predict_cropped(self, indices, samples, items) -> tuple[list, np.ndarray]:
        """Probabilities of members sharing one face_crop record, and whether a face was found, block by block."""
        from tqdm import tqdm

        from mtl.face_crop import CHUNK_BATCHES, crop_images
        from mtl.images import decode_image, fit_size
        record = self.face_crops[indices[0]]
        detector = self.detector(record)
        sizes = list(dict.fromkeys(self.load_size(i) for i in indices))
        chunk = CHUNK_BATCHES * self.crop_batch_size  # NOTE: crop_faces' own batches, so the boxes are the same
        block = chunk * max(1, PREDICT_BLOCK // chunk)
        parts, found = [[] for _ in indices], []
        bar = tqdm(total=len(items), desc="cropping faces", unit="img", disable=not self.progress,
                   dynamic_ncols=True)
        with bar:
            for start in range(0, len(items), block):
                crops = {size: [] for size in sizes}
                for first in range(start, min(start + block, len(items)), chunk):
                    pixels = [decode_image(item) if isinstance(item, str) else item
                              for item in items[first:min(first + chunk, start + block)]]
                    for crop in crop_images(pixels, detector, record):
                        for size in sizes:
                            crops[size].append(fit_size(crop.pixels, size))
                        found.append(not crop.fallback)
                    bar.update(len(pixels))
                rows = samples.iloc[start:start + block].reset_index(drop=True)
                sources = {size: MemoryImages(crops[size]) for size in sizes}
                for part, probs in zip(parts, self.forward(indices, rows, sources, False)):
                    part.append(probs)
        merged = [{key: np.concatenate([p[key] for p in part]) for key in part[0]} for part in parts]
        return merged, np.asarray(found, dtype=bool)

    def forward(self, indices, samples, sources, from_files) -> list[dict]:
        """members.predict_members for some members (worker processes only for photos read from files)."""
        from mtl.members import predict_members
        return predict_members([self.members[i] for i in indices], samples, sources, self.batch_size,
                               self.workers if from_files else 0, self.device, self.amp, self.tta, self.progress)

    def memory_source(self, items, size) -> MemoryImages:
        """Paths decoded and pixels resized to one load size, exactly as the cache would hold them."""
        from mtl.images import decode_image, fit_size
        return MemoryImages([decode_image(item, size) if isinstance(item, str) else fit_size(item, size)
                             for item in items])

    def load_size(self, i) -> tuple:
        from mtl.members import load_size_of
        return load_size_of(self.members[i])

    def detector(self, record):
        """The MTCNN a face_crop record asks for, built once per Predictor."""
        from mtl.face_crop import detector_for
        key = float(record["min_face"])
        if key not in self._detectors:
            self._detectors[key] = detector_for(record, self.device, self.crop_batch_size)
        return self._detectors[key]


def probability_column(task: str, name: str) -> str:
    """The column of one class's probability: p_mask_not_wear, p_gender_female, p_age_60+ ..."""
    return f"p_{task}_{name.replace(' ', '_')}"


def json_key(record) -> str:
    import json
    return json.dumps(record, sort_keys=True)


def plain(value):
    """numpy scalars -> Python ones, so an answer is plain data (JSON-ready)."""
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------- predict.py --images
def run_images(args, log=print) -> dict:
    """predict.py --images: find the photos, check the outputs, predict, write one row per photo atomically."""
    from mtl.io import atomic_write_csv
    from mtl.outputs import check_output, probs_table, write_outputs
    out = check_output(args.out)
    if args.save_probs:
        check_output(args.save_probs, "--save-probs")
    predictor = Predictor(args.checkpoint, device=args.device, batch_size=args.batch_size, tta=args.tta,
                          ensemble=args.ensemble, weights=args.weights, amp=args.amp, workers=args.workers,
                          cache_dir=args.cache_dir, use_cache=args.cache, progress=args.progress, log=log)
    photos = find_photos(args.images)
    crops = sorted({json_key(r) for r in predictor.face_crops if r is not None})
    log(f"{len(predictor.members)} checkpoint(s), {len(photos)} photos, ensemble "
        f"{args.ensemble if len(predictor.members) > 1 else '-'}, TTA {', '.join(predictor.tta) or 'none'}, age "
        f"threshold {predictor.schema.age_threshold}" + (f", face crop {', '.join(crops)}" if crops else ""))
    done = predictor.table(photos, photos, skip_bad=bool(args.skip_bad))
    table = done["table"]
    faces = (f"; a face was found in {int(table['face_found'].sum())} of {len(table)}"
             if "face_found" in table else "")
    writes = [(out, lambda: atomic_write_csv(table, out, float_format="%.6f"),
               f"wrote {out}: {len(table)} rows" + (f" ({len(done['skipped'])} unreadable photo(s) left out)"
                                                    if done["skipped"] else "") + faces)]
    if args.save_probs:
        probs = pd.concat([probs_table(table["path"], p, m["path"], predictor.schema)
                           for m, p in zip(predictor.members, done["member_probs"])], ignore_index=True)
        writes.append((args.save_probs, lambda: atomic_write_csv(probs, args.save_probs),
                       f"wrote {args.save_probs}: per-task probabilities of {len(predictor.members)} checkpoint(s)"))
    write_outputs(writes, log)  # NOTE: the predictions first; each output is written even when another one fails
    return {"members": predictor.members, "member_probs": done["member_probs"], "result": done["result"],
            "table": table, "skipped": done["skipped"], "image_ids": table["path"].tolist()}
