#!/usr/bin/env python3
"""The whole pipeline once, end to end, on a CPU in a few minutes, with nothing to download.

Makes the synthetic demo data set in demo_data/ (drawn people whose mask, gender and age show in the
photo) when it is missing, trains configs/demo.yaml on it into runs/demo (or runs/demo-2, ... when
taken), writes the 18-class submission for its eval photos, scores it against the true answers, and
ends with a line saying where the submission and the TensorBoard logs are and how to open them.

    python demo.py
    python demo.py --people 100 --epochs 5        # quicker

The logic lives in mtl/demo.py.
"""
from mtl.cli import main_guard
from mtl.demo import main

if __name__ == "__main__":
    main_guard(main)
