#!/usr/bin/env python3
"""Train the multi-task face-attribute model (mask x gender x age -> 18 classes).

A YAML file from configs/ (--config) sets the defaults and every flag overrides it; the resolved
config, best.pt/last.pt checkpoints, metrics.json and TensorBoard logs go to --out (default a fresh
runs/<time>_<model>_<arch>). Examples:

    python train_multitask.py --config configs/demo.yaml --data demo_data       # CPU demo, minutes
    python train_multitask.py --config configs/efficientnet_b3.yaml --data DATA --age-threshold 59
    python train_multitask.py --config configs/default.yaml --all-folds          # 5 folds for an ensemble
    torchrun --nproc_per_node 4 train_multitask.py --config configs/default.yaml # DDP
    python train_multitask.py --resume runs/NAME/last.pt                         # continue a run
"""
import argparse

from mtl.cli import add_train_arguments, main_guard, overrides_from_args


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="YAML config (see configs/); flags override its keys")
    add_train_arguments(parser)
    args = parser.parse_args(argv)

    from mtl import checkpoint, config
    from mtl.train import train
    base = None
    if args.resume and not args.config:
        base = checkpoint.load(args.resume)["config"]  # NOTE: a plain --resume continues with the run's own config
        base.pop("resume", None)
    cfg = config.build(overrides_from_args(args), args.config, base=base)
    result = train(cfg)
    print(f"best 18-class macro F1 {result['best_f1']:.4f}; outputs in {result['out']}")


if __name__ == "__main__":
    main_guard(main)
