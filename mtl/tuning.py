"""Hyper-parameter search with Optuna over mtl's own training loop (`mtl.train.train`).

A study samples TrainConfig keys from a search-space YAML (configs/search_space.yaml: by default
the three task loss weights and the learning rate), trains one person-level fold per trial and
maximizes the validation 18-class macro F1 (the objective is named val_f1_18). Every epoch's F1
goes to the pruner (median by default, Hyperband on request). A trial that fails (NaN loss, out of
memory, a bad photo) is recorded as failed with its reason and the study goes on. Trials run in
Optuna's own `study.optimize`, which stops (MaxTrialsCallback) once the study has --trials finished
or running ones.

The study lives in `<out>/study.db` (SQLite), in `<out>/journal.log` (Optuna's JournalStorage, for
parallel worker processes) or in a database given by URL (several machines), so the same command
run again continues it: finished trials (complete or pruned) count toward --trials. A trial whose
worker died is failed and run again with the same values: by Optuna's storage heartbeat (database
storages, any machine, after --heartbeat-grace seconds) and, at once, by the next run on the same
machine (its process is gone).

Outputs in the study folder: base_config.yaml and search_space.yaml (what the trials start from and
vary), trials/<number>/ (each trial's run: config.yaml, best.pt, TensorBoard logs with its searched
values as hparams), trials.csv, best.yaml (the best trial's config, for `train_multitask.py --config
best.yaml`), history.png, importances.png and tensorboard/ (the study's F1 per trial).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import yaml

from mtl import config, labels
from mtl.errors import ConfigError, MTLError
from mtl.io import atomic_write_csv, atomic_write_text

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "configs" / "search_space.yaml"
SPACE_TYPES = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
               "categorical": {"choices"}, "loss_weights": {"low", "high"}}
# set by tune.py itself or its flags, or changing what the F1 is measured on
NOT_SEARCHABLE = ("data", "out", "resume", "all_folds", "folds", "fold", "device", "progress", "cache_dir")
PRUNERS = ("median", "hyperband", "none")
LOSS_WEIGHT_SUM = 3.0  # NOTE: normalized to sum 3, so the untuned default [1, 1, 1] is a point of the space
MEDIAN_STARTUP_TRIALS = 5
TOP_METRICS = ("mask_f1", "gender_f1", "age_f1")
START_WAIT_S = 300  # parallel workers wait this long at most for each other before their first trial
METRIC_NAME = "val_f1_18"  # the objective's name in Optuna (optuna-dashboard shows it)
HEARTBEAT_INTERVAL_S, HEARTBEAT_GRACE_S = 60, 180  # NOTE: a trial silent for 3 minutes is dead: run it again
MAX_RETRIES = 2  # a trial whose worker died runs again with the same values at most this often
START_TRIES = 5  # opening the study: tries while other machines create the same fresh database's tables
# the pip package of each database driver SQLAlchemy may ask for (module -> package)
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL", "mysql": "mysql-connector-python", "pg8000": "pg8000",
                   "asyncpg": "asyncpg", "pyodbc": "pyodbc", "oracledb": "oracledb", "cx_Oracle": "cx_Oracle",
                   "aiosqlite": "aiosqlite", "pysqlite2": "pysqlite3", "mariadb": "mariadb"}


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


# ---------------------------------------------------------------- search space
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
        if len(parts) != 3 or parts[1] not in config.TASK_LOSS_DEFAULTS or not parts[2]:
            raise ConfigError(f"{path}: {key}: loss keys look like losses.<task>.<option> with task one of "
                              f"{', '.join(config.TASK_LOSS_DEFAULTS)} (e.g. losses.age.label_smoothing)")
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
    from mtl.losses import LOSS_OPTIONS
    if not key.startswith("losses.") or key.endswith(".name"):
        return False
    _, task, option = key.split(".")
    name_key = f"losses.{task}.name"
    if name_key not in values:
        return False  # NOTE: a fixed loss that lacks the option is a config error, not a conditional
    return option not in LOSS_OPTIONS.get(values[name_key], ())


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
            encoded = [_encode(c) for c in spec["choices"]]
            values[key] = spec["choices"][encoded.index(trial.suggest_categorical(key, encoded))]
    return values


def _encode(choice):
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
    from mtl.losses import LOSS_OPTIONS
    overrides = {k: v for k, v in values.items() if not k.startswith("losses.")}
    dotted = [k for k in _ordered(values) if k.startswith("losses.")]
    if dotted:
        losses = {task: dict(spec) for task, spec in base_losses.items()}
        for key in dotted:
            _, task, option = key.split(".")
            if option == "name":  # NOTE: a new loss keeps only the base options it takes
                losses[task] = {"name": values[key], **{o: v for o, v in losses[task].items()
                                                        if o in LOSS_OPTIONS.get(values[key], ())}}
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
    read_people(base.data)  # NOTE: a missing data folder stops here, not in every trial
    return base


def describe(values: dict) -> str:
    """'loss_weights [0.8, 1.4, 0.8], lr 0.0012': one trial's values for the log."""
    return ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------- storage and study
def shown_storage(target) -> str:
    """The storage as it may be printed or written: a database URL with its password masked."""
    if not target or "://" not in str(target):
        return str(target)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        return make_url(str(target)).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<database URL>"  # NOTE: never echo a URL that cannot be read: it may hold a password


def check_database_url(url: str):
    """A one-line error, before any trial, for a URL SQLAlchemy cannot read or whose driver is not installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError("--storage: not a database URL (dialect+driver://USER:PASSWORD@HOST/DB, "
                          "e.g. postgresql://USER@HOST/DB) nor a journal file path") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"--storage {shown}: unknown database {parsed.drivername!r} (known to SQLAlchemy: "
                          f"postgresql, mysql, sqlite, mssql, oracle)") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = (exc.name or parsed.get_driver_name()).split(".")[0]
        raise ConfigError(f"--storage {shown}: the database driver {module!r} for {parsed.drivername}:// is not "
                          f"installed: pip install {DRIVER_PACKAGES.get(module, module)}") from None


def resolve_storage(settings: TuneSettings, log=print) -> str:
    """--storage, or the study folder's journal.log (parallel workers, or if it exists) or study.db (SQLite)."""
    import optuna
    target = settings.storage
    if target and "://" in target:
        if target.startswith("sqlite") and settings.workers > 1:
            raise ConfigError("SQLite does not take parallel writers: with --workers leave out --storage (a "
                              "journal file in the study folder is used) or give a postgresql:// URL")
        check_database_url(target)
        return target
    if target:
        return str(Path(target))
    out = Path(settings.out)
    journal, db = out / "journal.log", out / "study.db"
    db_url = f"sqlite:///{db.resolve()}"
    if journal.exists():
        return str(journal)
    if settings.workers == 1:
        return db_url
    if db.exists() and settings.study_name in optuna.get_all_study_names(db_url):
        optuna.copy_study(from_study_name=settings.study_name, from_storage=db_url,
                          to_storage=open_storage(str(journal)))
        log(f"copied study {settings.study_name!r} from {db} to {journal}, which parallel workers can share; "
            f"{db} is no longer used")
    return str(journal)


class RetryDeadTrial:
    """A trial whose worker died (no heartbeat within the grace period, or its process gone) runs again with the
    same values: Optuna's RetryFailedTrialCallback queues it, at most MAX_RETRIES times."""

    def __init__(self, log=print):
        from optuna.storages import RetryFailedTrialCallback
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NOTE: ExperimentalWarning
            self.retry = RetryFailedTrialCallback(max_retry=MAX_RETRIES)
        self.log = log

    def __call__(self, study, trial):
        runs = len(trial.system_attrs.get("retry_history", ())) + 1
        if runs > MAX_RETRIES:
            self.log(f"trial {trial.number}: its worker died; not run again (its values ran {runs} times)")
            return
        self.retry(study, trial)
        self.log(f"trial {trial.number}: its worker died (no heartbeat, or its process is gone); queued to run "
                 f"again with the same values")


def open_storage(target: str, settings: TuneSettings | None = None, log=print):
    """An Optuna storage: a journal file path (JournalStorage), or a database URL (RDBStorage with heartbeats, so a
    trial whose worker died is failed and run again, by any machine, after the grace period)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend
    if "://" not in target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(target)))
    settings = settings or TuneSettings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NOTE: ExperimentalWarning of heartbeat_interval
        return RDBStorage(target, heartbeat_interval=settings.heartbeat_interval,
                          grace_period=settings.heartbeat_grace, failed_trial_callback=RetryDeadTrial(log))


def median_warmup(epochs: int, warmup: int | None = None) -> int:
    """Epochs a trial trains before the median pruner may stop it: by default half of them, at least 2.

    Early ranks of the 18-class F1 say little about final ones: in bench/tuning_cost.py, judging from
    epoch 2 of 8 stopped a trial at F1 0.07 that, trained on, ended at 0.40 (the best but one so far).
    """
    return int(warmup) if warmup is not None else max(2, int(epochs) // 2)


def make_pruner(name: str, epochs: int, warmup: int | None = None):
    """median: MedianPruner (after 5 trials, from median_warmup epochs on); hyperband: Hyperband(1..epochs); none."""
    import optuna
    if name == "median":
        # NOTE: steps are epochs counted from 1: a warmup of n lets the pruner judge a trial after its n-th epoch
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS,
                                           n_warmup_steps=median_warmup(epochs, warmup))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, int(epochs)))
    return optuna.pruners.NopPruner()


def open_study(settings: TuneSettings, epochs: int, index: int = 0, log=print):
    """Create the study, or load it when it exists (a rerun, another worker or machine joins it); the objective is
    named val_f1_18. Machines starting at the same moment on a fresh database do not trip over each other."""
    import optuna
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DBAPIError
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for attempt in range(1, START_TRIES + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study = optuna.create_study(storage=open_storage(settings.storage, settings, log),
                                            study_name=settings.study_name, direction="maximize",
                                            pruner=make_pruner(settings.pruner, epochs, settings.pruner_warmup),
                                            load_if_exists=True)
                study.set_metric_names([METRIC_NAME])
            break
        except (DBAPIError, StorageInternalError) as exc:
            # NOTE: both create the tables of a fresh database (IntegrityError in PostgreSQL's catalog): the loser's
            # transaction is rolled back, and its next try finds the winner's tables
            if attempt == START_TRIES:
                raise ConfigError(f"cannot open study {settings.study_name!r} in {shown_storage(settings.storage)}: "
                                  f"{one_line(exc)}") from None
            time.sleep(random.uniform(0.1, 0.5) * attempt)
    seed = settings.sampler_seed
    if seed is not None:  # NOTE: offset per worker and per rerun, or they would replay the same trials
        seed += 1000 * index + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=settings.workers > 1)
    return study


def counted_states():
    """The trial states that count toward --trials."""
    from optuna.trial import TrialState
    return (TrialState.COMPLETE, TrialState.PRUNED)


def busy_states():
    """Finished or running: no new trial starts once --trials of these exist."""
    from optuna.trial import TrialState
    return (*counted_states(), TrialState.RUNNING)


def finished(study) -> int:
    """Trials that count toward --trials: complete and pruned ones (failed ones are retried)."""
    return len(study.get_trials(deepcopy=False, states=counted_states()))


def running(study) -> int:
    """Trials running now (here, in other workers or on other machines)."""
    from optuna.trial import TrialState
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def record_settings(study, base: config.TrainConfig, space: dict, settings: TuneSettings, log=print):
    """Keep the base config and space in the study; warn when a rerun changes them (trials would not compare)."""
    current = json.loads(json.dumps({"config": base.to_dict(), "space": space}))
    old = study.user_attrs.get("settings")
    if old is None:
        study.set_user_attr("settings", current)
        return
    changed = []
    for part in ("config", "space"):
        a, b = old.get(part, {}), current[part]
        changed += [f"{part} {k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
    if changed:
        log(f"warning: study {settings.study_name!r} was started with other settings, so its earlier trials "
            f"are not directly comparable: {'; '.join(changed)}")


def check_trial_folders(study, settings: TuneSettings):
    """Refuse a study folder whose trials/ holds runs that are not this study's (e.g. study.db deleted)."""
    root = Path(settings.out) / "trials"
    if not root.is_dir():
        return
    numbers = {str(t.number) for t in study.get_trials(deepcopy=False)}
    stray = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in numbers)
    if stray:
        raise ConfigError(f"{root} holds runs that are not trials of study {settings.study_name!r} in "
                          f"{shown_storage(settings.storage)} ({', '.join(stray[:5])}"
                          f"{', ...' if len(stray) > 5 else ''}); choose another --out or --study-name")


def _is_tmp(path: Path) -> bool:
    """An unfinished atomic write (mtl/io.py: .<name>.<random>.tmp next to its target)."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def clean_leftovers(study, settings: TuneSettings, log=print) -> list:
    """Remove what killed runs left behind: last.pt in the folders of trials not running (trials never resume)
    and unfinished atomic writes (.tmp) there and in the study folder."""
    from optuna.trial import TrialState
    out = Path(settings.out)
    live = {str(t.number) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    left = []
    if (out / "trials").is_dir():
        for folder in (p for p in (out / "trials").iterdir() if p.is_dir() and p.name not in live):
            left += [p for p in folder.iterdir() if p.name == "last.pt" or _is_tmp(p)]
    # NOTE: the study folder's own files are written in milliseconds: a .tmp a minute old is a killed write
    left += [p for p in out.iterdir() if _is_tmp(p) and time.time() - p.stat().st_mtime > 60]
    for path in left:
        with contextlib.suppress(OSError):
            path.unlink()
    if left:
        log(f"removed {len(left)} leftover file{'s' if len(left) > 1 else ''} of killed runs: "
            f"{', '.join(str(p.relative_to(out)) for p in sorted(left)[:5])}{', ...' if len(left) > 5 else ''}")
    return left


def _alive(pid) -> bool:
    """Whether a process of this machine is still running."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _has_heartbeat(study) -> bool:
    """Whether the study's storage records heartbeats (our RDB storages do; Optuna's JournalStorage cannot)."""
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None


def fail_dead_trials(study, log=print) -> int:
    """Fail the RUNNING trials of this machine whose process is gone (killed, crashed) and queue them again, at once
    (Optuna's heartbeat does it for any machine, but only after its grace period, and journals have none)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    host, storage, failed = socket.gethostname(), study._storage, 0  # NOTE: as Optuna's own fail_stale_trials
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        # NOTE: a trial just asked, or a retry that still carries its dead predecessor's worker, is not judged
        if not isinstance(worker, dict) or worker.get("trial") != t.number or worker.get("host") != host:
            continue
        if _alive(worker.get("pid")):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"its process (pid {worker.get('pid')} on "
                                                                  f"{host}) ended without a word (killed?)")
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # another worker failed it first (and queued it again)
        failed += 1
        RetryDeadTrial(log)(study, storage.get_trial(t._trial_id))
    return failed


def release_dead_trials(study, log=print):
    """Before counting trials: fail (and queue again) trials whose worker died, by Optuna's heartbeat where the
    storage has one, else by this machine's process table."""
    import optuna
    if _has_heartbeat(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    else:
        fail_dead_trials(study, log)


# ---------------------------------------------------------------- trials
def one_line(exc: BaseException) -> str:
    """'TrainingError: loss became nan at epoch 3, ...': the reason a trial failed, on one line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")[:400]


class NotNeeded(Exception):
    """This trial started when the study already had --trials finished or running ones (a race between workers)."""


class Objective:
    """study.optimize's objective and callback: one trial trains with mtl.train.train, reporting F1 every epoch, and
    returns its best F1; a failure is recorded with its reason; --max-failures in a row stop the study."""

    def __init__(self, settings: TuneSettings, space: dict, base: config.TrainConfig, log=print):
        self.settings, self.space, self.base, self.log = settings, space, base, log
        self.failures, self.error, self.taken_over = 0, None, None

    def __call__(self, trial) -> float:
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError

        import mtl.train
        settings, base = self.settings, self.base
        out = Path(settings.out) / "trials" / str(trial.number)

        def tlog(msg):
            self.log(f"[trial {trial.number}] {msg}")

        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=busy_states()) if t.number < trial.number]
        if len(earlier) >= settings.trials:  # NOTE: workers asking at the same moment: the later trial gives way
            trial.set_user_attr("fail_reason", f"not needed: the study already had {settings.trials} trials")
            raise NotNeeded(trial.number)
        if "worker" in trial.user_attrs:  # a retry: forget what its dead predecessor recorded
            trial.set_user_attr("fail_reason", "")
            trial.set_user_attr("epochs_run", 0)
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "trial": trial.number})
        try:
            values = sample(trial, self.space, base.losses)
            if "loss_weights" in values:
                trial.set_user_attr("loss_weights", values["loss_weights"])
                for task, weight in zip(labels.TASKS, values["loss_weights"]):
                    trial.set_user_attr(f"loss_weight_{task}_normalized", weight)
            cfg = config.build({**settings.overrides, **to_overrides(values, base.losses), "out": str(out)},
                               settings.config)
            trial.set_user_attr("config", cfg.to_dict())
            trial.set_user_attr("out", str(out))
            tlog(describe(values))

            def on_epoch(epoch, metrics):
                trial.set_user_attr("epochs_run", epoch)
                trial.report(float(metrics["f1"]), epoch)
                if epoch < cfg.epochs and trial.should_prune():  # NOTE: stopping after the last epoch saves nothing
                    raise optuna.TrialPruned(f"pruned at epoch {epoch} (f1 {metrics['f1']:.4f})")

            # NOTE: the study writes each trial's hparams (its searched values) itself, once: see log_trial_tensorboard
            result = mtl.train.train(cfg, on_epoch=on_epoch, log=tlog, log_hparams=False)
            if not math.isfinite(result["best_f1"]):
                raise TuningError(f"validation F1 is {result['best_f1']}")
            trial.set_user_attr("epochs_run", int(result["epochs_run"]))
            trial.set_user_attr("best_epoch", int(result["best_epoch"]))
            trial.set_user_attr("metrics", {k: float(v) for k, v in result["metrics"].items()
                                            if isinstance(v, (int, float))})
            return float(result["best_f1"])
        except optuna.TrialPruned as exc:
            tlog(str(exc))
            raise
        except KeyboardInterrupt:
            self._reason(trial, "interrupted (Ctrl-C)")
            raise
        except UpdateFinishedTrialError:
            self.taken_over = trial.number
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends this trial, not the study
            if not isinstance(exc, MTLError):
                tlog(traceback.format_exc().rstrip())
            tlog(f"failed: {one_line(exc)}; the study goes on")
            self._reason(trial, one_line(exc))
            raise
        finally:
            with contextlib.suppress(OSError):
                (out / "last.pt").unlink()  # NOTE: trials are never resumed; best.pt stays
            _free_memory()

    @staticmethod
    def _reason(trial, reason):
        with contextlib.suppress(Exception):
            trial.set_user_attr("fail_reason", reason)

    def after_trial(self, study, frozen):
        """study.optimize's callback: log the result, write TensorBoard, count failures in a row, free dead trials."""
        from optuna.trial import TrialState
        if str(frozen.user_attrs.get("fail_reason", "")).startswith("not needed"):
            return
        if frozen.state == TrialState.COMPLETE:
            self.log(f"[trial {frozen.number}] f1 {frozen.value:.4f} (epoch {frozen.user_attrs.get('best_epoch')}); "
                     f"best so far {study.best_value:.4f} (trial {study.best_trial.number})")
        log_trial_tensorboard(study, frozen, self.settings)
        self.failures = self.failures + 1 if frozen.state == TrialState.FAIL else 0
        if self.failures >= self.settings.max_failures:
            self.error = TuningError(f"{self.failures} trials in a row failed (last: "
                                     f"{frozen.user_attrs.get('fail_reason')}); see trials.csv in {self.settings.out}")
            study.stop()
        release_dead_trials(study, self.log)  # NOTE: before MaxTrialsCallback counts the running ones


def _free_memory():
    """Give the failed or finished trial's GPU memory back before the next one (a full gc takes ~1 s)."""
    import torch
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def searched_values(frozen) -> dict:
    """A trial's searched values as trained: its params, with the normalized loss weights for the raw draws."""
    values = {k: v for k, v in frozen.params.items() if not k.startswith("loss_weight_")}
    values.update({k: v for k, v in frozen.user_attrs.items() if k.startswith("loss_weight_")
                   and k.endswith("_normalized")})
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}


BOARD_METRICS = ("f1", *TOP_METRICS, "epochs_run")


def write_board_experiment(space: dict, settings: TuneSettings):
    """The study's one HPARAMS experiment (tensorboard/): a column per searched value, the trials' metrics."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams
    example = {}
    for key, spec in space.items():  # NOTE: every key, also loss options only some trials take
        if spec["type"] == "loss_weights":
            example.update({f"loss_weight_{task}_normalized": 1.0 for task in labels.TASKS})
        elif spec["type"] == "categorical":
            choice = _encode(spec["choices"][0])
            example[key] = choice if isinstance(choice, (bool, int, float, str)) else str(choice)
        else:
            example[key] = spec["low"]
    example["state"] = "COMPLETE"
    experiment, _, _ = hparams(example, {f"hparam/{k}": 0.0 for k in BOARD_METRICS},
                               hparam_domain_discrete={"state": ["COMPLETE", "PRUNED"]})
    with SummaryWriter(str(Path(settings.out) / "tensorboard")) as writer:
        writer.file_writer.add_summary(experiment)


def log_trial_tensorboard(study, frozen, settings: TuneSettings):
    """A finished trial once in TensorBoard's HPARAMS tab (its searched values and metrics, in its own run folder
    beside its curves), and the study's f1 and best f1 by trial number (tensorboard/)."""
    if frozen.state not in counted_states() or frozen.value is None:
        return
    from optuna.trial import TrialState
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams
    values = {**searched_values(frozen), "state": frozen.state.name}
    metrics = {"hparam/f1": float(frozen.value), "hparam/epochs_run": int(frozen.user_attrs.get("epochs_run", 0)),
               **{f"hparam/{k}": float(v) for k, v in frozen.user_attrs.get("metrics", {}).items() if k in TOP_METRICS}}
    _, session_start, session_end = hparams(values, metrics)
    trial_out = Path(frozen.user_attrs.get("out") or Path(settings.out) / "trials" / str(frozen.number))
    with SummaryWriter(str(trial_out)) as writer:
        writer.file_writer.add_summary(session_start)
        writer.file_writer.add_summary(session_end)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value)
    earlier = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if t.number <= frozen.number]
    with SummaryWriter(str(Path(settings.out) / "tensorboard")) as writer:
        writer.add_scalar("study/f1", frozen.value, frozen.number)
        if earlier:
            writer.add_scalar("study/best_f1", max(earlier), frozen.number)


# ---------------------------------------------------------------- workers
def run_worker(settings: TuneSettings, index: int = 0, log=print, study=None, ready=None) -> str:
    """Run trials (study.optimize) until the study has --trials finished or running ones ('done'), the timeout
    passes ('timeout') or --max-failures trials in a row fail (TuningError); with `ready` (a Barrier) start with the
    other workers."""
    import optuna
    space = load_space(settings.space)
    base = config.build(settings.overrides, settings.config)
    if settings.workers > 1:
        settings = _worker_device(settings, base, index)
    study = study or open_study(settings, base.epochs, index, log)
    if ready is not None:  # NOTE: the first worker would otherwise run trials alone while the others import torch
        with contextlib.suppress(threading.BrokenBarrierError):
            ready.wait(timeout=START_WAIT_S)
    objective = Objective(settings, space, base, log)
    stop_at_trials = optuna.study.MaxTrialsCallback(settings.trials, states=busy_states())
    deadline = time.time() + settings.timeout if settings.timeout else None
    while True:
        release_dead_trials(study, log)
        if len(study.get_trials(deepcopy=False, states=busy_states())) >= settings.trials:
            return "done"
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
            log(f"--timeout {settings.timeout:g}s reached: no new trials")
            return "timeout"
        try:
            study.optimize(objective, timeout=left, catch=(Exception,),
                           callbacks=[objective.after_trial, stop_at_trials])
        except ValueError:  # NOTE: Optuna's "Cannot tell a FAIL trial": another worker took this one for dead
            if objective.taken_over is None:
                raise
            log(f"[trial {objective.taken_over}] another worker took this trial for dead (no heartbeat for "
                f"{settings.heartbeat_grace} s) and queued it again; going on")
            objective.taken_over = None
        if objective.error is not None:
            raise objective.error


def _worker_device(settings, base, index):
    """Worker i trains on GPU i (mod the count) when there are several; on CPU it takes its share of the cores."""
    import torch
    overrides = dict(settings.overrides)
    if base.device == "auto" and torch.cuda.is_available():
        if torch.cuda.device_count() > 1:
            overrides["device"] = f"cuda:{index % torch.cuda.device_count()}"
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))
    return dataclasses.replace(settings, overrides=overrides)


def _worker_main(settings: TuneSettings, index: int, ready):
    """Entry point of a spawned worker process."""
    def log(msg):
        print(msg, flush=True)
    _quiet_optuna()
    try:
        run_worker(settings, index, log, ready=ready)
    except KeyboardInterrupt:
        sys.exit(130)
    except MTLError as exc:
        print(f"[worker {index}] error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_parallel(settings: TuneSettings, study, log=print):
    """Run --workers workers on the shared study: this process and workers - 1 spawned ones; wait for all."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")  # NOTE: no fork of a process that may hold CUDA or threads
    ready = ctx.Barrier(settings.workers)
    procs = [ctx.Process(target=_worker_main, args=(settings, i, ready), name=f"tune-worker-{i}")
             for i in range(1, settings.workers)]
    for p in procs:
        p.start()
    log(f"{settings.workers} workers: this process and pids {', '.join(str(p.pid) for p in procs)}")
    error = None
    try:
        run_worker(settings, 0, log, study=study, ready=ready)
    except TuningError as exc:
        error = exc
    except KeyboardInterrupt:
        # NOTE: Ctrl-C in a terminal reaches the workers too: each marks its running trial failed and exits;
        # a worker still running after 10 s (only this process was interrupted) gets its own SIGINT
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
        raise
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    if error is None and any(codes):
        error = TuningError(f"worker exit codes {codes}; see their messages above")
    if error is not None:
        raise error



# ---------------------------------------------------------------- outputs
def trials_table(study):
    """One row per trial: number, state, f1, epochs run, searched values (normalized loss weights), reason, retry."""
    import pandas as pd
    trials = study.get_trials(deepcopy=False)
    retried_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")}
    rows = []
    for t in trials:
        attrs = t.user_attrs
        row = {"number": t.number, "state": t.state.name, "f1": t.value,
               "epochs_run": attrs.get("epochs_run", 0), "best_epoch": attrs.get("best_epoch"),
               "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None}
        row.update({k: v for k, v in t.params.items() if not k.startswith("loss_weight_")})
        if "loss_weights" in attrs:
            row["loss_weights"] = str(attrs["loss_weights"])
        row.update({k: attrs.get("metrics", {}).get(k) for k in TOP_METRICS})
        reason = attrs.get("fail_reason", "") if t.state.name == "FAIL" else ""
        if t.state.name == "FAIL" and not reason:
            reason = "its worker stopped without a word (killed, or its machine died: no heartbeat)"
        if t.number in retried_as:
            reason += f"; run again as trial {retried_as[t.number]}"
        history = t.system_attrs.get("retry_history")
        row.update(fail_reason=reason, retry_of=history[-1] if history else None, out=attrs.get("out", ""))
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        for column in ("best_epoch", "retry_of"):
            table[column] = table[column].astype("Int64")
        tail = [c for c in ("loss_weights", *TOP_METRICS, "fail_reason", "retry_of", "out") if c in table]
        table = table[[c for c in table if c not in tail] + tail]
    return table


def top_table(table, top: int) -> str:
    """The best complete trials as text: rank, trial, f1, epochs run and searched values."""
    done = table[table["state"] == "COMPLETE"].sort_values("f1", ascending=False).head(top)
    if not len(done):
        return "no complete trial yet"
    shown = done.drop(columns=[c for c in ("state", "fail_reason", "retry_of", "out", "duration_s") if c in done])
    shown = shown.rename(columns={"number": "trial", "epochs_run": "epochs"})
    shown.insert(0, "rank", range(1, len(shown) + 1))
    return shown.to_string(index=False, formatters={c: _fmt for c in shown if shown[c].dtype.kind == "f"})


def write_best_yaml(best, settings: TuneSettings) -> Path:
    """The best trial's full config, loadable as is by train_multitask.py --config (out left to the new run)."""
    values = {**best.user_attrs["config"], "out": None, "resume": None, "progress": True}
    cfg = config.build(base=values)
    path = Path(settings.out) / "best.yaml"
    header = (f"# best trial {best.number} of study {settings.study_name!r}: 18-class macro F1 {best.value:.4f} "
              f"(epoch {best.user_attrs.get('best_epoch')} of {best.user_attrs.get('epochs_run')})\n"
              f"# loss weights normalized to sum {LOSS_WEIGHT_SUM:g}; train it with\n"
              f"#   python train_multitask.py --config {path}\n")
    return atomic_write_text(header + config.dump(cfg), path)


def write_plots(study, settings: TuneSettings, log=print) -> list:
    """history.png (F1 by trial) and importances.png (fANOVA); importances need 2 complete trials that differ."""
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    from mtl.plots import save_png
    import matplotlib.pyplot as plt
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    out, written = Path(settings.out), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna_plots.plot_optimization_history(study, target_name="18-class macro F1")
        ax.legend(loc="best")  # NOTE: Optuna puts it outside the axes, where savefig clips it
        ax.figure.tight_layout()
        written.append(save_png(ax.figure, out / "history.png"))
        varying = {k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1}
        if len(complete) < 2 or not varying:
            log("no importances.png yet: it needs 2 complete trials with different values")
            return written
        try:
            ax = optuna_plots.plot_param_importances(study, target_name="18-class macro F1")
            ax.set_xlim(0, ax.get_xlim()[1] * 1.12)  # room for the value written after the longest bar
            ax.figure.tight_layout()  # NOTE: room for the long parameter names (losses.age.label_smoothing)
            written.append(save_png(ax.figure, out / "importances.png"))
        except (ValueError, RuntimeError) as exc:
            plt.close("all")
            log(f"no importances.png: {one_line(exc)}")
    return written


def write_outputs(study, settings: TuneSettings, log=print) -> dict:
    """trials.csv, best.yaml, plots; print the top trials; return a summary."""
    out = Path(settings.out)
    table = trials_table(study)
    if len(table):
        atomic_write_csv(table, out / "trials.csv")
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: t.value) if complete else None
    files = ["trials.csv"] if len(table) else []
    if best is not None and "config" in best.user_attrs:
        try:
            write_best_yaml(best, settings)
            files.append("best.yaml")
        except ConfigError as exc:  # NOTE: e.g. a trial recorded by another version of mtl
            log(f"warning: no best.yaml: trial {best.number}'s config does not load: {exc}")
    files += [p.name for p in write_plots(study, settings, log)]
    epochs = int(table["epochs_run"].sum()) if len(table) else 0
    if len(table):
        log(f"top trials of study {settings.study_name!r}:\n{top_table(table, settings.top)}")
    state_text = ", ".join(f"{counts[s]} {word}" for s, word in (("COMPLETE", "complete"), ("PRUNED", "pruned"),
                                                                   ("FAIL", "failed"), ("RUNNING", "running"))
                           if counts.get(s))
    log(f"study {settings.study_name!r}: {finished(study)} of {settings.trials} trials finished ({state_text or 'none'}"
        f"), {epochs} epochs trained")
    if best is not None:
        log(f"best trial {best.number}: 18-class macro F1 {best.value:.4f}; outputs in {out} "
            f"({', '.join(files)}); compare trials: tensorboard --logdir {out}")
    return {"out": str(out), "study_name": settings.study_name, "storage": shown_storage(settings.storage),
            "counts": counts,
            "finished": finished(study), "epochs_run": epochs, "table": table,
            "best": None if best is None else {"number": best.number, "f1": best.value, "params": best.params,
                                               "loss_weights": best.user_attrs.get("loss_weights"),
                                               "config": str(out / "best.yaml")}}


# ---------------------------------------------------------------- main entry
def _quiet_optuna():
    """Optuna's warnings only; not its line per failed trial with a traceback (tune's own line gives the reason)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").setLevel(logging.ERROR)


def tune(settings: TuneSettings, log=print) -> dict:
    """Run (or continue) a study until it has --trials finished trials (or finished and running elsewhere); write
    its outputs; return a summary."""
    _quiet_optuna()
    settings = check_settings(settings)
    space = load_space(settings.space)
    base = check_space(space, settings, settings.space)
    for key in (k for k in space if k in settings.overrides):
        log(f"warning: {key} is searched ({settings.space}), so its value from the command line is not used")
    settings = dataclasses.replace(settings, storage=resolve_storage(settings, log))
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.dump(base), out / "base_config.yaml")  # what every trial starts from
    atomic_write_text(yaml.safe_dump(space, sort_keys=False), out / "search_space.yaml")
    study = open_study(settings, base.epochs, log=log)
    record_settings(study, base, space, settings, log)
    check_trial_folders(study, settings)
    fail_dead_trials(study, log)  # NOTE: this machine's killed trials at once, not after the heartbeat's grace
    clean_leftovers(study, settings, log)
    write_board_experiment(space, settings)
    done, elsewhere = finished(study), running(study)
    log(f"study {settings.study_name!r} in {shown_storage(settings.storage)}: {done} of {settings.trials} trials "
        f"finished{f', {elsewhere} running elsewhere' if elsewhere else ''}"
        f"{'' if done + elsewhere < settings.trials else '; nothing to run'}; pruner {settings.pruner}, "
        f"{settings.workers} worker{'s' if settings.workers > 1 else ''}")
    error = None
    try:
        if done + elsewhere < settings.trials and settings.workers > 1:
            run_parallel(settings, study, log)
        elif done + elsewhere < settings.trials:
            run_worker(settings, 0, log, study=study)
    except TuningError as exc:
        error = exc
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            write_outputs(study, settings, log)
        raise
    result = write_outputs(study, settings, log)
    if error is not None:
        raise error
    elsewhere = running(study)
    if result["finished"] < settings.trials and elsewhere:
        log(f"{elsewhere} trial{'s are' if elsewhere > 1 else ' is'} still running elsewhere (another machine or "
            f"process), which completes the study; this one is done (run it again later to refresh the outputs)")
    return result
