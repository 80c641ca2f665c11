#!/usr/bin/env python3
"""Tuning cost: epochs a pruned Optuna study actually trains vs the same study unpruned.

The studies search the default space (three loss weights + learning rate) with the same TPE
sampler seed, the same number of trials and epochs, on the same synthetic data and person-level
fold; one uses no pruner, the others the default MedianPruner (judging from half the epochs on),
a MedianPruner judging from epoch 2, and Hyperband. Reported: epochs
trained, wall time and the best 18-class macro F1 of each (the unpruned one trains trials x epochs),
and the spread of the unpruned study's top-3 F1 as a yardstick for noise.

    python bench/tuning_cost.py                       # 24 trials x 8 epochs, tiny CPU model (~25 min)
    python bench/tuning_cost.py --pruners none median:3
    python bench/tuning_cost.py --trials 30 --epochs 8 --config configs/demo.yaml
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import ROOT, table, write_json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--people", type=int, default=150)
    parser.add_argument("--pruners", nargs="+", default=["none", "median", "median:2", "hyperband"],
                        help="none, median (default warmup: half the epochs), median:W (judged from epoch W on), "
                             "hyperband")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--sampler-seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/tuning_cost.json")
    args = parser.parse_args()

    from data_tools.make_synthetic import make_synthetic
    from mtl.tuning import TuneSettings, tune
    work = Path(tempfile.mkdtemp(prefix="mtl-bench-tune-"))
    data = make_synthetic(work / "data", people=args.people, seed=0, eval_people=1, size=(96, 128), progress=False,
                          workers=2)
    rows = []
    for pruner in args.pruners:
        name, _, warmup = pruner.partition(":")
        settings = TuneSettings(trials=args.trials, config=args.config, study_name=f"bench-{name}{warmup}",
                                out=str(work / f"{name}{warmup}"), pruner=name, sampler_seed=args.sampler_seed,
                                pruner_warmup=int(warmup) if warmup else None,
                                overrides={"data": str(data), "epochs": args.epochs, "cache_dir": str(work / "cache"),
                                           "progress": False, "workers": 0, "log_images": 0})
        t0 = time.time()
        result = tune(settings, log=lambda *_: None)
        minutes = (time.time() - t0) / 60
        counts = result["counts"]
        rows.append({"pruner": pruner, "trials": args.trials, "epochs_run": result["epochs_run"],
                     "epochs_budget": args.trials * args.epochs, "complete": counts.get("COMPLETE", 0),
                     "pruned": counts.get("PRUNED", 0), "best_f1": result["best"]["f1"], "minutes": minutes,
                     "top3_f1": sorted(result["table"].query("state == 'COMPLETE'")["f1"], reverse=True)[:3]})
        print(f"{pruner}: {rows[-1]['epochs_run']} epochs, best F1 {rows[-1]['best_f1']:.3f}", flush=True)
    for row in rows:
        row["epochs_vs_unpruned"] = row["epochs_run"] / rows[0]["epochs_run"]
        row["top3_f1"] = " ".join(f"{f:.3f}" for f in row["top3_f1"])
    print()
    print(table(rows, ["pruner", "trials", "epochs_run", "epochs_budget", "epochs_vs_unpruned", "pruned", "best_f1",
                       "top3_f1", "minutes"]))
    path = write_json({"settings": vars(args), "rows": rows}, args.out)
    print(f"\nwritten {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
