"""Predictions: the one path every prediction takes (`predict_sources`), its record (`Prediction`), and the Python API.

`predict_sources` runs members over photos: members that read photos as they were trained use the photos
decoded at their load size (the same cache as training; `members.predict_members`), members trained on
`crop_faces` output whose photos are uncropped get them cropped first with exactly their settings
(`mtl.face_crop.crop_images`, the function crop_faces itself runs; batched, on the GPU when there is one).
predict.py's submission, validation and --images, pseudo_label and the `Predictor` all come through it, so a photo
gets the same answer whichever way it is asked about; `Prediction.of` then applies each member's own calibration
(offsets tuned for macro F1 after training, `members.calibrated`; off with calibration=False, --no-calibration)
and `ensemble.combine` joins the calibrated answers, so soft means, hard votes, probability files and
pseudo-labels all see them.

A `Predictor` holds one checkpoint or an ensemble (paths or globs) and answers for photo files, folders,
globs, PIL images or uint8 RGB arrays (`mtl.photos`). Every answer is one flat row: path, mask, gender,
age (names; the age groups named at the checkpoints' threshold, e.g. 30-58 and 59+ at 59), class
(0..17), then p_<task>_<class> per task (p_mask_wear, ..., p_age_60+), age_years when every member
regresses age, and face_found for face-crop models. Unreadable photos are named before any forward pass
(or left out with skip_bad).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd

from mtl import labels
from mtl.errors import ConfigError, DataError
from mtl.photos import GivenPhotos, MemoryImages, read_inputs, unreadable_error

RAW = "photos as given"  # NOTE: the sources key of the photos face-crop members crop themselves (any size)
PREDICT_BLOCK = 1024  # NOTE: face crops are held in memory this many photos at a time (240x320: ~240 MB)


@dataclasses.dataclass
class Prediction:
    """What one prediction computed, photo by photo: the photos answered, every member's per-task probabilities
    (calibrated, unless calibration was turned off) and those the network gave, their ensemble, whether a face was
    found (face-crop members), the photos left out, and the scores when the truth was known (predict.py --validate)."""
    image_ids: list
    members: list  # members.Member (or outputs.SavedMember, from --from-probs)
    member_probs: list[dict]
    ensemble: object  # ensemble.Ensemble: per-task probabilities, the 18-class answers and their confidence
    face_found: np.ndarray | None = None  # a face found by every face-crop member's detector (None: no such member)
    skipped: list = dataclasses.field(default_factory=list)  # data.Problem of each photo left out (skip_bad)
    metrics: dict | None = None
    raw_probs: list[dict] | None = None  # each member's probabilities before its calibration (None: member_probs)
    calibrated: bool = False  # whether member_probs are the raw ones calibrated

    @classmethod
    def of(cls, image_ids, members, raw_probs, *, weights=None, ensemble="soft", calibration=True, face_found=None,
           skipped=()) -> Prediction:
        """The prediction of members' raw probabilities: each member's own calibration applied (unless calibration is
        false), then combined (ensemble.combine: soft or hard, weighted)."""
        from mtl.ensemble import combine
        from mtl.members import calibrated
        member_probs = calibrated(members, raw_probs, calibration)
        return cls(image_ids=list(image_ids), members=members, member_probs=member_probs,
                   ensemble=combine(member_probs, weights, ensemble), face_found=face_found, skipped=list(skipped),
                   raw_probs=raw_probs, calibrated=bool(calibration))


# ---------------------------------------------------------------- the one path
def predict_sources(members, samples, sources, *, crop=None, detectors=None, batch_size=64, workers=2, device="auto",
                    amp="auto", tta=(), progress=True, crop_batch_size=None) -> tuple[list[dict], np.ndarray | None]:
    """(every member's per-task probabilities in samples order, whether a face was found in each photo, or None).

    sources: {load size: images aligned with samples} for the members that read photos as trained, and, when
    `crop` (one flag per member) says some crop faces first, {RAW: the photos as given}; those members' photos are
    cropped with their own face_crop record (`detectors` caches the MTCNNs between calls).
    """
    crop = crop or [False] * len(members)
    run = {"batch_size": batch_size, "device": device, "amp": amp, "tta": tta, "progress": progress}
    results = [None] * len(members)
    plain = [i for i, c in enumerate(crop) if not c]
    if plain:
        from mtl import members as members_module  # NOTE: looked up at each call, so tests can stand in for it
        for i, probs in zip(plain, members_module.predict_members([members[i] for i in plain], samples, sources,
                                                                  workers=workers, **run)):
            results[i] = probs
    face_found = None
    groups = {}
    for i in (i for i, c in enumerate(crop) if c):
        groups.setdefault(json.dumps(members[i].face_crop, sort_keys=True), []).append(i)
    for indices in groups.values():
        parts, found = predict_cropped([members[i] for i in indices], samples, sources[RAW], run,
                                       crop_batch_size=crop_batch_size, detectors=detectors)
        for i, probs in zip(indices, parts):
            results[i] = probs
        face_found = found if face_found is None else face_found & found
    return results, face_found


def predict_cropped(members, samples, photos, run: dict, *, crop_batch_size=None,
                    detectors=None) -> tuple[list, np.ndarray]:
    """Probabilities of members sharing one face_crop record, and whether a face was found, block by block."""
    from tqdm import tqdm

    from mtl.face_crop import CHUNK_BATCHES, DEFAULT_BATCH_SIZE, crop_images, detector_for
    from mtl.images import fit_size
    from mtl.members import predict_members
    record, crop_batch_size = members[0].face_crop, int(crop_batch_size or DEFAULT_BATCH_SIZE)
    detectors = {} if detectors is None else detectors
    key = float(record["min_face"])
    if key not in detectors:
        detectors[key] = detector_for(record, run["device"], crop_batch_size)
    sizes = list(dict.fromkeys(m.load_size for m in members))
    chunk = CHUNK_BATCHES * crop_batch_size  # NOTE: crop_faces' own batches, so the boxes are the same
    block = chunk * max(1, PREDICT_BLOCK // chunk)
    parts, found = [[] for _ in members], []
    with tqdm(total=len(photos), desc="cropping faces", unit="img", disable=not run["progress"],
              dynamic_ncols=True) as bar:
        for start in range(0, len(photos), block):
            crops = {size: [] for size in sizes}
            for first in range(start, min(start + block, len(photos)), chunk):
                pixels = [photos[i] for i in range(first, min(first + chunk, start + block, len(photos)))]
                for crop in crop_images(pixels, detectors[key], record):
                    for size in sizes:
                        crops[size].append(fit_size(crop.pixels, size))
                    found.append(not crop.fallback)
                bar.update(len(pixels))
            rows = samples.iloc[start:start + block].reset_index(drop=True)
            cropped = {size: MemoryImages(crops[size]) for size in sizes}
            for part, probs in zip(parts, predict_members(members, rows, cropped, workers=0, **run)):
                part.append(probs)
    merged = [{k: np.concatenate([p[k] for p in part]) for k in part[0]} for part in parts]
    return merged, np.asarray(found, dtype=bool)


def photo_samples(names) -> pd.DataFrame:
    """The sample table of photos without labels (one row per name, in order)."""
    from mtl.data import sample_table
    return sample_table([(name, str(i), "photo", labels.UNKNOWN, labels.UNKNOWN, labels.UNKNOWN, "predict")
                         for i, name in enumerate(names)])


# ---------------------------------------------------------------- the API
class Predictor:
    """A checkpoint (or an ensemble of them) that answers for any photos, as plain dicts or a DataFrame.

    `checkpoints`: a path, a glob, or a list of them (several make a soft ensemble, or `ensemble="hard"`
    with optional `weights`); `tta=("hflip",)` averages each photo with its mirror image. `predict`
    takes photo paths, folders, globs, PIL images or uint8 (H, W, 3) RGB arrays; one photo gives one
    dict, several a list of them; `predict_frame` gives a pandas DataFrame, one row per photo. Each checkpoint's own
    calibration (the offsets fitted after training for macro F1) is applied unless `calibration=False`.

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

    def __init__(self, checkpoints, *, device="auto", batch_size=64, tta=(), ensemble="soft", weights=None,
                 amp="auto", workers=0, cache_dir=None, use_cache=False, crop_batch_size=None, progress=False,
                 calibration=True, log=None):
        from mtl.ensemble import check_weights
        from mtl.face_crop import check_settings
        from mtl.inference import resolve_device
        from mtl.members import Member, as_members
        from mtl.names import ENSEMBLES, check_tta
        items = [checkpoints] if isinstance(checkpoints, (str, os.PathLike, dict, Member)) else list(checkpoints)
        if not items:
            raise ConfigError("give at least one checkpoint")
        self.members = as_members(items)
        if ensemble not in ENSEMBLES:
            raise ConfigError(f"--ensemble must be one of {', '.join(ENSEMBLES)}, got {ensemble!r}")
        if int(batch_size) < 1 or int(workers) < 0:
            raise ConfigError("--batch-size must be at least 1 and --workers at least 0")
        self.weights = check_weights(weights, len(self.members))
        self.tta = check_tta((tta,) if isinstance(tta, str) else tta)
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.ensemble, self.batch_size, self.amp, self.workers = ensemble, int(batch_size), amp, int(workers)
        self.cache_dir, self.use_cache, self.progress = cache_dir, bool(use_cache), bool(progress)
        self.crop_batch_size, self.calibration = crop_batch_size, bool(calibration)
        self.log = log or (lambda *_: None)
        self.schema = self.members[0].schema  # NOTE: as_members checked that all members share it
        self.class_names = self.schema.class_names
        for member in self.members:
            if member.face_crop is not None:
                check_settings(member.face_crop, member.path)
        self._detectors = {}

    # ------------------------------------------------------------ answers
    def predict(self, images, skip_bad=False, as_frame=False):
        """Answers for photos: one dict for one photo, a list of dicts for several (a DataFrame with as_frame)."""
        names, items, single = read_inputs(images)
        table = self.answers(self.predict_items(names, items, skip_bad=skip_bad))
        if as_frame:
            return table
        rows = [{k: plain(v) for k, v in row.items()} for row in table.to_dict("records")]
        return rows[0] if single and rows else rows

    def predict_frame(self, images, skip_bad=False) -> pd.DataFrame:
        """Answers for photos as a DataFrame, one row per photo (columns as the module docstring lists)."""
        return self.predict(images, skip_bad=skip_bad, as_frame=True)

    def answers(self, prediction: Prediction) -> pd.DataFrame:
        """A prediction as the flat table of the module docstring, one row per photo answered."""
        result = prediction.ensemble
        table = {"path": list(prediction.image_ids)}
        for task, part in zip(labels.TASKS, labels.decode(result.pred)):
            table[task] = [self.class_names[task][k] for k in part]
        table["class"] = result.pred.astype(np.int64)
        for task in labels.TASKS:
            for j, name in enumerate(self.class_names[task]):
                table[probability_column(task, name)] = result.probs[task][:, j].astype(np.float64)
        if "age_reg" in result.probs:  # NOTE: only when every member regresses age (ensemble.soft_mean)
            table["age_years"] = np.asarray(result.probs["age_reg"], dtype=np.float64)
        if prediction.face_found is not None:
            table["face_found"] = prediction.face_found
        return pd.DataFrame(table)

    # ------------------------------------------------------------ the prediction
    def prediction(self, images, *, skip_bad=False) -> Prediction:
        """The Prediction (the typed record behind `answers`) for anything `predict` takes."""
        names, items, _ = read_inputs(images)
        return self.predict_items(names, items, skip_bad=skip_bad)

    def predict_items(self, names, items, *, skip_bad=False) -> Prediction:
        """The Prediction for photos read by photos.read_inputs (paths or RGB uint8 pixels, with their names).

        Every path is checked to decode before any forward pass; an unreadable one stops, or with skip_bad is left
        out and listed in the Prediction's `skipped`.
        """
        from mtl.images import check_images
        from mtl.members import open_sources
        crop = [m.face_crop is not None for m in self.members]
        sizes = list(dict.fromkeys(m.load_size for m, c in zip(self.members, crop) if not c))
        paths = [item for item in items if isinstance(item, str)]
        all_paths = len(paths) == len(items)
        sources, problems = {}, []
        if sizes and all_paths:  # NOTE: photos from files go through the cache (and its checks), as in training
            sources, problems = open_sources(paths, sizes, cache_dir=self.cache_dir, use_cache=self.use_cache,
                                             workers=self.workers, progress=self.progress, log=self.log)
        elif paths:
            problems = check_images(paths, workers=max(1, self.workers), progress=self.progress)
        if problems and not skip_bad:
            raise unreadable_error(problems)
        if problems:
            from mtl.data import format_problems
            self.log(f"--skip-bad: left out {format_problems(problems, 'unreadable photo')}")
        bad = {os.path.realpath(p.path) for p in problems}
        kept = [i for i, item in enumerate(items) if not (isinstance(item, str) and os.path.realpath(item) in bad)]
        if not kept:
            raise DataError("no readable photo left to predict")
        items = [items[i] for i in kept]
        if all_paths:  # NOTE: items are the paths here, so kept positions are positions in the sources
            sources = {size: (source.take(kept) if problems else source) for size, source in sources.items()}
        else:
            sources = {size: self.memory_source(items, size) for size in sizes}
        if any(crop):
            sources[RAW] = GivenPhotos(items)
        samples = photo_samples([item if isinstance(item, str) else f"<image {i}>" for i, item in zip(kept, items)])
        member_probs, face_found = predict_sources(
            self.members, samples, sources, crop=crop, detectors=self._detectors, batch_size=self.batch_size,
            workers=self.workers if all_paths else 0, device=self.device, amp=self.amp, tta=self.tta,
            progress=self.progress, crop_batch_size=self.crop_batch_size)
        return Prediction.of([names[i] for i in kept], self.members, member_probs, weights=self.weights,
                             ensemble=self.ensemble, calibration=self.calibration, face_found=face_found,
                             skipped=problems)

    @staticmethod
    def memory_source(items, size) -> MemoryImages:
        """Paths decoded and pixels resized to one load size, exactly as the cache would hold them."""
        from mtl.images import decode_image, fit_size
        return MemoryImages([decode_image(item, size) if isinstance(item, str) else fit_size(item, size)
                             for item in items])


def probability_column(task: str, name: str) -> str:
    """The column of one class's probability: p_mask_not_wear, p_gender_female, p_age_60+ ..."""
    return f"p_{task}_{name.replace(' ', '_')}"


def plain(value):
    """numpy scalars -> Python ones, so an answer is plain data (JSON-ready)."""
    return value.item() if isinstance(value, np.generic) else value
