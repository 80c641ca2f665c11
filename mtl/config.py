"""Training configuration: one flat dataclass, YAML files in configs/, command-line overrides.

TrainConfig is the one schema of the settings: each field's name, type, --help group and text, and choices
(the names in mtl.names, which the registries that implement them share: model.ARCHS, model.HEADS,
transforms.AUGMENTATIONS, ...); mtl.cli generates the training flags from it and `validate` checks the choices.

Precedence, lowest first: configs/default.yaml (the one place default values live; found next to the
package, whatever the working directory) < a base dict (a checkpoint's config, for --resume) < the
YAML file given with --config (which may name a `base:` YAML it extends) < command-line flags.
`losses` merges per task: a layer that sets `losses: {age: ...}` keeps the other tasks' losses.
Every value is read by its field's type (`lr: 1e-3` is a float, `cache: "off"` is false, `folds:
five` is an error naming the key). The resolved config is written next to every run
(`config.yaml`) and stored in its checkpoints, so any run can be repeated with
`train_multitask.py --config runs/NAME/config.yaml`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path

import yaml

from mtl import labels, names
from mtl.checks import check_device_name, check_fold, check_loss_spec, parse_age_range, size_pair
from mtl.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent / "configs"  # NOTE: package data; in the checkout a link to configs/
DEFAULT_CONFIG = CONFIGS / "default.yaml"


def setting(choices=None, flags=None, **argparse_keywords):
    """A TrainConfig field's schema: its type is the annotation; its value, --help text and section are in
    configs/default.yaml (`docs`).

    choices: the names (mtl.names) of the values it takes; flags: for a switch, {flag: (value it sets, the flag's
    help)}; argparse_keywords: nargs, metavar or action.
    """
    return dataclasses.field(metadata={"choices": choices, "flags": flags, "argparse": argparse_keywords})


SIZE = {"nargs": "+", "metavar": "N"}


@dataclasses.dataclass
class TrainConfig:
    """The settings of one run: names, types and choices; each one's value and meaning are in configs/default.yaml.

    mtl.cli.add_train_arguments makes each field a flag from this schema and `docs`; validate checks the values.
    """
    # data
    data: str = setting()
    out: str | None = setting()
    age_threshold: int = setting()
    drop_ages: str | None = setting()
    relabel: str | None = setting()
    extra: list[str] | None = setting(action="append")
    folds: int = setting()
    fold: int = setting()
    all_folds: bool = setting()
    seed: int = setting()
    skip_bad: bool = setting()
    cache: bool = setting(flags={"--no-cache": (False, "decode JPEGs every time")})
    cache_dir: str | None = setting()
    workers: int = setting()
    # preprocessing and augmentation
    img_size: list[int] = setting(**SIZE)
    load_size: list[int] | None = setting(**SIZE)
    center_crop: list[int] | None = setting(**SIZE)
    augment: str = setting(names.AUGMENTATIONS)
    oversample_old: int = setting()
    oversample_augment: str = setting(names.AUGMENTATIONS)
    # model
    model: str = setting()
    arch: str = setting(names.ARCHS)
    head: str = setting(names.HEADS)
    pretrained: bool = setting(flags={"--no-pretrained": (False, "random initial weights instead of ImageNet ones")})
    pretrained_file: str | None = setting()
    head_dropout: float = setting()
    drop_path_rate: float = setting()
    age_reg_weight: float = setting()
    freeze_blocks: int = setting()
    # losses
    losses: dict = setting(metavar="NAME[:k=v,...]")  # NOTE: one flag per task, --mask-loss ... --joint-loss
    loss_weights: list[float] = setting(nargs=3, metavar=("M", "G", "A"))
    loss_weighting: str = setting(names.WEIGHTINGS)
    # optimisation
    epochs: int = setting()
    batch_size: int = setting()
    lr: float = setting()
    weight_decay: float = setting()
    layer_decay: float = setting()
    warmup_epochs: float = setting()
    eta_min: float = setting()
    grad_clip: float = setting()
    accumulate: int = setting()
    amp: str = setting(names.AMP_MODES)
    channels_last: bool | str = setting(  # auto: on CUDA only; true asks for it on the CPU too
        flags={"--channels-last": (True, "channels_last memory format on any device (auto: CUDA only)"),
               "--no-channels-last": (False, "plain memory layout, also on CUDA")})
    compile: bool = setting()
    ema: float = setting()
    sampler: str = setting(names.SAMPLERS)
    mixup: float = setting()
    cutmix: float = setting()
    mix_prob: float = setting()
    patience: int = setting()
    # calibration
    calibrate: list[str] = setting(names.CALIBRATE, nargs="+", metavar="HEAD")
    # running
    device: str = setting()
    resume: str | None = setting()
    log_images: int = setting()
    progress: bool = setting(flags={"--no-progress": (False, "no progress bars")})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = typing.get_type_hints(TrainConfig)


def choices(key: str) -> tuple | None:
    """The values a setting takes (mtl.names; None: any value its type reads)."""
    return FIELDS[key].metadata["choices"]


@dataclasses.dataclass(frozen=True)
class Doc:
    """What configs/default.yaml says about a key: its --help section, its text, and what null means for it."""
    group: str
    text: str
    none_means: str = "none"


@functools.lru_cache(maxsize=1)
def docs() -> dict[str, Doc]:
    """{key: Doc} from configs/default.yaml's comments, the one place each setting is described.

    A top-level `key: value  # text; null: meaning` line documents key; a `# ---- section (...)` line starts the
    section of the keys below it.
    """
    found, group = {}, None
    for line in DEFAULT_CONFIG.read_text().splitlines():
        header = re.match(r"# ---- ([^(]+)", line)
        entry = re.match(r"(\w+):[^#]*(?:#\s*(.*))?$", line)
        if header:
            group = header.group(1).strip()
        elif entry and group:
            text, _, none_means = (entry.group(2) or "").partition("; null: ")
            found[entry.group(1)] = Doc(group, text.strip(), none_means.strip() or "none")
    return found


def value_text(key: str, value) -> str:
    """A setting's value as --help and the HPARAMS table show it: 'ce:label_smoothing=0.05', '240 320', ..."""
    if value is None:
        return docs()[key].none_means if key in docs() else "none"
    if isinstance(value, dict):
        options = ",".join(f"{k}={v}" for k, v in value.items() if k != "name")
        return f"{value.get('name')}{':' + options if options else ''}"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "none"
    return str(value)


# ---------------------------------------------------------------- YAML and typed values
class YamlLoader(yaml.SafeLoader):
    """YAML 1.2's core schema for plain values: only true/false are booleans (`off`, `no` stay text, read by the
    field's type) and `1e-3` is a float (YAML 1.1 reads it as text)."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_RESOLVERS = {_BOOL: re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
              _FLOAT: re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                                     |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                                     |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                                     |[-+]?\.(?:inf|Inf|INF)
                                     |\.(?:nan|NaN|NAN))$""", re.VERBOSE)}
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, _RESOLVERS.get(tag, regexp)) for tag, regexp in resolvers if tag != _BOOL or first in "tTfF"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", dict: "a mapping"}


def _scalar(value, kind, label):
    """value read as kind (bool, int, float, str), or a ConfigError naming the label."""
    out = None
    if kind is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE | _FALSE:
            out = str(value).strip().lower() in _TRUE
    elif kind is int and not isinstance(value, bool):
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, int) or (isinstance(number, float) and number.is_integer()):
                out = int(number)
    elif kind is float and not isinstance(value, bool):
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            out = float(value) if isinstance(value, (int, float, str)) else None
    elif kind is str and not isinstance(value, bool):
        out = value if isinstance(value, str) else (str(value) if isinstance(value, (int, float)) else None)
    elif kind is dict:
        out = value if isinstance(value, dict) else None
    if out is None:
        raise ConfigError(f"{label} must be {_WORDS.get(kind, kind.__name__)}, got {value!r}")
    return out


def read_value(key: str, value, label: str):
    """A config value read by its TrainConfig field's type (None where the field allows it; one item -> a list)."""
    kind = TYPES[key]
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        for option in options[:-1]:  # NOTE: the first type that reads the value wins (bool | str: true, or 'auto')
            with contextlib.suppress(ConfigError):
                return _scalar(value, option, label)
        kind = options[-1]
    if kind is list or typing.get_origin(kind) is list:
        item = (typing.get_args(kind) or (None,))[0]
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_scalar(v, item, label) if item else v for v in items]
    return _scalar(value, kind, label)


def read_values(values: dict, label) -> dict:
    """Every value read by its field's type; label(key) names it in errors ('--lr', 'configs/x.yaml: lr')."""
    return {key: read_value(key, value, label(key)) for key, value in values.items()}


def flag_name(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def _check_known(values: dict, where: str):
    unknown = sorted(str(k) for k in set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}unknown key(s) {', '.join(unknown)}")


def merge(lower: dict, upper: dict) -> dict:
    """upper's keys over lower's; `losses` per task (a layer that names one task's loss keeps the others')."""
    out = {**lower, **upper}
    if isinstance(lower.get("losses"), dict) and isinstance(upper.get("losses"), dict):
        out["losses"] = {**lower["losses"], **upper["losses"]}
    return out


def load_yaml(path, _chain=()) -> dict:
    """A config YAML (following `base:` chains) -> dict of keys read by their fields' types."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in _chain:
        names = " -> ".join(p.name for p in (*_chain, resolved))
        raise ConfigError(f"{path}: its `base:` chain comes back to itself ({names})")
    try:
        values = yaml.load(path.read_text(), Loader=YamlLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must be a mapping of config keys")
    base = values.pop("base", None)
    _check_known(values, f"{path}: ")
    values = read_values(values, lambda key: f"{path}: {key}")
    if base is None:
        return values
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must name a YAML file next to it, got {base!r}")
    return merge(load_yaml(path.parent / base, (*_chain, resolved)), values)


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    values = load_yaml(DEFAULT_CONFIG)
    missing = [name for name in FIELDS if name not in values]
    if missing:
        raise ConfigError(f"{DEFAULT_CONFIG}: lists no value for {', '.join(missing)}")
    return values


def defaults() -> dict:
    """The default value of every key, from configs/default.yaml (a fresh copy)."""
    return copy.deepcopy(_defaults())


# ---------------------------------------------------------------- build and check
def build(overrides: dict | None = None, config_file=None, base: dict | None = None) -> TrainConfig:
    """TrainConfig from configs/default.yaml < base dict (e.g. a checkpoint's config) < YAML file < overrides."""
    values = defaults()
    if base:
        _check_known(base, "config: ")
        values = merge(values, read_values(base, lambda key: f"config {key}"))
    if config_file:
        values = merge(values, load_yaml(config_file))
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_known(given, "config: ")
    given = read_values(given, flag_name)
    values = merge(values, given)
    if given.get("pretrained") is False and values.get("pretrained_file"):
        raise ConfigError(f"--no-pretrained contradicts --pretrained-file {values['pretrained_file']}: a weights "
                          f"file is always used; drop one of them")
    values["losses"] = merge_losses(values["losses"])
    return validate(TrainConfig(**values))


def merge_losses(losses) -> dict:
    """Per-task loss settings as {task: {'name': ..., options}} for every task ('focal' -> {'name': 'focal'})."""
    if not isinstance(losses, dict) or set(losses) != set(labels.LOSS_TASKS):
        raise ConfigError(f"losses must map the tasks ({', '.join(labels.LOSS_TASKS)}) to settings, got {losses!r}")
    merged = {}
    for task in labels.LOSS_TASKS:
        spec = losses[task]
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"losses.{task} must be a loss name or a mapping with a name, got {spec!r}")
        merged[task] = dict(spec)
    return merged


def parse_loss_spec(text: str) -> dict:
    """'focal:gamma=2,class_weights=balanced' -> {'name': 'focal', 'gamma': 2, 'class_weights': 'balanced'}."""
    name, _, rest = text.partition(":")
    spec = {"name": name.strip()}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"loss option {item!r} in {text!r} must look like key=value")
        spec[key.strip()] = yaml.load(value, Loader=YamlLoader)
    return spec


# ---------------------------------------------------------------- checks
def _positive(cfg, name, allow_zero=False):
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"--{name.replace('_', '-')} must be a {'non-negative' if allow_zero else 'positive'} "
                          f"number, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value a user can get wrong; raise one ConfigError naming the flag.

    NOTE: what needs the model or the machine (a timm model name, a weights file, a GPU) is checked where the
    run builds them (train.setup, model.create_backbone), as timm and torchvision do: this module imports nothing
    heavier than yaml, so a typo is answered at once.
    """
    cfg.age_threshold = labels.check_threshold(cfg.age_threshold)
    for name in FIELDS:
        known, value = choices(name), getattr(cfg, name)
        if known is not None and any(v not in known for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{flag_name(name)} must be one of {', '.join(known)}, got {value!r}")
    cfg.calibrate = check_calibrate(cfg.calibrate)
    weights = cfg.loss_weights
    if not isinstance(weights, (list, tuple)) or len(weights) != 3:
        raise ConfigError(f"--loss-weights takes three numbers (mask gender age), got {weights!r}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ConfigError(f"--loss-weights must be positive numbers, got {w!r}")
    cfg.loss_weights = [float(w) for w in weights]
    for name in ("lr", "epochs", "batch_size", "accumulate"):
        _positive(cfg, name)
    for name in ("weight_decay", "eta_min", "grad_clip", "warmup_epochs", "age_reg_weight", "ema", "mixup",
                 "cutmix", "mix_prob", "patience", "head_dropout", "drop_path_rate", "log_images", "workers",
                 "oversample_old", "freeze_blocks"):
        _positive(cfg, name, allow_zero=True)
    if not 0 < cfg.layer_decay <= 1:
        raise ConfigError(f"--layer-decay must be above 0 and at most 1 (1 = off), got {cfg.layer_decay!r}")
    if cfg.freeze_blocks and not cfg.pretrained:
        raise ConfigError(f"--freeze-blocks {cfg.freeze_blocks} keeps pretrained weights, and with --no-pretrained "
                          f"there are none: give --pretrained-file or drop --freeze-blocks")
    if cfg.ema >= 1 or cfg.mix_prob > 1 or cfg.head_dropout >= 1:
        raise ConfigError("--ema and --head-dropout must be below 1 and --mix-prob at most 1")
    check_fold(cfg.folds, cfg.fold)
    cfg.img_size = list(size_pair(cfg.img_size, "--img-size"))
    cfg.load_size = list(size_pair(cfg.load_size, "--load-size")) if cfg.load_size else None
    cfg.center_crop = list(size_pair(cfg.center_crop, "--center-crop")) if cfg.center_crop else None
    if cfg.channels_last not in ("auto", True, False):
        raise ConfigError(f"channels_last must be auto, true or false, got {cfg.channels_last!r}")
    cfg.extra = list(cfg.extra or [])
    if cfg.pretrained_file:
        cfg.pretrained = True  # NOTE: a weights file given is used, whatever `pretrained` says (README, Real data)
    parse_age_range(cfg.drop_ages)
    check_device_name(cfg.device)
    for task in labels.LOSS_TASKS:
        check_loss_spec(task, cfg.losses[task])
    return cfg


def check_calibrate(heads) -> list[str]:
    """--calibrate's heads in the order of labels.TASKS, each once; 'none' alone (or nothing) -> []."""
    if "none" in heads and len(heads) > 1:
        raise ConfigError(f"--calibrate takes heads ({', '.join(labels.TASKS)}) or none alone, got {' '.join(heads)}")
    return [task for task in labels.TASKS if task in heads]


def dump(cfg: TrainConfig) -> str:
    """The resolved config as YAML, loadable with --config (without `resume`: it repeats the run, not continues it)."""
    return yaml.safe_dump({**cfg.to_dict(), "resume": None}, sort_keys=False)
