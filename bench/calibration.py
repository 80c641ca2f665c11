#!/usr/bin/env python3
"""Macro-F1 calibration on synthetic heads: what the fitted offsets gain on photos they were not fitted on.

`synthetic` draws per-task (or joint18) probabilities with the competition's imbalance (5/7 of photos
wear a mask, 8% are 60+) from noisy logits, the 60+ class made under-confident by `bias` nats; tests
use it too. The run fits `mtl.calibration.fit` on samples of several sizes (8 seeds each), with and
without the smoothing of its objective, and prints the mean and spread of the 18-class macro F1 gained
on 20,000 other photos from the same generator: the numbers behind mtl/calibration.py's docstring.

    python -m bench.calibration                                 # ~20 s on one CPU core
    python -m bench.calibration --sizes 100 200 --min-photos 0  # why fit leaves fewer than 200 photos alone
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from mtl import calibration, labels, metrics

MASK_P, GENDER_P, AGE_P = (5 / 7, 1 / 7, 1 / 7), (0.6, 0.4), (0.47, 0.45, 0.08)


def synthetic(n: int, seed: int, bias: float = 1.5, joint: bool = False, signal: float = 2.0,
              noise: float = 1.0) -> tuple[dict, dict]:
    """(probs, truth) for n photos: logits = signal * one-hot(truth) + N(0, noise), the 60+ logits lowered by bias.

    Per-task heads by default ('mask', 'gender', 'age' as metrics.head_probs gives them), or a joint18
    model's 18-way distribution and its marginals with joint=True. Truth is {'mask', 'gender', 'age_group'}.
    """
    rng = np.random.default_rng(seed)
    truth = {"mask": rng.choice(3, n, p=MASK_P), "gender": rng.choice(2, n, p=GENDER_P),
             "age_group": rng.choice(3, n, p=AGE_P)}
    if joint:
        logits = signal * np.eye(labels.NUM_JOINT)[labels.encode(truth["mask"], truth["gender"], truth["age_group"])]
        logits = logits + rng.normal(0, noise, logits.shape)
        logits[:, 2::3] -= bias  # NOTE: classes whose age group is 2 (60+): 2, 5, 8, ...
        outputs = {"joint": torch.tensor(logits)}
    else:
        outputs = {}
        for task, k, y in (("mask", 3, truth["mask"]), ("gender", 2, truth["gender"]), ("age", 3, truth["age_group"])):
            logits = signal * np.eye(k)[y] + rng.normal(0, noise, (n, k))
            if task == "age":
                logits[:, 2] -= bias
            outputs[task] = torch.tensor(logits)
        outputs["gender"] = outputs["gender"][:, 1] - outputs["gender"][:, 0]  # one logit, as the gender head
    return {k: v.numpy() for k, v in metrics.head_probs(outputs).items()}, truth


def held_out_gain(n: int, seeds: int, joint: bool, bias: float, test, **fit_args) -> tuple[float, float]:
    """Mean and spread over seeds of the F1 gained on the test photos by offsets fitted on n other photos."""
    before = metrics.score(*test, labels.LabelSchema())["f1"]
    gains = []
    for seed in range(seeds):
        fitted = calibration.fit(*synthetic(n, seed, bias, joint), labels.LabelSchema(), **fit_args)
        gains.append(metrics.score(calibration.apply(test[0], fitted), test[1], labels.LabelSchema())["f1"] - before)
    return float(np.mean(gains)), float(np.std(gains))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 2700], help="photos fitted on")
    parser.add_argument("--seeds", type=int, default=8, help="fits per size")
    parser.add_argument("--bias", type=float, default=1.5, help="how far the 60+ logits are lowered")
    parser.add_argument("--min-photos", type=int, default=calibration.MIN_PHOTOS,
                        help="fit's min_photos (0 shows what fitting fewer photos than the default would do)")
    args = parser.parse_args(argv)
    print(f"held-out 18-class macro F1 gain, mean +- spread over {args.seeds} seeds (bias {args.bias})")
    print(f"{'model':8} {'photos':>6} {'smooth 0':>16} {f'smooth {calibration.SMOOTH}':>16}")
    for joint in (False, True):
        test = synthetic(20_000, 10_000, args.bias, joint)
        for n in args.sizes:
            cells = [held_out_gain(n, args.seeds, joint, args.bias, test, smooth=smooth, min_photos=args.min_photos)
                     for smooth in (0.0, calibration.SMOOTH)]
            print(f"{'joint18' if joint else 'heads':8} {n:>6} " + " ".join(f"{m:+.4f} +- {s:.4f}".rjust(16)
                                                                            for m, s in cells), flush=True)


if __name__ == "__main__":
    main()
