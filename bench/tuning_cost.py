#!/usr/bin/env python3
"""Tuning cost: epochs a pruned Optuna study actually trains vs the same study unpruned.

The studies search the default space (three loss weights + learning rate) with the same TPE
sampler seed, the same number of trials and epochs, on the same synthetic data and person-level
fold; one uses no pruner, the others the default MedianPruner (judging from half the epochs on),
a MedianPruner judging from epoch 2, and Hyperband. Reported: epochs
trained, wall time and the best 18-class macro F1 of each (the unpruned one trains trials x epochs).
The best F1 of a study depends on which trials its sampler happens to draw, and a pruner changes
that path, so each pruner runs once per sampler seed: the spread of the unpruned studies' best F1
over the seeds is the yardstick for noise.

    python -m bench.tuning_cost                       # 3 seeds x 24 trials x 8 epochs (~100 min, 2 cores)
    python -m bench.tuning_cost --sampler-seeds 0 --pruners none median:3
    python -m bench.tuning_cost --trials 30 --epochs 8 --config configs/demo.yaml
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, table, write_json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--people", type=int, default=150)
    parser.add_argument("--pruners", nargs="+", default=["none", "median", "median:2", "hyperband"],
                        help="none, median (default warmup: half the epochs), median:W (judged from epoch W on), "
                             "hyperband")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--sampler-seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED")
    parser.add_argument("--out", default="bench/results/tuning_cost.json")
    args = parser.parse_args()

    from data_tools.make_synthetic import make_synthetic
    work = Path(tempfile.mkdtemp(prefix="mtl-bench-tune-"))
    data = make_synthetic(work / "data", people=args.people, seed=0, eval_people=1, size=(96, 128), progress=False,
                          workers=2)
    rows = []
    for seed in args.sampler_seeds:
        for pruner in args.pruners:
            rows.append(run_study(pruner, seed, args, data, work))
            print(f"seed {seed} {pruner}: {rows[-1]['epochs_run']} epochs, best F1 {rows[-1]['best_f1']:.3f}",
                  flush=True)
    for row in rows:
        unpruned = next((r for r in rows if r["pruner"] == "none" and r["seed"] == row["seed"]), None)
        row["epochs_vs_unpruned"] = row["epochs_run"] / unpruned["epochs_run"] if unpruned else None
    summary = summarize(rows, args.pruners)
    print()
    print(table(rows, ["seed", "pruner", "epochs_run", "epochs_vs_unpruned", "pruned", "best_f1", "top3_f1",
                       "minutes"]))
    print()
    print(table(summary, ["pruner", "studies", "epochs_vs_budget", "best_f1_mean", "best_f1_min", "best_f1_max",
                          "best_f1_by_seed"]))
    path = write_json({"settings": vars(args), "summary": summary, "rows": rows}, args.out)
    print(f"\nwritten {path}")
    shutil.rmtree(work, ignore_errors=True)


def run_study(pruner, seed, args, data, work) -> dict:
    """One study (pruner 'median:W' judges from epoch W on); its epochs, outcome counts and best F1."""
    from mtl.tune import TuneSettings, tune
    name, _, warmup = pruner.partition(":")
    settings = TuneSettings(trials=args.trials, config=args.config, study_name=f"bench-{name}{warmup}-{seed}",
                            out=str(work / f"{name}{warmup}-{seed}"), pruner=name, sampler_seed=seed,
                            pruner_warmup=int(warmup) if warmup else None,
                            overrides={"data": str(data), "epochs": args.epochs, "cache_dir": str(work / "cache"),
                                       "progress": False, "workers": 0, "log_images": 0})
    t0 = time.time()
    result = tune(settings, log=lambda *_: None)
    counts = result["counts"]
    top = sorted(result["table"].query("state == 'COMPLETE'")["f1"], reverse=True)[:3]
    return {"seed": seed, "pruner": pruner, "trials": args.trials, "epochs_run": result["epochs_run"],
            "epochs_budget": args.trials * args.epochs, "complete": counts.get("COMPLETE", 0),
            "pruned": counts.get("PRUNED", 0), "best_f1": result["best"]["f1"],
            "minutes": (time.time() - t0) / 60, "top3_f1": " ".join(f"{f:.3f}" for f in top)}


def summarize(rows, pruners) -> list[dict]:
    """Per pruner over the seeds: share of the epoch budget trained, and the best F1's mean, range and values."""
    out = []
    for pruner in pruners:
        mine = [r for r in rows if r["pruner"] == pruner]
        best = [r["best_f1"] for r in mine]
        out.append({"pruner": pruner, "studies": len(mine),
                    "epochs_vs_budget": sum(r["epochs_run"] for r in mine) / sum(r["epochs_budget"] for r in mine),
                    "best_f1_mean": statistics.mean(best), "best_f1_min": min(best), "best_f1_max": max(best),
                    "best_f1_by_seed": " ".join(f"{f:.3f}" for f in best)})
    return out


if __name__ == "__main__":
    main()
