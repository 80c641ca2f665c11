"""Checkpoints as the members of a prediction: loaded and checked together, their photos decoded, their forward passes.

predict.py, mtl.soup, pseudo_label, the Predictor and mtl.export load checkpoints here (`load_members`: paths or
globs; every one must hold a label schema and a preprocessing record, and all must share one schema, age
threshold included), check them against the data's face-crop record (`check_face_crop`), decode the photos
once per load size through the same cache as training (`open_sources`) and run every member with its own
preprocessing (`predict_members`; members that share a record share one pass over the photos).
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from mtl import checkpoint as ckpt_io
from mtl.data import FACE_CROP_RECORD, format_problems, read_face_crop_record, same_face_crop
from mtl.errors import ConfigError, DataError


# ---------------------------------------------------------------- checkpoints
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


def load_members(patterns) -> list[dict]:
    """Load every checkpoint (paths or globs) and check they share one label schema, age threshold included."""
    members = [ckpt_io.load(path) for path in expand_paths(patterns)]
    for member in members:
        missing = [k for k in ("schema", "preprocess") if k not in member]
        if missing:
            raise ConfigError(f"{member['path']}: no {', '.join(missing)} stored; it was not written by "
                              f"train_multitask.py")
    ckpt_io.check_same_schema(members)
    return members


def check_face_crop(members, data_root, log=print, crop_raw=False) -> list[bool]:
    """Stop if a checkpoint was trained on face crops DATA does not hold; warn for crops it was not trained on.

    With crop_raw, uncropped DATA is fine for such a checkpoint: the returned flags say which members need
    their photos cropped at prediction time (mtl.predictor, with the checkpoint's own crop settings).
    """
    try:
        record = read_face_crop_record(data_root)
    except ValueError as exc:
        raise DataError(f"{Path(data_root) / FACE_CROP_RECORD}: not valid JSON ({exc})") from None
    needs_crop = []
    for member in members:
        wanted = member["preprocess"].get("face_crop")
        needs_crop.append(crop_raw and wanted is not None and record is None)
        if wanted is not None and not same_face_crop(wanted, record) and not needs_crop[-1]:
            found = "holds uncropped photos" if record is None else f"was cropped with other settings ({record})"
            raise ConfigError(f"{member['path']} was trained on face crops made with {json.dumps(wanted)} but "
                              f"{data_root} {found}; run `python -m data_tools.crop_faces {data_root} OUT` with "
                              f"those settings and pass OUT as --data")
        if wanted is None and record is not None:
            log(f"warning: {member['path']} was trained on uncropped photos but {data_root} holds face crops "
                f"({json.dumps(record)}); its predictions may be poor - pass the uncropped data as --data")
    return needs_crop


# ---------------------------------------------------------------- photos and forward passes
def open_sources(paths, load_sizes, cache_dir=None, use_cache=True, workers=2, progress=True, log=print) -> dict:
    """{load size: image source aligned with paths}, each size decoded once; any bad photo is a DataError."""
    from mtl.images import open_images
    sources, problems = {}, []
    for size in dict.fromkeys(load_sizes):
        sources[size], found = open_images(paths, size, cache_dir=cache_dir, use_cache=use_cache, workers=workers,
                                           progress=progress, log=log)
        problems += [p for p in found if p.path not in {q.path for q in problems}]
    if problems:
        raise DataError(format_problems(problems, "bad eval photo"))
    return sources


def load_size_of(member) -> tuple:
    return tuple(int(v) for v in member["preprocess"]["load_size"])


def predict_members(members, samples, sources, batch_size=64, workers=2, device="auto", amp="auto", tta=(),
                    progress=True) -> list[dict]:
    """Each member's per-task probabilities (numpy, samples order); members sharing a preprocessing share a pass."""
    import torch

    from mtl.dataset import FaceDataset
    from mtl.inference import amp_dtype, predict_probs_many, prepare_model, resolve_device
    from mtl.loader import make_loader
    from mtl.transforms import eval_transform
    device = resolve_device(device) if isinstance(device, str) else device
    dtype, channels_last = amp_dtype(amp, device), device.type == "cuda"
    groups = {}
    for i, member in enumerate(members):
        groups.setdefault(json.dumps(member["preprocess"], sort_keys=True), []).append(i)
    results = [None] * len(members)
    for k, indices in enumerate(groups.values(), start=1):
        first = members[indices[0]]
        dataset = FaceDataset(samples, sources[load_size_of(first)], eval_transform(first["preprocess"]),
                              ckpt_io.label_schema(first))
        loader = make_loader(dataset, batch_size, workers, device=device)
        # NOTE: a group's models sit on the device together; five folds of an efficientnet_b3 take ~250 MB
        models = [prepare_model(ckpt_io.build_model(members[i]), device, channels_last) for i in indices]
        desc = f"predicting ({len(models)} model{'s' if len(models) > 1 else ''}" + (
            f", group {k}/{len(groups)})" if len(groups) > 1 else ")")
        for i, probs in zip(indices, predict_probs_many(models, loader, device, dtype, channels_last, tta, progress,
                                                        desc)):
            results[i] = probs
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
