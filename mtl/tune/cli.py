"""tune.py's command line: the tuning flags, every training flag as the trials' base config, and the run.

The description --help shows is DESCRIPTION below.
"""
from __future__ import annotations

import argparse

from mtl.cli import ArgumentParser, add_train_arguments, overrides_from_args
from mtl.names import PRUNERS

INTERRUPTED = "interrupted: the study is kept; run the same command again to continue it"
DESCRIPTION = """Search loss weights and learning rate (or any training setting) with Optuna.

Each trial trains one person-level fold with mtl's own training loop and scores the validation
18-class macro F1; the search space comes from a YAML file (--space, default
configs/search_space.yaml: the three loss weights, normalized to sum 3, and the learning rate).
Every epoch's F1 goes to the pruner; a failed trial is recorded with its reason and the study goes
on. The study is kept in runs/tune/<study name>/ (SQLite study.db, or journal.log with --workers),
so the same command run again continues it. At the end: a table of the top trials, best.yaml
(python train_multitask.py --config runs/tune/NAME/best.yaml), trials.csv, history.png,
importances.png; tensorboard --logdir runs/tune/NAME shows every trial side by side. Examples:

    python tune.py --data DATA --trials 50                                   # loss weights + lr
    python tune.py --config configs/demo.yaml --trials 20 --epochs 4 --pruner hyperband
    python tune.py --data DATA --trials 50 --space configs/search_space_wide.yaml --study-name wide
    python tune.py --data DATA --trials 64 --workers 4               # 4 processes (one per GPU), one journal
    python tune.py --data DATA --trials 200 --study-name b3 --storage postgresql://USER:PW@HOST/DB
                                                                     # the same command on each machine
    optuna-dashboard postgresql://USER:PW@HOST/DB                    # watch it (pip install optuna-dashboard)

A trial left running by a machine that died (no heartbeat for --heartbeat-grace seconds) runs again
on a live one; a machine that finishes while others still run the last trials exits 0 and says so.

Training flags (--model, --img-size, --epochs, --fold, ...) set every trial's base config; the
DataLoader workers of a trial are --loader-workers, since --workers counts trial processes.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="base YAML config of every trial (see configs/); flags override it")
    group = parser.add_argument_group("tuning")
    group.add_argument("--trials", metavar="N", type=int, default=50,
                       help="finished trials (complete or pruned) the study should have, earlier runs included "
                            "(default 50)")
    group.add_argument("--space", metavar="FILE", help="search-space YAML (default configs/search_space.yaml)")
    group.add_argument("--study-name", metavar="NAME", default="mtl",
                       help="study name (default mtl); names the output folder")
    group.add_argument("--storage", metavar="URL",
                       help="database URL (sqlite:///FILE, postgresql://...) or journal file path (default: "
                            "study.db, or journal.log with --workers, in the study folder)")
    group.add_argument("--out", metavar="DIR", dest="study_out", help="study folder (default runs/tune/<study name>)")
    group.add_argument("--timeout", metavar="S", type=float, help="start no new trial after this many seconds")
    group.add_argument("--pruner", default="median", choices=PRUNERS,
                       help="stop weak trials early: median (default; after 5 trials, from --pruner-warmup on), "
                            "hyperband, none")
    group.add_argument("--pruner-warmup", metavar="E", type=int,
                       help="epochs a trial trains before the median pruner may stop it (default: half the "
                            "epochs, at least 2)")
    group.add_argument("--workers", metavar="N", dest="trial_workers", type=int, default=1,
                       help="parallel trial processes on this machine, e.g. one per GPU (default 1)")
    group.add_argument("--loader-workers", metavar="N", dest="workers", type=int,
                       help="DataLoader worker processes of each trial (the training flag --workers)")
    group.add_argument("--max-failures", metavar="N", type=int, default=5,
                       help="stop after this many failed trials in a row (default 5)")
    group.add_argument("--sampler-seed", metavar="N", type=int, help="seed of the TPE sampler (default: random)")
    group.add_argument("--top", metavar="N", type=int, default=10, help="rows of the top-trials table (default 10)")
    group.add_argument("--heartbeat-interval", metavar="S", type=int, default=60,
                       help="a database storage's running trial records a heartbeat every S seconds (default 60)")
    group.add_argument("--heartbeat-grace", metavar="S", type=int, default=180,
                       help="a trial with no heartbeat for S seconds counts as dead (its machine died) and runs "
                            "again on a live machine (default 180)")
    add_train_arguments(parser, skip=("--out", "--resume", "--all-folds", "--workers"))
    return parser


def main(argv=None):
    """tune.py: parse the command line (argv, default sys.argv) and run the study."""
    args = build_parser().parse_args(argv)
    from mtl.tune import DEFAULT_SPACE, TuneSettings, tune
    settings = TuneSettings(
        trials=args.trials, space=args.space or str(DEFAULT_SPACE), config=args.config,
        overrides=overrides_from_args(args), study_name=args.study_name, storage=args.storage, out=args.study_out,
        timeout=args.timeout, pruner=args.pruner, pruner_warmup=args.pruner_warmup,
        workers=args.trial_workers, max_failures=args.max_failures,
        sampler_seed=args.sampler_seed, top=args.top, heartbeat_interval=args.heartbeat_interval,
        heartbeat_grace=args.heartbeat_grace)
    return tune(settings)
