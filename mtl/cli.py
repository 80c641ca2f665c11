"""Command-line plumbing shared by the entry scripts: training and inference flags, and clean error exits."""
from __future__ import annotations

import argparse
import sys

from mtl.errors import MTLError


def main_guard(main, interrupted="interrupted: checkpoints written so far are kept"):
    """Run main(); a user error prints 'error: ...' (no traceback), exits 2; Ctrl-C prints `interrupted`, exits 130."""
    try:
        return main()
    except MTLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)


def add_inference_arguments(group):
    """The flags of every command that runs checkpoints over photos (predict.py, mtl.soup, data_tools.pseudo_label)."""
    group.add_argument("--batch-size", type=int, default=64)
    group.add_argument("--workers", type=int, default=2, help="DataLoader and cache-building worker processes")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    group.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                       help="autocast dtype: auto is bf16 on CUDA (fp16 where bf16 is missing), off on CPU")
    group.add_argument("--cache-dir", help="decoded-image cache folder (default ~/.cache/mtl or $MTL_CACHE_DIR)")
    group.add_argument("--no-cache", dest="cache", action="store_false", help="decode the photos without the cache")
    group.add_argument("--no-progress", dest="progress", action="store_false")


def add_fold_flags(group, member="checkpoint", skip_bad_help=None):
    """--fold, --folds, --seed, --relabel, --skip-bad: which validation people to score (predict.py, mtl.soup).

    Each defaults to the first checkpoint's training config (`reports.validation_fold`), so the fold is the one
    that checkpoint was validated on.
    """
    group.add_argument("--fold", type=int, help=f"validation fold (default: the first {member}'s)")
    group.add_argument("--folds", type=int, help=f"number of folds (default: the first {member}'s)")
    group.add_argument("--seed", type=int, help=f"fold seed (default: the first {member}'s)")
    group.add_argument("--relabel", help=f"relabel CSV for the truth (default: the first {member}'s; 'none' for none)")
    group.add_argument("--skip-bad", action="store_const", const=True,
                       help=skip_bad_help or f"leave out bad photos (default: as the first {member} was trained)")


def add_ensemble_flags(group, methods=None, weights_help="one weight per ensemble member"):
    """--ensemble (when methods are given) and --weights (predict.py, data_tools.pseudo_label)."""
    if methods:
        group.add_argument("--ensemble", default=methods[0], choices=methods,
                           help="soft: mean of each head's probabilities, then recombine (default); hard: vote on the "
                                "18-class answers, ties to the soft result")
    group.add_argument("--weights", type=float, nargs="+", metavar="W", help=weights_help)


def add_tta_flags(group):
    """--tta (predict.py, mtl.soup, data_tools.pseudo_label; read with `inference.check_tta`)."""
    group.add_argument("--tta", nargs="+", default=["none"], metavar="NAME",
                       help="test-time augmentation: none (default) or hflip (average with the mirrored photo)")


NONE_MEANS = {"out": "a fresh runs/<time>_<model>_<arch>", "cache_dir": "$MTL_CACHE_DIR or ~/.cache/mtl",
              "load_size": "the --img-size", "resume": "a new run"}


def default_text(key, value) -> str:
    """A default from configs/default.yaml as --help shows it."""
    if value is None:
        return NONE_MEANS.get(key, "none")
    if isinstance(value, dict):
        options = ",".join(f"{k}={v}" for k, v in value.items() if k != "name")
        return f"{value.get('name')}{':' + options if options else ''}"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "none"
    return str(value)


def add_train_arguments(parser: argparse.ArgumentParser, skip=()):
    """Every TrainConfig key as a flag (default None: only flags given override the YAML config).

    --help shows each flag's default, read from configs/default.yaml (the one place defaults live).
    """
    from mtl.config import defaults
    values = defaults()

    def flag(*names, key=None, **kwargs):
        if names[0] in skip:
            return
        key = key or names[0].lstrip("-").replace("-", "_")
        if key.endswith("_loss"):
            shown = default_text(key, values["losses"][key[:-len("_loss")]])
        elif kwargs.get("action") == "store_const":
            shown = "on" if values[key] == kwargs["const"] else "off"
        else:
            shown = default_text(key, values[key])
        help_text = f"{kwargs.pop('help', '')} (default: {shown})".strip().replace("%", "%%")
        current.add_argument(*names, dest=key, default=None, help=help_text, **kwargs)

    current = parser.add_argument_group("data")
    flag("--data", help="data folder with train/ and eval/ (the competition layout)")
    flag("--out", help="output folder")
    flag("--age-threshold", type=int, help="age from which a person counts as 60+ (e.g. 59)")
    flag("--drop-ages", help="leave these ages out of training only, e.g. 57-59")
    flag("--relabel", help="CSV of id,gender,age fixes applied on load")
    flag("--extra", action="append", help="extra partial-label CSV (data_tools.import_faces); repeatable")
    flag("--folds", type=int, help="number of person-level folds")
    flag("--fold", type=int, help="validation fold")
    flag("--all-folds", action="store_const", const=True, help="train every fold in turn (for an ensemble)")
    flag("--seed", type=int, help="seed for folds, shuffling and augmentation")
    flag("--skip-bad", action="store_const", const=True, help="leave out bad photos instead of stopping")
    flag("--no-cache", key="cache", action="store_const", const=False, help="decode JPEGs every time")
    flag("--cache-dir", help="decoded-image cache folder")
    flag("--workers", type=int, help="DataLoader and cache-building worker processes")

    current = parser.add_argument_group("preprocessing and augmentation")
    flag("--img-size", type=int, nargs="+", metavar="N", help="network input W H (or one number for a square)")
    flag("--load-size", type=int, nargs="+", metavar="N", help="decode + cache size W H")
    flag("--center-crop", type=int, nargs="+", metavar="N", help="center crop W H in load-size pixels")
    flag("--augment", help="augmentation preset: none, flip, baseline, strong, gridshuffle, ...")
    flag("--oversample-old", type=int, help="repeat the 60+ people this many more times per epoch")
    flag("--oversample-augment", help="augmentation preset of those repeated photos")

    current = parser.add_argument_group("model")
    flag("--model", help="any timm model name, e.g. efficientnet_b3, tresnet_m, vit_small_patch16_224")
    flag("--arch", help="multihead, joint18 or separate")
    flag("--head", help="task head: linear or another registered head (ml_decoder)")
    flag("--no-pretrained", key="pretrained", action="store_const", const=False,
         help="random initial weights instead of ImageNet ones")
    flag("--pretrained-file", help="local pretrained weights file for the trunk (used even where the config says "
                                   "pretrained: false)")
    flag("--head-dropout", type=float, help="dropout before each head")
    flag("--drop-path-rate", type=float, help="stochastic depth of the trunk")
    flag("--age-reg-weight", type=float, help="weight of the auxiliary age regression (0 = off)")

    current = parser.add_argument_group("losses")
    for task in ("mask", "gender", "age", "joint"):
        flag(f"--{task}-loss", key=f"{task}_loss", metavar="NAME[:k=v,...]",
             help=f"{task} loss, e.g. focal:gamma=2,class_weights=balanced")
    flag("--loss-weights", type=float, nargs=3, metavar=("M", "G", "A"), help="task loss weights")
    flag("--loss-weighting", help="fixed or uncertainty (learned, Kendall et al. 2018)")

    current = parser.add_argument_group("optimisation")
    flag("--epochs", type=int)
    flag("--batch-size", type=int)
    flag("--lr", type=float, help="peak learning rate (AdamW)")
    flag("--weight-decay", type=float)
    flag("--warmup-epochs", type=float)
    flag("--eta-min", type=float, help="learning rate at the end of the cosine schedule")
    flag("--grad-clip", type=float, help="gradient norm clip (0 = off)")
    flag("--accumulate", type=int, help="gradient accumulation steps")
    flag("--amp", help="auto (bf16 on CUDA), bf16, fp16 or off")
    flag("--channels-last", action="store_const", const=True,
         help="channels_last memory format on any device (default auto: on CUDA only)")
    flag("--no-channels-last", key="channels_last", action="store_const", const=False,
         help="plain memory layout, also on CUDA")
    flag("--compile", action="store_const", const=True, help="torch.compile the model")
    flag("--ema", type=float, help="EMA decay of the weights (0 = off, e.g. 0.999)")
    flag("--sampler", help="none or balanced (each 18-class combination equally often)")
    flag("--mixup", type=float, help="mixup alpha (0 = off)")
    flag("--cutmix", type=float, help="vertical CutMix alpha (0 = off)")
    flag("--mix-prob", type=float, help="share of batches mixed")
    flag("--patience", type=int, help="early stopping after this many epochs without a better F1 (0 = off)")

    current = parser.add_argument_group("running")
    flag("--device", help="auto, cpu, cuda, cuda:1, ...")
    flag("--resume", help="continue a run from its last.pt (its outputs go next to that file unless --out)")
    flag("--log-images", type=int, help="misclassified photos shown in TensorBoard per epoch")
    flag("--no-progress", key="progress", action="store_const", const=False, help="no progress bars")


def overrides_from_args(args) -> dict:
    """The flags given on the command line as TrainConfig keys (per-task loss flags folded into `losses`)."""
    from mtl.config import FIELDS, parse_loss_spec
    values = {k: v for k, v in vars(args).items() if v is not None}
    losses = {}
    for task in ("mask", "gender", "age", "joint"):
        spec = values.pop(f"{task}_loss", None)
        if spec:
            losses[task] = parse_loss_spec(spec)
    if losses:
        values["losses"] = losses
    return {k: v for k, v in values.items() if k in FIELDS}


# ---------------------------------------------------------------- console scripts (pyproject.toml [project.scripts])
def _console(module: str, exit_status=False):
    """A console script: `module.main()` under main_guard (with the module's INTERRUPTED message where it has one);
    with exit_status, main's return value is the exit status."""
    def run():
        import importlib
        command = importlib.import_module(module)
        guard = {"interrupted": command.INTERRUPTED} if hasattr(command, "INTERRUPTED") else {}
        status = main_guard(command.main, **guard)
        if exit_status:
            sys.exit(status)
    run.__doc__ = f"The console script of {module} (pyproject.toml)."
    return run


# NOTE: the root scripts (train_multitask.py, tune.py, predict.py, demo.py) and `python -m ...` stay the README's
# commands; these are the same commands once the package is installed (pip install -e .)
train = _console("mtl.train_cli")
tune = _console("mtl.tune.cli")
predict = _console("mtl.predict")
demo = _console("mtl.demo")
vote = _console("mtl.vote")
soup = _console("mtl.soup")
export = _console("mtl.export")
report = _console("data_tools.report", exit_status=True)
crop_faces = _console("data_tools.crop_faces", exit_status=True)
import_faces = _console("data_tools.import_faces", exit_status=True)
make_synthetic = _console("data_tools.make_synthetic", exit_status=True)
pseudo_label = _console("data_tools.pseudo_label")
