"""Checks of one setting's value, shared by mtl.config (which checks every value before a run) and the modules that
read the value (transforms, splits, dataset, losses, inference, data_tools.crop_faces): a size pair, a fold, an age
range, a device name, a loss spec. Each raises a one-line error naming the flag; like mtl.config, this module
imports nothing heavier than the standard library.
"""
from __future__ import annotations

import re

from mtl import names
from mtl.errors import ConfigError, DataError


def size_pair(value, flag="--img-size"):
    """24 / [24] / [W, H] -> (W, H) positive ints, or a ConfigError naming the flag."""
    if value is None:
        return None
    items = [value] if isinstance(value, (int, float, str)) else list(value)
    try:
        pair = [int(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be one or two whole numbers (W H), got {value!r}") from None
    if len(pair) == 1:
        pair = pair * 2
    if len(pair) != 2 or min(pair) < 8:
        raise ConfigError(f"{flag} must be one or two whole numbers >= 8 (W H), got {value!r}")
    return tuple(pair)


def check_fold(folds: int, fold: int):
    """Raise ConfigError unless 2 <= folds and 0 <= fold < folds."""
    if int(folds) < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if not 0 <= int(fold) < int(folds):
        raise ConfigError(f"--fold must be from 0 to {int(folds) - 1} for --folds {folds}, got {fold}")


def parse_age_range(text) -> tuple[int, int] | None:
    """'57-59' or '58' -> (57, 59) / (58, 58); None or '' -> None."""
    if text is None or str(text).strip() in ("", "none", "None"):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", str(text))
    if match is None:
        raise DataError(f"--drop-ages must look like 57-59 or 58, got {text!r}")
    low, high = int(match.group(1)), int(match.group(2) or match.group(1))
    if low > high:
        raise DataError(f"--drop-ages {text!r}: the first age must not exceed the second")
    return low, high


DEVICE = re.compile(r"auto|(?:cpu|cuda|mps)(?::\d+)?")


def check_device_name(name: str) -> str:
    """A --device value that names a device (auto, cpu, cuda, cuda:1, mps); whether this machine has it is checked
    where the run starts (inference.resolve_device)."""
    if not isinstance(name, str) or DEVICE.fullmatch(name) is None:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:1, ...")
    return name


def check_loss_spec(task: str, spec: dict):
    """Raise ConfigError for an unknown loss name or option (mtl.names.LOSS_OPTIONS), naming the task."""
    name = spec.get("name")
    if name not in names.LOSS_OPTIONS:
        raise ConfigError(f"unknown loss {name!r} for {task}; known: {', '.join(sorted(names.LOSSES))}")
    if name in names.GENDER_ONLY_LOSSES and task != "gender":
        raise ConfigError(f"loss {name!r} is for the binary gender task only, not {task}")
    if name in names.NOT_GENDER_LOSSES and task == "gender":
        raise ConfigError(f"loss {name!r} is for mask, age or joint, not the single-logit gender task")
    unknown = set(spec) - {"name"} - set(names.LOSS_OPTIONS[name])
    if unknown:
        raise ConfigError(f"loss {name!r} for {task} has no option(s) {', '.join(sorted(unknown))}; "
                          f"it takes {', '.join(sorted(names.LOSS_OPTIONS[name])) or 'none'}")
    for key in ("gamma", "label_smoothing", "ce_weight", "gamma_pos", "gamma_neg", "eps", "scale", "margin"):
        if key in spec and not (isinstance(spec[key], (int, float)) and spec[key] >= 0):
            raise ConfigError(f"loss option {key} for {task} must be a number >= 0, got {spec[key]!r}")
