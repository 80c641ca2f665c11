#!/usr/bin/env python3
"""Quality on real faces: the three architectures and two multi-head options, same budget and seed.

Builds a real-face data set in the competition layout with ../shared/tools/build_proxy.py from
../shared/data/utkface-dev (real photos, real age and gender labels, drawn masks): a random subset
of people for training (validated on person-level fold 0) and other people as the eval set. Each
variant trains on the same fold with the same budget and seed, on the real pretrained
tf_efficientnet_lite0 trunk (../shared/weights), and is scored three ways:

- `val`: held-out people of the training fold (same photo source);
- `eval`: the other people of the eval set, predicted by predict.py's code path;
- `masks`: real masked faces of another photo collection (../shared/data/facemask-dev, mask label
  only): mask accuracy and macro F1 on photos unlike the training ones. Scored on every second
  photo of each class folder; the other half is the external data of the `+real_masks` variant
  (mask label only, gender and age unknown), the remedy the data tools exist for.

A variant whose run folder already holds `train_row.json` (from `--work DIR`) is not trained
again with `--reuse`, only scored again.

    python -m bench.real_faces                        # CPU budget: ~10-20 minutes per variant
    python -m bench.real_faces --full --device cuda   # every person, larger photos, more epochs
    python -m bench.real_faces --variants multihead joint18
"""
from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import SHARED, table, write_json

VARIANTS = {
    "multihead": {"arch": "multihead"},
    "joint18": {"arch": "joint18"},
    "separate": {"arch": "separate"},
    "multihead+age_reg": {"arch": "multihead", "age_reg_weight": 0.1},
    "multihead+uncertainty": {"arch": "multihead", "loss_weighting": "uncertainty"},
    "multihead+real_masks": {"arch": "multihead", "extra_masks": True},
}
UTKFACE = SHARED / "data" / "utkface-dev"
FACEMASK = SHARED / "data" / "facemask-dev"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"
BUILD_PROXY = SHARED / "tools" / "build_proxy.py"


def require_shared():
    """Stop with one line unless ../shared holds what the real-face benchmarks read."""
    for needed in (UTKFACE, FACEMASK, WEIGHTS, BUILD_PROXY):
        if not needed.exists():
            sys.exit(f"error: {needed} not found: this benchmark reads ../shared (real faces, weights)")


def build_proxy(work: Path, train_people: int, eval_people: int, seed: int, held_out: int = 0) -> Path:
    """A proxy data set of randomly drawn UTKFace people: train/ from some, eval/ (+ eval_truth.csv) from others.

    held_out further people (no proxy made of them) are linked into work/faces_held_out for other uses.
    """
    files = sorted(p for p in UTKFACE.iterdir() if p.name.endswith(".jpg") or p.name.endswith(".chip.jpg"))
    random.Random(seed).shuffle(files)
    total = min(len(files) - held_out, train_people + eval_people)
    picks = {"train": files[: total - eval_people], "eval": files[total - eval_people: total],
             "held_out": files[total: total + held_out]}
    data = work / "proxy"
    for mode, chosen in picks.items():
        if not chosen and mode == "held_out":
            continue
        faces = work / f"faces_{mode}"
        faces.mkdir(parents=True, exist_ok=True)
        for p in chosen:
            (faces / p.name).symlink_to(p)
        if mode != "held_out":
            subprocess.run([sys.executable, str(BUILD_PROXY), str(faces), str(data), "--mode", mode, "--seed",
                            str(seed)], check=True)
    return data


def eval_truth(data: Path, samples) -> dict:
    """The true labels of the proxy's eval photos (eval_truth.csv), in the sample table's order, as score takes them."""
    import pandas as pd
    truth = pd.read_csv(data / "eval_truth.csv").set_index("ImageID").loc[samples["person_id"]]
    return {"mask": truth["mask"].to_numpy(), "gender": truth["gender"].to_numpy(),
            "age_years": truth["age"].to_numpy()}


def facemask_samples(half: str):
    """Half of the facemask-dev photos as a sample table (mask label only): 'train' even rows, 'test' odd ones.

    Rows are sorted within each class folder, so both halves keep the class mix.
    """
    from data_tools.import_faces import read_folders
    from mtl.data import sample_table
    rows, _ = read_folders(FACEMASK)
    table = sample_table([(str(p), person, Path(p).stem, m, g, a, "facemask") for p, person, m, g, a in rows])
    table = table.sort_values(["mask", "image_path"], kind="stable").reset_index(drop=True)
    return table.iloc[{"train": 0, "test": 1}[half]::2].reset_index(drop=True)


def predict_on(checkpoint_path, samples, cache_dir, workers, device) -> tuple[dict, object]:
    """(per-task probabilities, LabelSchema) of a checkpoint on a sample table, through predict.py's code path."""
    from mtl.members import load_members, open_sources, predict_members
    member = load_members([str(checkpoint_path)])[0]
    sources, problems = open_sources(list(samples["image_path"]), [member.load_size], cache_dir=cache_dir,
                                     workers=workers, progress=False)
    if problems:
        raise RuntimeError(f"{len(problems)} bad photo(s), e.g. {problems[0]}")
    probs = predict_members([member], samples, sources, workers=workers, device=device, progress=False)[0]
    return probs, member.schema


def train_variant(name, options, args, data, work) -> dict:
    """Train one variant (or, with --reuse, take its earlier run); the row of its training facts."""
    import json

    from mtl import config
    from mtl import data as data_io
    from mtl.io import atomic_write_text
    from mtl.train import train
    options = dict(options)
    out = work / "runs" / name
    if args.reuse and (out / "train_row.json").is_file():
        print(f"reusing {out}", flush=True)
        return json.loads((out / "train_row.json").read_text())
    if options.pop("extra_masks", False):
        extra = work / "facemask_train_half.csv"
        data_io.write_extra(facemask_samples("train"), extra)
        options["extra"] = [str(extra)]
    cfg = config.build({
        "data": str(data), "out": str(work / "runs" / name), "cache_dir": str(work / "cache"),
        "model": "tf_efficientnet_lite0", "pretrained_file": str(WEIGHTS), "img_size": args.img_size,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "workers": args.workers,
        "seed": args.seed, "folds": 5, "fold": 0, "augment": "strong", "device": args.device, "patience": 0,
        # NOTE: every setting not named comes from configs/default.yaml; these keep the measured runs' meaning
        "losses": {"mask": {"name": "ce"}, "age": {"name": "ce", "class_weights": "balanced"}}, "age_reg_weight": 0.0,
        "progress": not args.quiet,
        "log_images": 8, **options})
    t0 = time.time()
    result = train(cfg, log=print)
    minutes = (time.time() - t0) / 60
    row = {"variant": name, "train_min": minutes, "best_epoch": result.best_epoch,
           "best": str(Path(result.out) / "best.pt"), "cache_dir": cfg.cache_dir}
    row.update({f"val_{k}": v for k, v in result.metrics.items() if k in ("f1", "mask_f1", "gender_f1", "age_f1",
                                                                             "age_acc", "gender_acc", "age_reg_f1")})
    atomic_write_text(json.dumps(row, indent=2), out / "train_row.json")
    return row


def score_variant(row, args, data) -> dict:
    """The row plus the eval-people and real-masks scores of the variant's best checkpoint."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    from mtl import data as data_io
    from mtl.metrics import score
    row, best = dict(row), row["best"]
    _, eval_samples = data_io.eval_samples(data)
    probs, schema = predict_on(best, eval_samples, row["cache_dir"], args.workers, args.device)
    eval_metrics = score(probs, eval_truth(data, eval_samples), schema)
    row.update({f"eval_{k}": eval_metrics[k] for k in ("f1", "acc", "mask_f1", "gender_f1", "age_f1", "age_acc")})
    masks = facemask_samples("test")
    pred = predict_on(best, masks, row["cache_dir"], args.workers, args.device)[0]["mask"].argmax(1)
    row["masks_acc"] = float(accuracy_score(masks["mask"], pred))
    row["masks_f1"] = float(f1_score(masks["mask"], pred, average="macro"))
    row["masks_bare_as_masked"] = float(np.mean(pred[masks["mask"].to_numpy() == 2] != 2))
    for where in ("best", "cache_dir"):  # NOTE: paths in the work folder, gone after the run
        row.pop(where)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--people", type=int, default=400, help="training people (fold 0 of 5 validates)")
    parser.add_argument("--eval-people", type=int, default=100)
    parser.add_argument("--img-size", type=int, nargs=2, default=[96, 128], metavar=("W", "H"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full", action="store_true",
                        help="GPU budget: every UTKFace person, 240x320 photos, 12 epochs")
    parser.add_argument("--work", help="work folder (default: a new temporary folder, removed at the end)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --work: score again, without training again, the variants trained there before")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default="bench/results/real_faces.json")
    args = parser.parse_args()
    require_shared()
    if args.full:
        args.people, args.eval_people, args.img_size, args.epochs, args.batch_size = 4000, 689, [240, 320], 12, 64
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mtl-bench-real-"))
    data = work / "proxy"
    if not (data / "train" / "train.csv").is_file():
        build_proxy(work, args.people, args.eval_people, args.seed)
    rows = []
    for name in args.variants:
        print(f"\n=== {name}", flush=True)
        rows.append(score_variant(train_variant(name, VARIANTS[name], args, data, work), args, data))
        print(table(rows[-1:], list(rows[-1])), flush=True)
    columns = ["variant", "val_f1", "val_mask_f1", "val_gender_f1", "val_age_f1", "eval_f1", "eval_acc",
               "eval_gender_f1", "eval_age_f1", "masks_acc", "masks_f1", "masks_bare_as_masked", "train_min"]
    print()
    print(table(rows, columns))
    path = write_json({"settings": {k: v for k, v in vars(args).items() if k != "work"}, "rows": rows}, args.out)
    print(f"\nwritten {path}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
