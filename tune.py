#!/usr/bin/env python3
"""Search loss weights and learning rate (or any training setting) with Optuna; resumable.

    python tune.py --data DATA --trials 50                                   # loss weights + lr

`--help` says what a study does, where it is kept, and shows more examples (several processes, several
machines on PostgreSQL). The logic lives in mtl/tune/cli.py (this command line) and the package mtl/tune;
the installed package's console script is `mtl-tune`.
"""
from mtl.cli import main_guard
from mtl.tune.cli import INTERRUPTED, main

if __name__ == "__main__":
    main_guard(main, interrupted=INTERRUPTED)
