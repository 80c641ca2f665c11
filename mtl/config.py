"""Training configuration: one flat dataclass, YAML files in configs/, command-line overrides.

Precedence: TrainConfig defaults < the YAML file given with --config (which may name a `base:`
YAML it extends) < command-line flags. The resolved config is written next to every run
(`config.yaml`) and stored in its checkpoints, so any run can be repeated with
`train_multitask.py --config runs/NAME/config.yaml`.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import yaml

from mtl import labels
from mtl.errors import ConfigError
from mtl.transforms import check_augment, size_pair

# per-task loss settings; 'joint' is the 18-way loss of --arch joint18
TASK_LOSS_DEFAULTS = {"mask": {"name": "ce"}, "gender": {"name": "bce"}, "age": {"name": "ce"},
                      "joint": {"name": "ce"}}


@dataclasses.dataclass
class TrainConfig:
    # data
    data: str = "data"
    out: str | None = None
    age_threshold: int = labels.DEFAULT_AGE_THRESHOLD
    drop_ages: str | None = None
    relabel: str | None = None
    extra: list = dataclasses.field(default_factory=list)
    folds: int = 5
    fold: int = 0
    all_folds: bool = False
    seed: int = 42
    skip_bad: bool = False
    cache: bool = True
    cache_dir: str | None = None
    workers: int = 2
    # preprocessing and augmentation
    img_size: list = dataclasses.field(default_factory=lambda: [192, 256])
    load_size: list | None = None
    center_crop: list | None = None
    augment: str = "strong"
    oversample_old: int = 0
    oversample_augment: str = "strong"
    # model
    model: str = "efficientnet_b3"
    arch: str = "multihead"
    head: str = "linear"
    pretrained: bool = True
    pretrained_file: str | None = None
    head_dropout: float = 0.2
    drop_path_rate: float = 0.1
    age_reg_weight: float = 0.0
    # losses
    losses: dict = dataclasses.field(default_factory=lambda: {t: dict(v) for t, v in TASK_LOSS_DEFAULTS.items()})
    loss_weights: list = dataclasses.field(default_factory=lambda: [1.0, 1.0, 1.0])
    loss_weighting: str = "fixed"
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    eta_min: float = 1e-6
    grad_clip: float = 1.0
    accumulate: int = 1
    amp: str = "auto"
    channels_last: bool | str = "auto"  # auto: on CUDA only; true asks for it on the CPU too
    compile: bool = False
    ema: float = 0.0
    sampler: str = "none"
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 0.5
    patience: int = 0
    # running
    device: str = "auto"
    resume: str | None = None
    log_images: int = 32
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
CHOICES = {"arch": ("multihead", "joint18", "separate"), "loss_weighting": ("fixed", "uncertainty"),
           "amp": ("auto", "bf16", "fp16", "off"), "sampler": ("none", "balanced"),
           "device": None}


def load_yaml(path) -> dict:
    """A config YAML (following `base:` chains) -> dict of keys, checked against TrainConfig's fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must be a mapping of config keys")
    base = values.pop("base", None)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    if base:
        return {**load_yaml(path.parent / base), **values}
    return values


def build(overrides: dict | None = None, config_file=None, base: dict | None = None) -> TrainConfig:
    """TrainConfig from defaults < base dict (e.g. a checkpoint's config) or YAML file < overrides, validated."""
    values = dict(base or {})
    values.update(load_yaml(config_file) if config_file else {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "losses" in overrides and isinstance(values.get("losses"), dict):
        overrides["losses"] = {**values["losses"], **overrides["losses"]}  # per task: a flag replaces one task's
    values.update(overrides)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}")
    if "losses" in values:
        values["losses"] = merge_losses(values["losses"])
    return validate(TrainConfig(**values))


def merge_losses(losses) -> dict:
    """Per-task loss settings over the defaults: {'age': {'name': 'focal', 'gamma': 2}} keeps mask and gender."""
    if not isinstance(losses, dict) or set(losses) - set(TASK_LOSS_DEFAULTS):
        raise ConfigError(f"losses must map tasks ({', '.join(TASK_LOSS_DEFAULTS)}) to settings, got {losses!r}")
    merged = {t: dict(v) for t, v in TASK_LOSS_DEFAULTS.items()}
    for task, spec in losses.items():
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
        spec[key.strip()] = yaml.safe_load(value)
    return spec


def _positive(cfg, name, allow_zero=False):
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"--{name.replace('_', '-')} must be a {'non-negative' if allow_zero else 'positive'} "
                          f"number, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value a user can get wrong; raise one ConfigError naming the flag."""
    cfg.age_threshold = labels.check_threshold(cfg.age_threshold)
    for name, choices in CHOICES.items():
        if choices and getattr(cfg, name) not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                              f"got {getattr(cfg, name)!r}")
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
                 "oversample_old"):
        _positive(cfg, name, allow_zero=True)
    if cfg.ema >= 1 or cfg.mix_prob > 1 or cfg.head_dropout >= 1:
        raise ConfigError("--ema and --head-dropout must be below 1 and --mix-prob at most 1")
    for name in ("epochs", "batch_size", "accumulate", "folds", "fold", "patience", "seed", "workers",
                 "oversample_old"):
        if int(getattr(cfg, name)) != getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} must be a whole number, got {getattr(cfg, name)!r}")
    from mtl.splits import check_fold
    check_fold(cfg.folds, cfg.fold)
    cfg.img_size = list(size_pair(cfg.img_size, "--img-size"))
    cfg.load_size = list(size_pair(cfg.load_size, "--load-size")) if cfg.load_size else None
    cfg.center_crop = list(size_pair(cfg.center_crop, "--center-crop")) if cfg.center_crop else None
    if cfg.channels_last not in ("auto", True, False):
        raise ConfigError(f"channels_last must be auto, true or false, got {cfg.channels_last!r}")
    check_augment(cfg.augment)
    check_augment(cfg.oversample_augment)
    cfg.extra = [cfg.extra] if isinstance(cfg.extra, str) else list(cfg.extra or [])
    from mtl.data import parse_age_range
    parse_age_range(cfg.drop_ages)
    from mtl.losses import check_loss_spec
    from mtl.model import check_model_config
    for task in TASK_LOSS_DEFAULTS:
        check_loss_spec(task, cfg.losses[task])
    check_model_config(cfg)
    return cfg


def dump(cfg: TrainConfig) -> str:
    """The resolved config as YAML, loadable with --config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
