"""Checkpoints as the members of a prediction: loaded and checked together, their photos decoded, their forward passes.

predict.py, mtl.soup, pseudo_label, the Predictor and mtl.export load checkpoints here (`load_members`: paths or
globs, each one a `Member`; every one must hold a label schema and a preprocessing record, and all must share one
schema, age threshold included), check them against the data's face-crop record (`check_face_crop`), decode the
photos once per load size through the same cache as training (`open_sources`, the one place photos are opened
for members) and run every member with its own preprocessing (`predict_members`; members that share a record
share one pass over the photos). `calibrated` applies each member's own calibration (the offsets fitted after
training, mtl.calibration) to its probabilities, before any ensemble sees them.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mtl import checkpoint as ckpt_io
from mtl import labels
from mtl.errors import ConfigError, DataError

if TYPE_CHECKING:
    from mtl.calibration import Calibration  # NOTE: imports torch: read where a checkpoint's record is


# ---------------------------------------------------------------- checkpoints
@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """One checkpoint of a prediction: where it lies, its label schema, preprocessing record and training config, the
    whole record `checkpoint.load` read (the weights under 'model'; epoch, metrics, ...), and its calibration
    (mtl.calibration.Calibration; None for a checkpoint without one)."""
    path: str
    schema: labels.LabelSchema
    preprocess: dict
    config: dict
    checkpoint: dict = dataclasses.field(repr=False)
    calibration: Calibration | None = None

    @classmethod
    def of(cls, checkpoint: dict) -> Member:
        """The member of a loaded checkpoint (checkpoint.load), or a ConfigError naming what it lacks."""
        missing = [k for k in ("schema", "preprocess") if k not in checkpoint]
        if missing:
            raise ConfigError(f"{checkpoint.get('path', 'checkpoint')}: no {', '.join(missing)} stored; it was not "
                              f"written by train_multitask.py")
        return cls(path=checkpoint.get("path", "checkpoint"), schema=ckpt_io.label_schema(checkpoint),
                   preprocess=checkpoint["preprocess"], config=checkpoint["config"], checkpoint=checkpoint,
                   calibration=ckpt_io.calibration_of(checkpoint))

    @property
    def load_size(self) -> tuple:
        """(W, H) its photos are decoded (and cached) at."""
        return tuple(int(v) for v in self.preprocess["load_size"])

    @property
    def face_crop(self) -> dict | None:
        """The crop_faces settings it was trained on, or None (uncropped photos)."""
        return self.preprocess.get("face_crop")

    def build_model(self):
        """Its model, weights loaded (checkpoint.build_model)."""
        return ckpt_io.build_model(self.checkpoint)


def expand_paths(patterns, flag="--checkpoint") -> list[str]:
    """Paths and globs -> paths (each glob sorted); a glob that matches nothing is a ConfigError naming it."""
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern) and not os.path.exists(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ConfigError(f"{flag} {pattern!r} matches no file")
            paths += matches
        else:
            paths.append(pattern)
    return paths


def load_members(patterns) -> list[Member]:
    """Load every checkpoint (paths or globs) and check they share one label schema, age threshold included."""
    return check_same_schema([Member.of(ckpt_io.load(path)) for path in expand_paths(patterns)])


def as_members(items) -> list[Member]:
    """Members from Members, loaded checkpoint dicts, paths or globs (the Python API takes any of them)."""
    loaded = [item if isinstance(item, Member) else Member.of(item) if isinstance(item, dict) else None
              for item in items]
    if all(m is not None for m in loaded):
        return check_same_schema(loaded)
    return load_members([str(item) for item in items])


def check_same_schema(members: list[Member]) -> list[Member]:
    """The members, or a ConfigError naming two whose label schemas differ (they cannot be ensembled)."""
    labels.check_same_schema([(m.path, m.schema) for m in members])
    return members


def check_face_crop(members, data_root, log=print, crop_raw=False) -> list[bool]:
    """Stop if a checkpoint was trained on face crops DATA does not hold; warn for crops it was not trained on.

    With crop_raw, uncropped DATA is fine for such a checkpoint: the returned flags say which members need
    their photos cropped at prediction time (predictor.predict_sources, with the checkpoint's own crop settings).
    """
    from mtl.data import FACE_CROP_RECORD, read_face_crop_record, same_face_crop
    try:
        record = read_face_crop_record(data_root)
    except ValueError as exc:
        raise DataError(f"{Path(data_root) / FACE_CROP_RECORD}: not valid JSON ({exc})") from None
    needs_crop = []
    for member in members:
        wanted = member.face_crop
        needs_crop.append(crop_raw and wanted is not None and record is None)
        if needs_crop[-1]:
            from mtl.face_crop import check_settings
            check_settings(wanted, member.path)  # NOTE: a crop this version cannot reproduce stops here
        if wanted is not None and not same_face_crop(wanted, record) and not needs_crop[-1]:
            found = "holds uncropped photos" if record is None else f"was cropped with other settings ({record})"
            raise ConfigError(f"{member.path} was trained on face crops made with {json.dumps(wanted)} but "
                              f"{data_root} {found}; run `python -m data_tools.crop_faces {data_root} OUT` with "
                              f"those settings and pass OUT as --data")
        if wanted is None and record is not None:
            log(f"warning: {member.path} was trained on uncropped photos but {data_root} holds face crops "
                f"({json.dumps(record)}); its predictions may be poor - pass the uncropped data as --data")
    return needs_crop


def calibrated(members, member_probs, on: bool = True) -> list[dict]:
    """Each member's probabilities with its own calibration applied (calibration.apply; a member without one, or with
    on false, as they are): what every prediction answers with, before ensembles average or vote."""
    if not on:
        return list(member_probs)
    from mtl.calibration import apply
    return [apply(probs, member.calibration) for member, probs in zip(members, member_probs)]


def calibration_state(members, on: bool) -> str:
    """What a prediction does about calibration, for its headline: 'calibrated (1 of 2 checkpoint(s) hold offsets)'."""
    holding = sum(m.calibration is not None for m in members)
    if not on or not holding:
        return "calibration off" if not on else "no calibration stored"
    return f"calibrated ({holding} of {len(members)} checkpoint(s) hold offsets)"


# ---------------------------------------------------------------- photos and forward passes
def open_sources(paths, load_sizes, *, cache_dir=None, use_cache=True, workers=2, progress=True,
                 log=print) -> tuple[dict, list]:
    """({load size: image source aligned with paths}, [Problem]): each size decoded once, through the cache unless
    use_cache is false, and each photo that cannot be used named once (the caller stops or leaves it out)."""
    from mtl.images import open_images
    sources, problems = {}, {}
    for size in dict.fromkeys(tuple(s) for s in load_sizes):
        sources[size], found = open_images(paths, size, cache_dir=cache_dir, use_cache=use_cache, workers=workers,
                                           progress=progress, log=log)
        problems.update((p.path, p) for p in found if p.path not in problems)
    return sources, list(problems.values())


def predict_members(members, samples, sources, *, batch_size=64, workers=2, device="auto", amp="auto", tta=(),
                    progress=True) -> list[dict]:
    """Each member's per-task probabilities (numpy, samples order); members sharing a preprocessing share a pass.

    sources: {load size: images aligned with samples}.
    """
    import torch

    from mtl.dataset import FaceDataset
    from mtl.inference import amp_dtype, predict_probs_many, prepare_model, resolve_device
    from mtl.loader import make_loader
    from mtl.transforms import eval_transform
    device = resolve_device(device) if isinstance(device, str) else device
    dtype, channels_last = amp_dtype(amp, device), device.type == "cuda"
    groups = {}
    for i, member in enumerate(members):
        groups.setdefault(json.dumps(member.preprocess, sort_keys=True), []).append(i)
    results = [None] * len(members)
    for k, indices in enumerate(groups.values(), start=1):
        first = members[indices[0]]
        dataset = FaceDataset(samples, sources[first.load_size], eval_transform(first.preprocess), first.schema)
        loader = make_loader(dataset, batch_size, workers, device=device)
        # NOTE: a group's models sit on the device together; five folds of an efficientnet_b3 take ~250 MB
        models = [prepare_model(members[i].build_model(), device, channels_last) for i in indices]
        desc = f"predicting ({len(models)} model{'s' if len(models) > 1 else ''}" + (
            f", group {k}/{len(groups)})" if len(groups) > 1 else ")")
        answers = predict_probs_many(models, loader, device, dtype=dtype, channels_last=channels_last, tta=tta,
                                     progress=progress, desc=desc)
        for i, probs in zip(indices, answers):
            results[i] = probs
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
