"""The search space: a YAML file of TrainConfig keys and ranges, checked, sampled per trial, turned into configs."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mtl import config, labels, names
from mtl.errors import ConfigError

if TYPE_CHECKING:
    from mtl.tune.settings import TuneSettings


SPACE_TYPES = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
               "categorical": {"choices"}, "loss_weights": {"low", "high"}}

# set by tune.py itself or its flags, or changing what the F1 is measured on
NOT_SEARCHABLE = ("data", "out", "resume", "all_folds", "folds", "fold", "device", "progress", "cache_dir")

LOSS_WEIGHT_SUM = 3.0  # NOTE: normalized to sum 3, so the untuned default [1, 1, 1] is a point of the space


def load_space(path) -> dict:
    """Search-space YAML -> {key: checked spec}; an error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: must map config keys to ranges, e.g. "
                          f"lr: {{type: float, low: 1.0e-4, high: 3.0e-3, log: true}}")
    return {str(key): _check_spec(path, str(key), spec) for key, spec in raw.items()}


def _check_key(path, key):
    if key.startswith("losses."):
        parts = key.split(".")
        if len(parts) != 3 or parts[1] not in labels.LOSS_TASKS or not parts[2]:
            raise ConfigError(f"{path}: {key}: loss keys look like losses.<task>.<option> with task one of "
                              f"{', '.join(labels.LOSS_TASKS)} (e.g. losses.age.label_smoothing)")
    elif key not in config.FIELDS:
        raise ConfigError(f"{path}: unknown key {key!r}: not a training setting (TrainConfig in mtl/config.py) "
                          f"nor losses.<task>.<option>")
    elif key in NOT_SEARCHABLE:
        raise ConfigError(f"{path}: {key} cannot be searched: tune.py sets it, or its flag does "
                          f"(--{key.replace('_', '-')})")


def _number(where, name, value, integer=False):
    if isinstance(value, str):  # NOTE: YAML reads 1e-4 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and int(value) != value):
        raise ConfigError(f"{where}: {name} must be a {'whole ' if integer else ''}number, got {value!r}")
    return int(value) if integer else float(value)


def _check_spec(path, key, spec) -> dict:
    where = f"{path}: {key}"
    _check_key(path, key)
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: must be a mapping with a type ({', '.join(SPACE_TYPES)}), got {spec!r}")
    kind = spec["type"]
    if kind not in SPACE_TYPES:
        raise ConfigError(f"{where}: unknown type {kind!r}; known: {', '.join(SPACE_TYPES)}")
    if (kind == "loss_weights") != (key == "loss_weights"):
        raise ConfigError(f"{where}: the key loss_weights takes type loss_weights (and only it does): three "
                          f"log-uniform factors normalized to sum {LOSS_WEIGHT_SUM:g}")
    unknown = sorted(set(spec) - {"type"} - SPACE_TYPES[kind])
    if unknown:
        raise ConfigError(f"{where}: type {kind} takes no {', '.join(unknown)}; it takes "
                          f"{', '.join(sorted(SPACE_TYPES[kind]))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list, got {choices!r}")
        return {"type": kind, "choices": choices}
    missing = sorted({"low", "high"} - set(spec))
    if missing:
        raise ConfigError(f"{where}: type {kind} needs {' and '.join(missing)}")
    integer = kind == "int"
    low, high = _number(where, "low", spec["low"], integer), _number(where, "high", spec["high"], integer)
    log = spec.get("log", kind == "loss_weights")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    step = _number(where, "step", spec["step"], integer) if spec.get("step") is not None else None
    if not low < high:
        raise ConfigError(f"{where}: low ({low:g}) must be below high ({high:g})")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low:g}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{where}: step must be positive and cannot go with log: true")
    return {"type": kind, "low": low, "high": high, "log": log, "step": step}


def normalize_weights(raw) -> list:
    """Positive task loss weights scaled to sum LOSS_WEIGHT_SUM (rounded to 4 decimals): only ratios matter."""
    total = float(sum(raw))
    return [round(LOSS_WEIGHT_SUM * float(w) / total, 4) for w in raw]


def _ordered(space):
    """Keys with each losses.<task>.name first, so its options know which loss they belong to."""
    return sorted(space, key=lambda k: 0 if k.startswith("losses.") and k.endswith(".name") else 1)


def _inactive(key, values, base_losses) -> bool:
    """A loss option the (sampled) loss of its task does not take: left out of this trial."""
    if not key.startswith("losses.") or key.endswith(".name"):
        return False
    _, task, option = key.split(".")
    name_key = f"losses.{task}.name"
    if name_key not in values:
        return False  # NOTE: a fixed loss that lacks the option is a config error, not a conditional
    return option not in names.LOSS_OPTIONS.get(values[name_key], ())


def sample(trial, space, base_losses) -> dict:
    """One trial's values, {key: value}; loss_weights come normalized, conditional loss options may be absent."""
    values = {}
    for key in _ordered(space):
        if _inactive(key, values, base_losses):
            continue
        spec = space[key]
        kind = spec["type"]
        if kind == "loss_weights":
            raw = [trial.suggest_float(f"loss_weight_{task}", spec["low"], spec["high"], log=True)
                   for task in labels.TASKS]
            values[key] = normalize_weights(raw)
        elif kind == "float":
            values[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"], step=spec["step"])
        elif kind == "int":
            values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=spec["log"],
                                            step=int(spec["step"] or 1))
        else:
            encoded = [encode_choice(c) for c in spec["choices"]]
            values[key] = spec["choices"][encoded.index(trial.suggest_categorical(key, encoded))]
    return values


def encode_choice(choice):
    """Optuna takes None/bool/int/float/str choices; lists and mappings go as their YAML text."""
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return yaml.safe_dump(choice, default_flow_style=True).strip()


def point(space, where: str, base_losses, fixed=None) -> dict:
    """The space's 'low', 'mid' or 'high' corner (first, middle or last choice), like sample() returns."""
    values = {}
    for key in _ordered(space):
        if _inactive(key, values, base_losses):
            continue
        spec = space[key]
        if fixed and key in fixed:
            values[key] = fixed[key]
        elif spec["type"] == "categorical":
            choices = spec["choices"]
            values[key] = choices[{"low": 0, "mid": len(choices) // 2, "high": -1}[where]]
        elif spec["type"] == "loss_weights":
            lo, hi = spec["low"], spec["high"]
            values[key] = normalize_weights({"low": [lo, hi, hi], "mid": [1, 1, 1], "high": [hi, lo, lo]}[where])
        else:
            values[key] = _corner(spec, where)
    return values


def _corner(spec, where):
    low, high = spec["low"], spec["high"]
    if where != "mid":
        value = low if where == "low" else high
    elif spec["log"]:
        value = math.sqrt(low * high)
    else:
        value = (low + high) / 2
        if spec["step"]:
            value = low + round((value - low) / spec["step"]) * spec["step"]
    return int(round(value)) if spec["type"] == "int" else float(value)


def to_overrides(values: dict, base_losses: dict) -> dict:
    """Sampled values -> TrainConfig overrides; losses.<task>.<option> keys go into that task's full loss spec."""
    overrides = {k: v for k, v in values.items() if not k.startswith("losses.")}
    dotted = [k for k in _ordered(values) if k.startswith("losses.")]
    if dotted:
        losses = {task: dict(spec) for task, spec in base_losses.items()}
        for key in dotted:
            _, task, option = key.split(".")
            if option == "name":  # NOTE: a new loss keeps only the base options it takes
                losses[task] = {"name": values[key], **{o: v for o, v in losses[task].items()
                                                        if o in names.LOSS_OPTIONS.get(values[key], ())}}
            else:
                losses[task][option] = values[key]
        overrides["losses"] = losses
    return overrides


def check_space(space: dict, settings: TuneSettings, path) -> config.TrainConfig:
    """Build the base config and one config at each corner of the space (and each choice); return the base."""
    base = config.build(settings.overrides, settings.config)
    if base.all_folds or base.resume:
        raise ConfigError("tune.py trains one fold per trial from scratch: leave all_folds and resume out of "
                          "the config (choose the fold with --fold)")
    checks = [(where, point(space, where, base.losses)) for where in ("mid", "low", "high")]
    for key, spec in space.items():
        if spec["type"] == "categorical":
            checks += [(f"{key}={choice}", point(space, "mid", base.losses, {key: choice}))
                       for choice in spec["choices"]]
    for where, values in checks:
        try:
            config.build({**settings.overrides, **to_overrides(values, base.losses)}, settings.config)
        except ConfigError as exc:
            raise ConfigError(f"{path}: the search space gives a bad config at {where} "
                              f"({describe(values)}): {exc}") from None
    from mtl.data import read_people
    from mtl.model import check_trunk
    check_trunk(base.model, base.pretrained_file)  # NOTE: not only in each trial, where the model is built
    read_people(base.data)  # NOTE: a missing data folder stops here, not in every trial
    return base


def describe(values: dict) -> str:
    """'loss_weights [0.8, 1.4, 0.8], lr 0.0012': one trial's values for the log."""
    return ", ".join(f"{k} {fmt_value(v)}" for k, v in values.items())


def fmt_value(value):
    """A value as the log and the top-trials table show it: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(fmt_value(v) for v in value) + "]"
    return str(value)
