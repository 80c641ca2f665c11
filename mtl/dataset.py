"""The torch Dataset, and the one function that turns a data folder (a DataSpec) into checked train/validation sets."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mtl import data, labels
from mtl.checks import check_fold, parse_age_range
from mtl.images import open_images
from mtl.splits import person_folds


class FaceDataset(Dataset):
    """Photos + task labels: each item is {image, mask, gender, age_group, age_years, index}; unknown labels are -1.

    The age groups are computed once here, by the run's LabelSchema (an age threshold is read as one). Rows
    normally share one transform; `oversampled` adds copies of some rows with a transform of their own.
    """

    def __init__(self, samples: pd.DataFrame, images, transform, schema: labels.LabelSchema | int | None = None):
        assert len(samples) == len(images), "samples and images must align"
        self.samples, self.images, self.transform = samples.reset_index(drop=True), images, transform
        self.schema = labels.as_schema(schema)
        self.mask = samples["mask"].to_numpy(np.int64)
        self.gender = samples["gender"].to_numpy(np.int64)
        self.age_years = samples["age"].to_numpy(np.int64)
        self.age_group = self.schema.group(self.age_years)
        self.transforms = [transform]
        self.transform_of = np.zeros(len(samples), dtype=np.int64)

    def __len__(self):
        return len(self.samples)

    def pixels(self, i) -> np.ndarray:
        """The photo as decoded at load size (RGB uint8), before any transform."""
        photo = self.images[i]
        return photo if photo.flags.writeable else np.array(photo)  # NOTE: transforms may write in place

    def __getitem__(self, i):
        image = self.transforms[self.transform_of[i]](image=self.pixels(i))["image"]
        return {"image": image, "mask": self.mask[i], "gender": self.gender[i], "age_group": self.age_group[i],
                "age_years": np.float32(self.age_years[i]), "index": i}

    def set_random_seed(self, seed: int):
        """Seed every augmentation pipeline (DataLoader workers call this)."""
        for transform in self.transforms:
            if hasattr(transform, "set_random_seed"):
                transform.set_random_seed(seed)

    def oversampled(self, rows, copies: int, transform) -> FaceDataset:
        """This dataset plus `copies` more of the given rows, those copies augmented by `transform`."""
        rows = np.asarray(rows, dtype=np.int64)
        index = np.concatenate([np.arange(len(self))] + [rows] * copies)
        out = FaceDataset(self.samples.iloc[index], self.images.take(index), self.transform, self.schema)
        out.transforms = self.transforms + [transform]
        out.transform_of = np.concatenate([self.transform_of[index[:len(self)]],
                                           np.full(len(rows) * copies, len(self.transforms))])
        return out

    def targets(self) -> dict:
        """All labels as tensors (for class weights, samplers and metrics)."""
        return {"mask": torch.as_tensor(self.mask), "gender": torch.as_tensor(self.gender),
                "age_group": torch.as_tensor(self.age_group),
                "age_years": torch.as_tensor(self.age_years, dtype=torch.float32)}

    def truth(self) -> dict:
        """The labels as numpy arrays, as metrics.score takes them: mask, gender, age_group, age_years."""
        return {"mask": self.mask, "gender": self.gender, "age_group": self.age_group, "age_years": self.age_years}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Which photos a run reads and how it splits them: the data folder, the person-level fold, and the fixes and
    extra tables applied on load (the keys of a TrainConfig that decide what data a run sees)."""
    root: str | os.PathLike
    folds: int = 5
    fold: int = 0
    seed: int = 42
    relabel: str | None = None  # a CSV of id,gender,age fixes
    drop_ages: str | None = None  # e.g. '57-59': left out of training only
    extra: tuple = ()  # partial-label CSVs added to training
    skip_bad: bool = False  # leave bad photos out instead of stopping

    @classmethod
    def of(cls, cfg, **changes) -> DataSpec:
        """The spec of a TrainConfig (or a checkpoint's config dict), with `changes` applied."""
        get = cfg.get if isinstance(cfg, dict) else (lambda key, default=None: getattr(cfg, key, default))
        values = {"root": get("data"), "folds": get("folds", 5), "fold": get("fold", 0), "seed": get("seed", 42),
                  "relabel": get("relabel"), "drop_ages": get("drop_ages"), "extra": tuple(get("extra") or ()),
                  "skip_bad": bool(get("skip_bad", False))}
        return cls(**{**values, **changes})


@dataclasses.dataclass
class FoldData:
    """Checked samples and their image sources for one person-level fold."""
    train_samples: pd.DataFrame
    val_samples: pd.DataFrame
    train_images: object
    val_images: object
    skipped: int = 0


def load_fold(spec: DataSpec, load_size, *, cache_dir=None, use_cache=True, workers=2, progress=True,
              log=print) -> FoldData:
    """Read, check and split the data a spec names, its photos decoded at load_size (through the cache unless
    use_cache is false): every problem is raised (or skipped) here, before any training.

    Validation holds the fold's competition people; training holds the other people (minus any
    --drop-ages) plus every extra-data photo.
    """
    check_fold(spec.folds, spec.fold)
    age_range = parse_age_range(spec.drop_ages)
    samples, problems = data.train_samples(spec.root, spec.relabel, log=log)
    data.raise_or_skip(problems, spec.skip_bad, log, "problem")
    skipped = len(problems)
    samples = pd.concat([samples, *(data.read_extra(path) for path in spec.extra)], ignore_index=True)
    images, problems = open_images(samples["image_path"], load_size, cache_dir=cache_dir, use_cache=use_cache,
                                   workers=workers, progress=progress, log=log)
    data.raise_or_skip(problems, spec.skip_bad, log, "bad photo")
    skipped += len(problems)
    good = np.flatnonzero(~samples["image_path"].isin({p.path for p in problems}).to_numpy())
    samples, images = samples.iloc[good].reset_index(drop=True), images.take(good)

    is_comp = (samples["source"] == "train").to_numpy()
    fold_of = np.full(len(samples), -1)
    fold_of[is_comp] = person_folds(samples[is_comp], spec.folds, spec.seed)
    is_train = fold_of != spec.fold
    if age_range is not None:
        dropped = is_train & samples["age"].between(*age_range).to_numpy()
        log(f"--drop-ages {age_range[0]}-{age_range[1]}: {int(dropped.sum())} photos of "
            f"{samples.loc[dropped, 'person_id'].nunique()} people left out of training")
        is_train &= ~dropped
    if not is_comp.all():
        log(f"extra data: {int((~is_comp).sum())} photos added to training")
    train_idx, val_idx = np.flatnonzero(is_train), np.flatnonzero(fold_of == spec.fold)
    return FoldData(samples.iloc[train_idx].reset_index(drop=True), samples.iloc[val_idx].reset_index(drop=True),
                    images.take(train_idx), images.take(val_idx), skipped)
