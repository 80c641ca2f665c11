"""Command-line plumbing shared by the entry scripts: training and inference flags, and clean error exits."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from mtl.errors import MTLError
from mtl.names import AMP_MODES, TTA


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line naming the flag, like every other error of mtl's commands
    (argparse prints the whole usage first; --help shows it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    group.add_argument("--amp", default="auto", choices=AMP_MODES,
                       help="autocast dtype: auto is bf16 on CUDA (fp16 where bf16 is missing), off on CPU")
    group.add_argument("--cache-dir", help="decoded-image cache folder (default ~/.cache/mtl or $MTL_CACHE_DIR)")
    group.add_argument("--no-cache", dest="cache", action="store_false", help="decode the photos without the cache")
    group.add_argument("--no-progress", dest="progress", action="store_false")
    add_calibration_flag(group)


def add_calibration_flag(group):
    """--no-calibration (predict.py, mtl.soup, data_tools.pseudo_label, mtl.export): answers from the raw heads."""
    group.add_argument("--no-calibration", dest="calibration", action="store_false",
                       help="use the heads' raw probabilities, not the offsets fitted after training")


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
    """--tta (predict.py, mtl.soup, data_tools.pseudo_label; read with `names.check_tta`)."""
    group.add_argument("--tta", nargs="+", default=["none"], metavar="NAME", choices=("none", *TTA),
                       help="test-time augmentation: none (default) or hflip (average with the mirrored photo)")


def _flag_type(kind):
    """The argparse type of a TrainConfig field's type: int or float (of a list's items too), else text."""
    import types
    import typing
    options = [a for a in typing.get_args(kind) if a is not type(None)] \
        if typing.get_origin(kind) in (types.UnionType, typing.Union) else [kind]
    kind = options[0]
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0]
    return kind if kind in (int, float) else None


def train_flags(values: dict):
    """(group, flag, dest, shown default, argparse keywords, choices) of every TrainConfig field, from its schema and
    its description in configs/default.yaml (config.docs)."""
    from mtl import config, labels
    for field in dataclasses.fields(config.TrainConfig):
        meta, key, doc = field.metadata, field.name, config.docs()[field.name]
        group, text, known, keywords = doc.group, doc.text, meta["choices"], dict(meta["argparse"])
        kind = config.TYPES[key]
        if key == "losses":  # NOTE: one flag per task: --mask-loss focal:gamma=2 names only that task's loss
            for task in labels.LOSS_TASKS:
                yield (group, f"--{task}-loss", f"{task}_loss", config.value_text(key, values[key][task]),
                       {**keywords, "help": f"{task}: {text}"}, None)
            continue
        switches = meta["flags"] or ({config.flag_name(key): (True, text)} if kind is bool else None)
        if switches:
            for flag, (const, flag_help) in switches.items():
                value = values[key]
                shown = ("on" if value == const else "off") if isinstance(value, bool) else \
                    config.value_text(key, value)
                yield group, flag, key, shown, {"action": "store_const", "const": const, "help": flag_help}, None
            continue
        if _flag_type(kind):
            keywords["type"] = _flag_type(kind)
        yield group, config.flag_name(key), key, config.value_text(key, values[key]), {**keywords, "help": text}, known


def add_train_arguments(parser: argparse.ArgumentParser, skip=()):
    """Every TrainConfig field as a flag, generated from its schema (config.setting): name, type, group, help.

    Each flag's default is None: only flags given override the YAML config. --help shows each flag's default,
    read from configs/default.yaml (the one place defaults live), and its choices (mtl.names), which argparse checks.
    """
    from mtl.config import defaults
    groups = {}
    for group, flag, key, shown, keywords, known in train_flags(defaults()):
        if flag in skip:
            continue
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        text = keywords.pop("help").replace("%", "%%")
        if known:  # NOTE: argparse refuses any other value, and fills %(choices)s in with them
            text = f"{text}{'; ' if text else ''}one of %(choices)s"
            keywords.update(choices=known, metavar=keywords.get("metavar", key.upper()))
        groups[group].add_argument(flag, dest=key, default=None, help=f"{text} (default: {shown})".strip(), **keywords)


def overrides_from_args(args) -> dict:
    """The flags given on the command line as TrainConfig keys (per-task loss flags folded into `losses`)."""
    from mtl import labels
    from mtl.config import FIELDS, parse_loss_spec
    values = {k: v for k, v in vars(args).items() if v is not None}
    losses = {}
    for task in labels.LOSS_TASKS:
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
