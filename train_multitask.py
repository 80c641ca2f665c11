#!/usr/bin/env python3
"""Train the multi-task face-attribute model (mask x gender x age -> 18 classes).

    python train_multitask.py --config configs/demo.yaml --data demo_data       # CPU demo, minutes

Every setting starts from configs/default.yaml; --config and the flags override it. `--help` shows every
flag with its default and more examples. The logic lives in mtl/train_cli.py (this command line) and
mtl/train.py (the training loop); the installed package's console script is `mtl-train`.
"""
from mtl.cli import main_guard
from mtl.train_cli import main

if __name__ == "__main__":
    main_guard(main)
