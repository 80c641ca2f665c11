"""The study and its storage: SQLite, a journal file or a database URL (driver checked, password masked), opened
race-free, with heartbeats; a trial whose worker died is failed and run again; leftovers of killed trials removed."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import time
import warnings
from pathlib import Path

from mtl import config
from mtl.errors import ConfigError
from mtl.tune.settings import TuneSettings, one_line

MEDIAN_STARTUP_TRIALS = 5

METRIC_NAME = "val_f1_18"  # the objective's name in Optuna (optuna-dashboard shows it)

MAX_RETRIES = 2  # a trial whose worker died runs again with the same values at most this often

START_TRIES = 5  # opening the study: tries while other machines create the same fresh database's tables

# the pip package of each database driver SQLAlchemy may ask for (module -> package)
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL", "mysql": "mysql-connector-python", "pg8000": "pg8000",
                   "asyncpg": "asyncpg", "pyodbc": "pyodbc", "oracledb": "oracledb", "cx_Oracle": "cx_Oracle",
                   "aiosqlite": "aiosqlite", "pysqlite2": "pysqlite3", "mariadb": "mariadb"}


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


def quiet_optuna():
    """Optuna's warnings only; not its line per failed trial with a traceback (tune's own line gives the reason)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").setLevel(logging.ERROR)


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
