"""The end-to-end demo behind `python demo.py`: synthetic data (made when missing), training, a submission.

1) make the synthetic demo data set (data_tools.make_synthetic) unless --data already holds one;
2) train configs/demo.yaml on it (a tiny CNN from random weights: minutes on a CPU) into a fresh run folder;
3) predict its eval photos with the best checkpoint into <run>/submission.csv, and score the submission
   against the true answers the synthetic data set keeps in eval_truth.csv;
4) say where the submission and the TensorBoard logs are, and how to open them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mtl.cli import ArgumentParser
from mtl.config import CONFIGS

CONFIG = CONFIGS / "demo.yaml"


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="demo_data", help="demo data folder; made when it holds no train/train.csv")
    parser.add_argument("--people", type=int, default=300, help="train people of a new demo data set")
    parser.add_argument("--out", default="runs/demo", help="run folder; a fresh -2, -3, ... when it is taken")
    parser.add_argument("--epochs", type=int, help="training epochs (default: configs/demo.yaml's)")
    parser.add_argument("--workers", type=int, default=2, help="processes drawing photos and loading batches")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def fresh_folder(path) -> Path:
    """path itself when it does not exist yet, else the first free path-2, path-3, ..."""
    path, k = Path(path), 2
    candidate = path
    while candidate.exists():
        candidate, k = path.with_name(f"{path.name}-{k}"), k + 1
    return candidate


def eval_f1(data, submission) -> float | None:
    """18-class macro F1 of a submission against DATA/eval_truth.csv (the synthetic data's answers), if present."""
    import pandas as pd
    from sklearn.metrics import f1_score
    truth_file = Path(data) / "eval_truth.csv"
    if not truth_file.is_file():
        return None
    truth = pd.read_csv(truth_file, dtype={"ImageID": str}).set_index("ImageID")["ans"]
    pred = pd.read_csv(submission, dtype={"ImageID": str}).set_index("ImageID")["ans"]
    return float(f1_score(truth.loc[pred.index], pred, average="macro"))


def run(args, log=print) -> dict:
    """Steps 1-4 of the module docstring; returns the paths written and the scores."""
    from data_tools.make_synthetic import make_synthetic
    from mtl import config, predict
    from mtl.train import train
    data = Path(args.data)
    if not (data / "train" / "train.csv").is_file():
        log(f"1/3 making the synthetic demo data set ({args.people} people) in {data}")
        make_synthetic(data, args.people, seed=0, progress=args.progress, workers=max(1, args.workers))
    else:
        log(f"1/3 using the demo data in {data}")
    out = fresh_folder(args.out)
    overrides = {"data": str(data), "out": str(out), "epochs": args.epochs, "workers": args.workers,
                 "progress": args.progress}
    cfg = config.build(overrides, CONFIG)
    log(f"2/3 training {CONFIG.name} ({cfg.model}, {cfg.epochs} epochs) into {out}")
    result = train(cfg, log=log)
    submission = out / "submission.csv"
    log(f"3/3 predicting {data / 'eval'} with {out / 'best.pt'}")
    predict.run(predict.get_args_parser().parse_args(
        ["--checkpoint", str(out / "best.pt"), "--data", str(data), "--out", str(submission),
         "--workers", str(args.workers)] + ([] if args.progress else ["--no-progress"])), log=log)
    f1 = eval_f1(data, submission)
    scored = f" (18-class macro F1 on the eval people: {f1:.3f})" if f1 is not None else ""
    log(f"validation F1 {result.best_f1:.3f}; submission written to {submission}{scored}")
    log(f"done: submission {submission}; TensorBoard logs in {out}: open them with `tensorboard --logdir "
        f"{out.parent}` and browse http://localhost:6006")
    return {"out": out, "submission": submission, "best_f1": result.best_f1, "eval_f1": f1}


def main(argv=None) -> dict:
    return run(get_args_parser().parse_args(argv))
