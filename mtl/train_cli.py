"""train_multitask.py's command line: its flags (every TrainConfig key, mtl.cli), the config they resolve to, the run.

The description --help shows is DESCRIPTION below.
"""
from __future__ import annotations

import argparse

from mtl.cli import ArgumentParser, add_train_arguments, overrides_from_args

DESCRIPTION = """Train the multi-task face-attribute model (mask x gender x age -> 18 classes).

Every setting starts from configs/default.yaml; a YAML file from configs/ (--config) changes the
keys it names and every flag overrides both (--help shows each default). The resolved config,
best.pt/last.pt checkpoints, metrics.json and TensorBoard logs go to --out (default a fresh
runs/<time>_<model>_<arch>); --resume continues a run where its last.pt lies. Examples:

    python train_multitask.py --config configs/demo.yaml --data demo_data       # CPU demo, minutes
    python train_multitask.py --config configs/efficientnet_b3.yaml --data DATA --age-threshold 59
    python train_multitask.py --data DATA --all-folds                           # 5 folds for an ensemble
    torchrun --nproc_per_node 4 train_multitask.py --data DATA                  # DDP
    python train_multitask.py --resume runs/NAME/last.pt                         # continue a run
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="YAML config (see configs/); flags override its keys (default: "
                                               "none, configs/default.yaml's values)")
    add_train_arguments(parser)
    return parser


def resolve_config(args):
    """The TrainConfig a command line asks for (a plain --resume continues with the run's own config)."""
    from mtl import checkpoint, config
    base = None
    if args.resume and not args.config:
        base = checkpoint.load(args.resume)["config"]
        # NOTE: the run continues next to the file resumed (or in --out), never in the folder it was first written to
        base.pop("resume", None)
        base.pop("out", None)
    return config.build(overrides_from_args(args), args.config, base=base)


def main(argv=None):
    """train_multitask.py: parse the command line (argv, default sys.argv), train, say where the outputs are."""
    args = get_args_parser().parse_args(argv)
    cfg = resolve_config(args)  # NOTE: every flag checked before the training stack (torch, timm) is imported
    from mtl.train import train
    result = train(cfg)
    print(f"best 18-class macro F1 {result.best_f1:.4f}; outputs in {result.out}")
