"""One study's settings (what tune.py's flags say), their checks, and the errors tuning raises."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mtl.config import CONFIGS
from mtl.errors import ConfigError, MTLError
from mtl.names import PRUNERS

DEFAULT_SPACE = CONFIGS / "search_space.yaml"

HEARTBEAT_INTERVAL_S, HEARTBEAT_GRACE_S = 60, 180  # NOTE: a trial silent for 3 minutes is dead: run it again


class TuningError(MTLError):
    """The study cannot go on (e.g. trial after trial fails); the message gives the last reason."""


@dataclasses.dataclass
class TuneSettings:
    """One study's settings: what tune.py's flags say (overrides = the training flags given)."""
    trials: int = 50
    space: str = str(DEFAULT_SPACE)
    config: str | None = None
    overrides: dict = dataclasses.field(default_factory=dict)
    study_name: str = "mtl"
    storage: str | None = None
    out: str | None = None
    timeout: float | None = None
    pruner: str = "median"
    pruner_warmup: int | None = None
    workers: int = 1
    max_failures: int = 5
    sampler_seed: int | None = None
    top: int = 10
    heartbeat_interval: int = HEARTBEAT_INTERVAL_S
    heartbeat_grace: int = HEARTBEAT_GRACE_S


def check_settings(settings: TuneSettings) -> TuneSettings:
    """Validate the tuning flags; fill in the default study folder runs/tune/<study name>."""
    name = settings.study_name
    if not name or "/" in name or name.strip() != name:
        raise ConfigError(f"--study-name must be a plain name (it names the folder), got {name!r}")
    for flag, value, low in (("--trials", settings.trials, 1), ("--workers", settings.workers, 1),
                             ("--max-failures", settings.max_failures, 1), ("--top", settings.top, 1),
                             ("--heartbeat-interval", settings.heartbeat_interval, 1),
                             ("--heartbeat-grace", settings.heartbeat_grace, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{flag} must be a whole number >= {low}, got {value!r}")
    if settings.timeout is not None and not settings.timeout > 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {settings.timeout!r}")
    if settings.pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {settings.pruner!r}")
    if settings.heartbeat_grace <= settings.heartbeat_interval:
        raise ConfigError(f"--heartbeat-grace ({settings.heartbeat_grace} s) must be longer than "
                          f"--heartbeat-interval ({settings.heartbeat_interval} s), or live trials count as dead")
    warmup = settings.pruner_warmup
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1):
        raise ConfigError(f"--pruner-warmup must be a whole number of epochs >= 1, got {warmup!r}")
    out = settings.out or str(Path("runs") / "tune" / name)
    return dataclasses.replace(settings, out=out, overrides={**settings.overrides, "progress": False})


def one_line(exc: BaseException) -> str:
    """'TrainingError: loss became nan at epoch 3, ...': the reason a trial failed, on one line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")[:400]
