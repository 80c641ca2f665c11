#!/usr/bin/env python3
"""Quality of the recommended flow on real faces, across photo collections: every default ablated, over seeds.

Runs what a user is told to run (README, "Real data") and scores it where users need it, on people and photos the
model never saw. Prepared once per work folder (--work), then fixed for every run:

1. a proxy data set (../shared/tools/build_proxy.py) of --people UTKFace people (../shared/data/utkface-dev,
   real age and gender, drawn masks) and --eval-people other people as the eval set (eval_truth.csv);
2. `crop_faces` (data_tools/crop_faces.py) on its train and eval photos, at a crop size that suits the training
   size (128x128 for 112x112 training: the largest size any variant trains at, so no variant enlarges a crop);
3. two other collections, face-cropped by mtl/face_crop.py (the function predict.py runs on uncropped photos) with
   the settings the checkpoints record, saved as PNG (so the pixels are the built-in crop's):
   `facemask`: the half of ../shared/data/facemask-dev that is never imported as extra data (real worn,
   incorrectly worn and absent masks, mask label only); `chips`: the raw 200x200 UTKFace face chips of --chips
   further people used nowhere else (bare faces of another presentation, real gender and age).

Each variant then trains from the shared ImageNet weights (tf_efficientnet_lite0) on the cropped proxy at the
budget (112x112, 4 epochs, 2 workers, CPU; --full: every UTKFace person not held out, 240x320, 12 epochs,
batch 64, device auto), everything else from configs/default.yaml, and its best.pt is scored through predict.py's
code path (`predict_on`, the one place this script calls the prediction API) on:

- `val`: the run's validation people (fold 0 of 5; the fold moves with the seed);
- `eval`: the held-out people: 18-class macro F1, each task's F1, and the 18-class F1 with the age group read off
  the regressed age (age_reg_weight > 0);
- `fm` (facemask): accuracy on real worn and incorrectly worn masks, the share of bare faces answered "not wear",
  and the mask macro F1;
- `chips`: gender accuracy, age-group macro F1, and the share answered "not wear" (all of them are bare).

Every figure is scored at the true 60-year boundary: a model trained with --age-threshold 58 has its top group
read as 60+. Each figure is given raw and `_cal`: calibrated as predict.py answers, with the per-class offsets
training stored in best.pt (mtl.calibration, fitted on the run's validation people at the checkpoint's own
threshold, cross-validated by person, the heads of its `calibrate` setting); a run trained before training stored
them is calibrated here by the same fit on the same validation probabilities. probs.npz beside each best.pt keeps
every set's raw probabilities, so other calibrations can be compared without predicting again.

The cross-collection score `cross` (and `cross_cal`, from calibrated answers) is the mean of eval 18-class F1,
facemask real-mask accuracy, facemask bare faces answered "not wear", chips gender accuracy and chips age F1: one
number in which a gain on the proxy's own people cannot hide a loss on other photos. Winners are picked on
`cross_cal` (what users get once calibration is on by default), or `cross` where calibration is missing.

Variants (`--list`) change one setting each from `baseline`, which pins today's values (so the benchmark keeps its
meaning after configs/default.yaml changes); `defaults` is configs/default.yaml as it stands when run
(`--variants baseline defaults` is the before/after comparison); `+real_masks` adds the other facemask-dev half
as partial-label --extra data, so its facemask figures are not on an unseen collection (marked, never a winner).
The `age_reg_0+...` variants (round 2) change one setting more from `age_reg_0`, which equals configs/default.yaml
since 7075b39; `--against age_reg_0` reads their paired differences from it. `age_reg_0+real_masks` (round 3) is the
README's recipe with real photos, and `age_reg_0+real_masks+...` change one setting more from it. bench.recipe_targets
reads issue 22's targets off the kept runs.

Every variant runs over --seeds (the training seed, which also moves the person-level folds; the prepared data
stays fixed), interleaved: for each seed, every variant in an order shuffled by that seed. Each finished
(variant, seed) is kept as JSON in --work and skipped on a rerun (a kill loses at most the run in progress);
--rescore scores the kept best.pt files again (e.g. once calibration exists). The report gives per variant the
mean +- sd over seeds, and its paired difference from `baseline` (or --against; same seed, same fold): the mean
and sd of the per-seed differences, flagged `~` (within noise) when |mean difference| <= max(sd of the
differences, the reference's sd over seeds).

Cost on 2 CPU cores: preparing takes ~3.5 min once; one run at the default budget 5.7-7.8 min on a machine
shared with other jobs (16-47 training img/s), about 4.3 min idle, so every variant (`--list`) over 3 seeds takes ~8 h
alone on the machine. --work keeps every finished run, so it can be done in sittings (e.g. --seeds 0 1, then --seeds 2).

    python -m bench.recipe --work /tmp/recipe                          # everything: every variant x 3 seeds, CPU
    python -m bench.recipe --work /tmp/recipe --variants baseline defaults
    python -m bench.recipe --work /tmp/recipe --variants age_reg_0 age_reg_0+lr_1e-3 --against age_reg_0
    python -m bench.recipe --full --work /data/recipe                  # GPU budget
    python -m bench.recipe --list
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import table, write_json
from bench.real_faces import WEIGHTS, build_proxy, eval_truth, facemask_samples, predict_on, require_shared

NOT_WEAR = 2  # the mask label of a bare face (mtl.labels.MASK_NAMES)
TRUE_THRESHOLD = 60  # NOTE: every figure is scored at the competition's boundary, whatever a variant trains with
PROXY_SEED = 0  # the proxy's people and drawn masks: fixed, whatever the training seeds
MODEL = "tf_efficientnet_lite0"

# today's values (configs/default.yaml at the time this benchmark was written), pinned so `baseline` keeps meaning
# the same run after the defaults change; every variant but `defaults` starts here
TODAY_LOSSES = {"mask": {"name": "ce", "label_smoothing": 0.05}, "gender": {"name": "bce"},
                "age": {"name": "ce", "class_weights": "balanced", "label_smoothing": 0.05}, "joint": {"name": "ce"}}
BASELINE = {
    "age_threshold": 60, "drop_ages": None, "relabel": None, "extra": [], "folds": 5, "fold": 0,
    "load_size": None, "center_crop": None, "augment": "strong", "oversample_old": 0, "oversample_augment": "strong",
    "arch": "multihead", "head": "linear", "pretrained": True, "head_dropout": 0.2, "drop_path_rate": 0.1,
    "age_reg_weight": 0.1, "freeze_blocks": 0, "losses": TODAY_LOSSES, "loss_weights": [1.0, 1.0, 1.0],
    "loss_weighting": "fixed", "batch_size": 32, "lr": 3e-4, "weight_decay": 0.01, "layer_decay": 1.0,
    "warmup_epochs": 1.0, "eta_min": 1e-6, "grad_clip": 1.0, "accumulate": 1, "ema": 0.0, "sampler": "none",
    "mixup": 0.0, "cutmix": 0.0, "mix_prob": 0.5,
}


def _loss(task, **spec):
    return {"losses": {task: spec}}


# configs/default.yaml since 7075b39 is BASELINE with age regression off (the variant `age_reg_0`); variants named
# `age_reg_0+...` change one setting more, so their paired difference is read `--against age_reg_0`
NEW_DEFAULTS = "age_reg_0"


def _on_new_defaults(**change):
    return {"age_reg_weight": 0.0, **change}


# name -> the one change from BASELINE. Special keys: `img_scale` and `epoch_scale` scale the budget's image size
# and epochs (image size at equal pixels x epochs); `ema` "budget" takes the budget's decay; `extra_masks` imports
# the other facemask-dev half as partial-label extra data.
VARIANTS = {
    "baseline": {},
    "defaults": None,  # configs/default.yaml as it stands: no pins at all
    "mask_ls_0": _loss("mask", name="ce"),
    "age_ls_0": _loss("age", name="ce", class_weights="balanced"),
    "age_unbalanced": _loss("age", name="ce", label_smoothing=0.05),
    "age_reg_0": {"age_reg_weight": 0.0},
    "age_reg_0.3": {"age_reg_weight": 0.3},
    "augment_flip": {"augment": "flip"},
    "augment_baseline": {"augment": "baseline"},
    "lr_1e-3": {"lr": 1e-3},
    "lr_1e-4": {"lr": 1e-4},
    "warmup_0": {"warmup_epochs": 0.0},
    "head_dropout_0": {"head_dropout": 0.0},
    "drop_path_0": {"drop_path_rate": 0.0},
    "freeze_2": {"freeze_blocks": 2},  # lite0: the stem + stages 1-2 (stride 4; 0.5% of the trunk's weights)
    "freeze_4": {"freeze_blocks": 4},  # the stem + stages 1-4 (stride 16; 7.5% of the weights)
    "layer_decay_0.7": {"layer_decay": 0.7},
    "mixup_0.2": {"mixup": 0.2},
    "cutmix_1.0": {"cutmix": 1.0},
    "ema": {"ema": "budget"},
    "size_small": {"img_scale": 96 / 112, "epoch_scale": 5 / 4},  # 96x96, 5 epochs at the default budget
    "size_large": {"img_scale": 128 / 112, "epoch_scale": 3 / 4},  # 128x128, 3 epochs
    "age_threshold_58": {"age_threshold": 58},
    "age_threshold_59": {"age_threshold": 59},
    "drop_ages_57-59": {"drop_ages": "57-59"},
    "+real_masks": {"extra_masks": True},
    # round 2: one change from the new defaults
    "age_reg_0+mask_balanced": _on_new_defaults(**_loss("mask", name="ce", class_weights="balanced",
                                                        label_smoothing=0.05)),
    # halfway: the square root of the balanced weights at the competition's 5:1:1 (wear : incorrect : not wear)
    "age_reg_0+mask_sqrt_balanced": _on_new_defaults(**_loss("mask", name="ce", class_weights=[0.55, 1.23, 1.23],
                                                             label_smoothing=0.05)),
    "age_reg_0+ema": _on_new_defaults(ema="budget"),
    "age_reg_0+freeze_2": _on_new_defaults(freeze_blocks=2),
    "age_reg_0+head_dropout_0": _on_new_defaults(head_dropout=0.0),
    "age_reg_0+drop_path_0": _on_new_defaults(drop_path_rate=0.0),
    "age_reg_0+augment_baseline": _on_new_defaults(augment="baseline"),
    "age_reg_0+lr_1e-3": _on_new_defaults(lr=1e-3),
    "age_reg_0+warmup_0": _on_new_defaults(warmup_epochs=0.0),
    "age_reg_0+mixup_0.2": _on_new_defaults(mixup=0.2),
    "age_reg_0+size_small": _on_new_defaults(img_scale=96 / 112, epoch_scale=5 / 4),
    "age_reg_0+augment_flip": _on_new_defaults(augment="flip"),
    "age_reg_0+cutmix_1.0": _on_new_defaults(cutmix=1.0),
    "age_reg_0+layer_decay_0.7": _on_new_defaults(layer_decay=0.7),
    # round 3: the recipe with real data (README "Real data"), then one change more from it
    "age_reg_0+real_masks": _on_new_defaults(extra_masks=True),
    "age_reg_0+real_masks+lr_1e-3": _on_new_defaults(extra_masks=True, lr=1e-3),
    "age_reg_0+real_masks+mask_sqrt_balanced": _on_new_defaults(
        extra_masks=True, **_loss("mask", name="ce", class_weights=[0.55, 1.23, 1.23], label_smoothing=0.05)),
}
# variants trained on the other facemask-dev half: their facemask figures are not on an unseen collection
NOT_UNSEEN = {name for name, change in VARIANTS.items() if (change or {}).get("extra_masks")}
MAX_IMG_SCALE = max(v.get("img_scale", 1.0) for v in VARIANTS.values() if v)

# what the report shows: (key, header); every key has a `_cal` twin where calibration applies
SAME_SOURCE = [("cross", "cross"), ("cross_cal", "cross cal"), ("eval_f1", "eval F1"), ("eval_f1_cal", "eval F1 cal"),
               ("eval_mask_f1", "eval mask F1"), ("eval_gender_f1", "eval gender F1"), ("eval_age_f1", "eval age F1"),
               ("eval_f1_age_reg", "eval F1, age from regression"), ("val_f1", "val F1"), ("train_min", "train min")]
OTHER_COLLECTIONS = [("fm_real_mask_acc", "fm real-mask acc"), ("fm_real_mask_acc_cal", "fm real-mask acc cal"),
                     ("fm_bare_not_wear", "fm bare as not wear"), ("fm_bare_not_wear_cal", "fm bare as not wear cal"),
                     ("fm_mask_f1", "fm mask F1"), ("fm_mask_f1_cal", "fm mask F1 cal"),
                     ("chips_gender_acc", "chips gender acc"), ("chips_gender_acc_cal", "chips gender acc cal"),
                     ("chips_age_f1", "chips age F1"), ("chips_age_f1_cal", "chips age F1 cal"),
                     ("chips_not_wear", "chips not wear"), ("chips_not_wear_cal", "chips not wear cal")]
DIFFERENCES = ["cross", "cross_cal", "eval_f1", "eval_f1_cal", "val_f1", "fm_real_mask_acc", "fm_bare_not_wear",
               "chips_gender_acc", "chips_age_f1"]
CROSS_PARTS = ("eval_f1", "fm_real_mask_acc", "fm_bare_not_wear", "chips_gender_acc", "chips_age_f1")


# ---------------------------------------------------------------- budget and variants
@dataclasses.dataclass
class Budget:
    """What every variant shares: data sizes, training length and machine settings."""
    people: int | None  # training people; None: every UTKFace person not held out
    eval_people: int
    chips: int
    img_size: list
    epochs: int
    batch_size: int | None  # None: the variant's (baseline's pin, or configs/default.yaml's for `defaults`)
    workers: int
    device: str
    ema: float  # the `ema` variant's decay: about a third of the run's optimizer steps as its time constant

    @property
    def crop_size(self) -> list:
        """The face-crop size: the largest any variant trains at, so no variant enlarges its photos."""
        return scaled(self.img_size, MAX_IMG_SCALE)


def scaled(size, factor) -> list:
    return [int(round(s * factor)) for s in size]


def budget_from_args(args) -> Budget:
    full = args.full
    return Budget(people=args.people if args.people is not None else (None if full else 400),
                  eval_people=args.eval_people if args.eval_people is not None else (500 if full else 100),
                  chips=args.chips if args.chips is not None else (500 if full else 300),
                  img_size=args.img_size or ([240, 320] if full else [112, 112]),
                  epochs=args.epochs or (12 if full else 4),
                  batch_size=args.batch_size or (64 if full else None), workers=args.workers,
                  device=args.device or ("auto" if full else "cpu"), ema=0.999 if full else 0.99)


def variant_overrides(name: str, budget: Budget) -> dict:
    """The config keys a variant sets at a budget (BASELINE + its change, or nothing for `defaults`), resolved."""
    change = dict(VARIANTS[name] or {})
    values = {} if VARIANTS[name] is None else {**BASELINE, **change}
    if "losses" in change:
        values["losses"] = {**BASELINE["losses"], **change["losses"]}
    values["img_size"] = scaled(budget.img_size, values.pop("img_scale", 1.0))
    values["epochs"] = max(1, int(round(budget.epochs * values.pop("epoch_scale", 1.0))))
    if values.get("ema") == "budget":
        values["ema"] = budget.ema
    if budget.batch_size:
        values["batch_size"] = budget.batch_size
    return values


def describe(name: str, budget: Budget) -> str:
    """A variant's exact change from baseline, as --list prints it."""
    if VARIANTS[name] is None:
        return "configs/default.yaml as it stands (no pins), at the budget"
    base, mine = variant_overrides("baseline", budget), variant_overrides(name, budget)
    changed = {k: v for k, v in mine.items() if base.get(k) != v and k not in ("extra_masks", "losses")}
    changed.update({f"losses.{task}": spec for task, spec in mine["losses"].items()
                    if base["losses"].get(task) != spec})
    if mine.get("extra_masks"):
        changed["extra"] = "[the other facemask-dev half, face-cropped: mask label only]"
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "today's values pinned: " + ", ".join(
        f"{k}={v}" for k, v in base.items())


def plan(variants, seeds) -> list[tuple[str, int]]:
    """(variant, seed) in run order: seed by seed, every variant in an order shuffled by that seed."""
    order = []
    for seed in seeds:
        names = list(variants)
        random.Random(seed).shuffle(names)
        order += [(name, seed) for name in names]
    return order


# ---------------------------------------------------------------- prepared once per work folder
@dataclasses.dataclass
class Prepared:
    """The fixed inputs of every run: the cropped proxy, the eval people and the two other collections."""
    data: Path
    eval_samples: object
    eval_truth: dict
    facemask: object  # sample table of the cropped facemask-dev half never trained on
    chips: object
    chips_truth: dict
    facemask_extra: Path | None  # partial-label CSV of the other half, cropped (only for NOT_UNSEEN variants)


def check_work(work: Path, settings: dict):
    """Record the budget a work folder's data and kept results were made with; a rerun with another is one line."""
    from mtl.io import atomic_write_text
    record = work / "prepared.json"
    if record.is_file():
        old = json.loads(record.read_text())
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            flags = {"crop_size": "a face-crop size of", "proxy_seed": "proxy seed"}
            sys.exit(f"error: --work {work} was prepared with " + ", ".join(
                f"{flags.get(k, '--' + k.replace('_', '-'))} {old.get(k)}" for k in changed)
                + " (now " + ", ".join(str(settings[k]) for k in changed) + "); pass the same budget or choose "
                "another --work")
    else:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(settings, indent=2), record)


def prepare(work: Path, budget: Budget, real_masks: bool, log=print) -> Prepared:
    """Build, crop and list everything the runs share, each step once per work folder (a kill redoes only it)."""
    from data_tools.crop_faces import crop_dataset
    from mtl import data as data_io
    from mtl.io import atomic_write_text
    check_work(work, {"people": budget.people, "eval_people": budget.eval_people, "chips": budget.chips,
                      "proxy_seed": PROXY_SEED, "crop_size": budget.crop_size, "img_size": budget.img_size,
                      "epochs": budget.epochs, "batch_size": budget.batch_size})  # NOTE: kept results mean these
    proxy_done = work / "proxy.done"
    if not proxy_done.is_file():
        for partial in ("proxy", "faces_train", "faces_eval", "faces_held_out"):
            shutil.rmtree(work / partial, ignore_errors=True)
        people = budget.people if budget.people is not None else 10 ** 6
        log(f"building the proxy: {people if budget.people else 'every'} training and {budget.eval_people} eval "
            f"people, {budget.chips} more held out as chips")
        build_proxy(work, people, budget.eval_people, PROXY_SEED, held_out=budget.chips)
        atomic_write_text("done\n", proxy_done)
    data = work / "faces"
    if not (data / data_io.FACE_CROP_RECORD).is_file():  # NOTE: crop_faces resumes where a kill stopped it
        log(f"crop_faces on the proxy's train and eval photos at {budget.crop_size[0]}x{budget.crop_size[1]}")
        crop_dataset(work / "proxy", data, size=budget.crop_size, device=budget.device, workers=budget.workers,
                     progress=False, log=log)
    record = data_io.read_face_crop_record(data)
    _, eval_samples = data_io.eval_samples(data)
    facemask = cropped_collection(work, "facemask_test", facemask_samples("test"), record, budget, log)
    chips = cropped_collection(work, "chips", chip_samples(work / "faces_held_out"), record, budget, log)
    extra = None
    if real_masks:
        train_half = cropped_collection(work, "facemask_train", facemask_samples("train"), record, budget, log)
        extra = work / "facemask_train_extra.csv"
        if not extra.is_file():
            data_io.write_extra(train_half, extra)
    return Prepared(data=data, eval_samples=eval_samples, eval_truth=eval_truth(data, eval_samples),
                    facemask=facemask, chips=chips, chips_truth=truth_of(chips), facemask_extra=extra)


def chip_samples(folder: Path):
    """The raw UTKFace chips of the held-out people as a sample table: bare faces (mask: not wear), gender, age."""
    from mtl import data as data_io
    rows = []
    for path in sorted(folder.iterdir()):
        age, gender = (int(v) for v in path.name.split("_")[:2])
        rows.append((str(path), f"chip:{path.name}", path.name, NOT_WEAR, gender, age, "chips"))
    return data_io.sample_table(rows)


def truth_of(samples) -> dict:
    return {"mask": samples["mask"].to_numpy(), "gender": samples["gender"].to_numpy(),
            "age_years": samples["age"].to_numpy()}


def cropped_collection(work: Path, name: str, samples, record: dict, budget: Budget, log=print):
    """The samples with each photo replaced by its face crop (mtl.face_crop, the checkpoints' settings, PNG), made once.

    work/<name>.csv (written last) lists them; a rerun after a kill crops only the photos not yet written.
    """
    import pandas as pd

    from data_tools.crop_faces import crop_photos
    from mtl.face_crop import detector_for
    from mtl.io import atomic_write_csv
    listing = work / f"{name}.csv"
    if listing.is_file():
        return pd.read_csv(listing)
    folder = work / f"{name}_faces"
    targets = [folder / f"{i:05d}_{Path(p).stem}.png" for i, p in enumerate(samples["image_path"])]
    todo = [i for i, t in enumerate(targets) if not t.is_file()]
    log(f"face-cropping {len(todo)} photos of {name} ({len(samples)} in all)")
    if todo:
        crop_photos([samples["image_path"][i] for i in todo], [targets[i] for i in todo],
                    detector_for(record, budget.device), record, budget.workers, progress=False)
    cropped = samples.assign(image_path=[str(t) for t in targets])
    atomic_write_csv(cropped, listing)
    return cropped


# ---------------------------------------------------------------- one run
def val_samples(cfg):
    """The run's validation people (as mtl.dataset.load_fold draws them: person-level fold of the proxy's people)."""
    from mtl import data as data_io
    from mtl.splits import person_folds
    samples, _ = data_io.train_samples(cfg.data, log=lambda *_: None)
    return samples[person_folds(samples, cfg.folds, cfg.seed) == cfg.fold].reset_index(drop=True)


def train_run(name: str, seed: int, budget: Budget, prepared: Prepared, work: Path, log=print) -> dict:
    """Train one (variant, seed) into work/runs/<variant>/seed<k> (anything a killed run left there is removed)."""
    from mtl import config
    from mtl.io import atomic_write_text
    from mtl.train import train
    out = run_folder(work, name, seed)
    shutil.rmtree(out, ignore_errors=True)
    values = variant_overrides(name, budget)
    if values.pop("extra_masks", False):
        values["extra"] = [str(prepared.facemask_extra)]
    cfg = config.build({**values, "data": str(prepared.data), "out": str(out), "cache_dir": str(work / "cache"),
                        "model": MODEL, "pretrained_file": str(WEIGHTS), "seed": seed, "workers": budget.workers,
                        "device": budget.device, "patience": 0, "log_images": 0, "progress": False})
    t0 = time.time()
    result = train(cfg, log=lambda line: log(f"    {line}"))
    facts = {"train_min": (time.time() - t0) / 60, "best_epoch": result.best_epoch,
             "val_f1_at_own_threshold": result.best_f1, "config": cfg.to_dict()}
    atomic_write_text(json.dumps(facts, indent=2), out / "train.json")
    (out / "last.pt").unlink(missing_ok=True)  # NOTE: best.pt stays for --rescore; last.pt only resumes
    return facts


def run_folder(work: Path, name: str, seed: int) -> Path:
    return work / "runs" / name / f"seed{seed}"


def score_run(name: str, seed: int, budget: Budget, prepared: Prepared, work: Path) -> dict:
    """Every figure of one trained (variant, seed), raw and calibrated, from its best.pt."""
    from mtl import config
    out = run_folder(work, name, seed)
    facts = json.loads((out / "train.json").read_text())
    cfg = config.build(facts["config"])
    val = val_samples(cfg)
    tables = {"val": val, "eval": prepared.eval_samples, "fm": prepared.facemask, "chips": prepared.chips}
    probs, schema = {}, None
    for where, samples in tables.items():
        probs[where], schema = predict_on(out / "best.pt", samples, str(work / "cache"), budget.workers, budget.device)
    val_truth = truth_of(val)
    keep_probs(out / "probs.npz", probs, val_truth, val["person_id"].to_numpy())
    kept = ("train_min", "best_epoch", "val_f1_at_own_threshold")
    row = {"variant": name, "seed": seed, **{k: facts[k] for k in kept},
           "val_f1": figures("val", probs["val"], val_truth)["val_f1"]}
    calibrated, row["calibration"] = calibrate(out / "best.pt", cfg, probs, val_truth, val["person_id"], schema)
    for suffix, these in (("", probs), ("_cal", calibrated)):
        if these is None:
            continue
        row.update({k + suffix: v for k, v in collection_figures(these, prepared).items()})
    row["calibrated"] = calibrated is not None
    row["facemask_unseen"] = name not in NOT_UNSEEN
    return row


def keep_probs(path: Path, probs: dict, val_truth: dict, val_people) -> None:
    """Every set's raw probabilities, the val truth and val people, beside best.pt: calibration methods can be
    compared on them later without predicting again."""
    import numpy as np

    from mtl.io import atomic_path
    arrays = {f"{where}/{k}": np.asarray(v) for where, p in probs.items() for k, v in p.items()}
    arrays.update({f"val_truth/{k}": np.asarray(v) for k, v in val_truth.items()})
    arrays["val_people"] = np.asarray(val_people).astype(str)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def read_probs(path: Path) -> tuple[dict, dict, object]:
    """What keep_probs wrote: (every set's probabilities, the val truth, the val person ids)."""
    import numpy as np
    probs, truth = {}, {}
    with np.load(path) as npz:
        people = npz["val_people"]
        for key in npz.files:
            if key != "val_people":
                where, name = key.split("/", 1)
                (truth if where == "val_truth" else probs.setdefault(where, {}))[name] = npz[key]
    return probs, truth, people


def collection_figures(probs: dict, prepared: Prepared) -> dict:
    """The eval, fm and chips figures of one run's answers, and their cross-collection score `cross`."""
    row = {}
    for where, truth in (("eval", prepared.eval_truth), ("fm", None), ("chips", prepared.chips_truth)):
        row.update(figures(where, probs[where], truth, prepared.facemask))
    row["cross"] = float(sum(row[k] for k in CROSS_PARTS) / len(CROSS_PARTS))
    return row


def calibrate(best: Path, cfg, probs: dict, val_truth: dict, val_people, schema) -> tuple[dict, dict]:
    """(every set's probabilities calibrated as predict.py answers, the record with its source).

    The offsets are those training stored in best.pt (fitted on the val people, cross-validated by person, the
    heads of `calibrate`); a checkpoint trained before training fitted them gets the same fit here, on the
    same val probabilities (those of its best epoch) with the same settings."""
    from mtl import calibration
    from mtl import checkpoint as ckpt_io
    fitted, source = ckpt_io.calibration_of(ckpt_io.load(best)), "checkpoint"
    if fitted is None:
        fitted = calibration.fit(probs["val"], val_truth, schema, groups=val_people.to_numpy(), tasks=cfg.calibrate)
        source = "fitted here as training fits it"
    return {where: calibration.apply(p, fitted) for where, p in probs.items()}, {**fitted.to_dict(), "source": source}


def figures(where: str, probs: dict, truth: dict | None, facemask=None) -> dict:
    """The benchmark's figures of one set, all at the true 60-year boundary."""
    import numpy as np
    from sklearn.metrics import accuracy_score

    from mtl import labels
    from mtl.metrics import macro_f1, predict_classes, score
    mask, gender, age = labels.decode(predict_classes(probs))
    if where in ("val", "eval"):
        s = score(probs, truth, TRUE_THRESHOLD)
        keys = ("f1", "mask_f1", "gender_f1", "age_f1", "f1_age_reg", "age_reg_f1") if where == "eval" else ("f1",)
        return {f"{where}_{k}": s[k] for k in keys if k in s}
    if where == "fm":
        true_mask = facemask["mask"].to_numpy()
        masked = true_mask != NOT_WEAR
        return {"fm_real_mask_acc": float(np.mean(mask[masked] == true_mask[masked])),
                "fm_bare_not_wear": float(np.mean(mask[~masked] == NOT_WEAR)),
                "fm_mask_f1": macro_f1(true_mask, mask)}
    true_age = labels.age_group(truth["age_years"], TRUE_THRESHOLD)
    return {"chips_gender_acc": float(accuracy_score(truth["gender"], gender)),
            "chips_age_f1": macro_f1(true_age, age), "chips_not_wear": float(np.mean(mask == NOT_WEAR))}


# ---------------------------------------------------------------- the report
def mean_sd(values) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def summarize(rows: list[dict], variants, against: str = "baseline") -> tuple[list, list]:
    """(per-variant means and sds over seeds, per-variant paired differences from `against` with the noise flag)."""
    by = {}
    for row in rows:
        by.setdefault(row["variant"], {})[row["seed"]] = row
    keys = [k for k, _ in SAME_SOURCE + OTHER_COLLECTIONS] + ["eval_age_reg_f1"]
    summary = []
    for name in variants:
        runs = by.get(name, {})
        if not runs:
            continue
        entry = {"variant": name, "seeds": sorted(runs), "facemask_unseen": name not in NOT_UNSEEN}
        for key in keys:
            mean, sd = mean_sd([r.get(key) for r in runs.values()])
            entry[key], entry[key + "_sd"] = mean, sd
        summary.append(entry)
    differences = []
    base = by.get(against, {})
    for name in variants:
        if name == against or name not in by:
            continue
        entry = {"variant": name}
        for key in DIFFERENCES:
            paired = [by[name][s][key] - base[s][key] for s in sorted(by[name]) if s in base
                      and by[name][s].get(key) is not None and base[s].get(key) is not None]
            if not paired:
                continue
            mean, sd = mean_sd(paired)
            base_sd = mean_sd([base[s].get(key) for s in base])[1]
            noise = max(sd, base_sd)
            entry[key] = {"mean": mean, "sd": sd, "seeds": len(paired), "noise": noise,
                          "within_noise": abs(mean) <= noise}
        differences.append(entry)
    return summary, differences


def cell(mean, sd) -> str:
    return "n/a" if mean is None or math.isnan(mean) else f"{mean:.3f} ± {sd:.3f}"


def diff_cell(d) -> str:
    if d is None:
        return ""
    return f"{d['mean']:+.3f} ± {d['sd']:.3f}" + (" ~" if d["within_noise"] else "")


def tables(summary, differences, against: str = "baseline") -> str:
    """The report as Markdown: same-source figures, other collections, paired differences from `against`."""
    out = []
    for title, columns in (("Same source (UTKFace people) and the cross-collection score", SAME_SOURCE),
                           ("Other collections (facemask-dev half never trained on; raw UTKFace chips)",
                            OTHER_COLLECTIONS)):
        rows = [{"variant": e["variant"] + ("" if e["facemask_unseen"] else " (fm seen)"), "seeds": len(e["seeds"]),
                 **{header: cell(e[k], e[k + "_sd"]) for k, header in columns}} for e in summary]
        out += [f"### {title} (mean ± sd over seeds)", "", table(rows, ["variant", "seeds"] + [h for _, h in columns]),
                ""]
    if differences:
        rows = [{"variant": d["variant"], **{k: diff_cell(d.get(k)) for k in DIFFERENCES}} for d in differences]
        out += [f"### Paired difference from {against} (same seed and fold: mean ± sd; ~ within noise)", "",
                table(rows, ["variant"] + DIFFERENCES), ""]
    return "\n".join(out)


# ---------------------------------------------------------------- main
def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                        help="variants to run (default: all; --list shows them)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--against", default="baseline", choices=list(VARIANTS), metavar="NAME",
                        help="the variant the paired differences are taken from (default baseline; age_reg_0 for "
                             "the age_reg_0+... variants); it must be among --variants")
    parser.add_argument("--list", action="store_true", help="print every variant's exact change and exit")
    budget = parser.add_argument_group("budget (defaults: CPU; --full: GPU)")
    budget.add_argument("--full", action="store_true", help="every UTKFace person not held out, 240x320, 12 epochs, "
                                                            "batch 64, 500 eval people, 500 chips, device auto")
    budget.add_argument("--people", type=int, help="training people (default 400)")
    budget.add_argument("--eval-people", type=int, help="held-out eval people (default 100)")
    budget.add_argument("--chips", type=int, help="further people whose raw chips are scored (default 300)")
    budget.add_argument("--img-size", type=int, nargs=2, metavar=("W", "H"), help="default 112 112")
    budget.add_argument("--epochs", type=int, help="default 4")
    budget.add_argument("--batch-size", type=int, help="default: the variant's (32 today)")
    budget.add_argument("--workers", type=int, default=2)
    budget.add_argument("--device", help="default cpu (--full: auto)")
    parser.add_argument("--work", help="work folder: prepared data and every finished run, kept for reruns "
                                       "(default: a new temporary folder, removed at the end)")
    parser.add_argument("--rescore", action="store_true", help="score the runs kept in --work again (their best.pt)")
    parser.add_argument("--out", default="bench/results/recipe.json")
    return parser


def check_args(args, parser):
    for flag in ("people", "eval_people", "chips", "epochs", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.img_size and min(args.img_size) < 16:
        parser.error(f"--img-size must be at least 16 16, got {args.img_size}")
    if args.workers < 0:
        parser.error(f"--workers must be at least 0, got {args.workers}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds lists a seed twice: {args.seeds}")
    if args.against not in args.variants:
        parser.error(f"--against {args.against} is not among --variants: run it beside them (paired by seed)")
    if args.rescore and not args.work:
        parser.error("--rescore needs --work (the folder that holds the runs)")


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    budget = budget_from_args(args)
    if args.list:
        width = max(map(len, VARIANTS))
        for name in VARIANTS:
            print(f"{name:{width}s}  {describe(name, budget)}")
        return
    require_shared()
    people = budget.people or "every"
    print(f"budget: {people} training / {budget.eval_people} eval people, {budget.chips} chips, "
          f"{budget.img_size[0]}x{budget.img_size[1]}, {budget.epochs} epochs, device {budget.device}; "
          f"{len(args.variants)} variants x {len(args.seeds)} seeds", flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mtl-bench-recipe-"))
    t_prepare = time.time()
    prepared = prepare(work, budget, any(name in NOT_UNSEEN for name in args.variants))
    print(f"prepared in {minutes(time.time() - t_prepare)}", flush=True)
    from mtl.io import atomic_write_text
    runs, rows = plan(args.variants, args.seeds), []
    todo = [(n, s) for n, s in runs if args.rescore or not result_path(work, n, s).is_file()]
    t0, spent, done = time.time(), [], 0
    for k, (name, seed) in enumerate(runs, start=1):
        path = result_path(work, name, seed)
        if (name, seed) not in todo:
            rows.append(json.loads(path.read_text()))
            continue
        eta = f"ETA {minutes(sum(spent) / len(spent) * (len(todo) - done))}" if spent else "ETA after the first run"
        print(f"[{k}/{len(runs)}] {name} seed {seed}: elapsed {minutes(time.time() - t0)}, {eta}", flush=True)
        started = time.time()
        folder = run_folder(work, name, seed)
        if not ((folder / "train.json").is_file() and (folder / "best.pt").is_file()):
            if args.rescore:
                print("    no trained run kept: skipped", flush=True)
                done += 1
                continue
            train_run(name, seed, budget, prepared, work)
        row = score_run(name, seed, budget, prepared, work)
        atomic_write_text(json.dumps(row, indent=2), path)
        rows.append(row)
        done += 1
        spent.append(time.time() - started)
        cal = row["calibration"]
        calibrated = (f"; calibrated: eval F1 {row['eval_f1_cal']:.3f}, cross {row['cross_cal']:.3f} (val F1 "
                      f"{cal['f1_before']:.3f} -> {cal['f1_after']:.3f} where fitted)") if cal else "; no calibration"
        print(f"    done in {minutes(spent[-1])}: eval F1 {row['eval_f1']:.3f}, cross {row['cross']:.3f}{calibrated}",
              flush=True)
    summary, differences = summarize(rows, args.variants, args.against)
    report = tables(summary, differences, args.against)
    print("\n" + report)
    if rows and not all(r["calibrated"] for r in rows):
        print("note: mtl.calibration was not available for every run: the `cal` figures are missing (n/a) there")
    settings = {**dataclasses.asdict(budget), "crop_size": budget.crop_size, "variants": args.variants,
                "seeds": args.seeds, "against": args.against, "proxy_seed": PROXY_SEED, "model": MODEL,
                "true_threshold": TRUE_THRESHOLD}
    path = write_json({"settings": settings,
                       "variants": {n: describe(n, budget) for n in args.variants},
                       "cross_score": "mean of " + ", ".join(CROSS_PARTS),
                       "noise_rule": "within noise when |mean paired difference| <= max(sd of the paired "
                                     f"differences, {args.against}'s sd over seeds)",
                       "summary": summary, "differences": differences, "per_seed": rows, "report": report}, args.out)
    print(f"\nwritten {path}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def result_path(work: Path, name: str, seed: int) -> Path:
    """Where a finished (variant, seed) keeps its figures; its folder is made here."""
    folder = work / "results"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}__seed{seed}.json"


if __name__ == "__main__":
    main()
