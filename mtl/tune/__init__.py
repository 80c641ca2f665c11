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

The package, one concern a module: settings (TuneSettings and its checks), space (the search space: load,
sample, configs), study (storage, opening, dead trials, leftovers), objective (one trial), workers (the
study.optimize loop, parallel processes), outputs (trials.csv, best.yaml, plots, TensorBoard); `tune` below
runs a study from start to end.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import yaml

from mtl import config
from mtl.io import atomic_write_text
from mtl.tune.outputs import write_board_experiment, write_outputs
from mtl.tune.settings import DEFAULT_SPACE, TuneSettings, TuningError, check_settings
from mtl.tune.space import check_space, load_space
from mtl.tune.study import (
    check_trial_folders,
    clean_leftovers,
    fail_dead_trials,
    finished,
    open_study,
    quiet_optuna,
    record_settings,
    resolve_storage,
    running,
    shown_storage,
)
from mtl.tune.workers import run_parallel, run_worker

__all__ = ["DEFAULT_SPACE", "TuneSettings", "TuningError", "check_settings", "tune"]


def tune(settings: TuneSettings, log=print) -> dict:
    """Run (or continue) a study until it has --trials finished trials (or finished and running elsewhere); write
    its outputs; return a summary."""
    settings = check_settings(settings)
    space = load_space(settings.space)
    base = check_space(space, settings, settings.space)
    quiet_optuna()  # NOTE: optuna loads once the flags and the space are known to be good
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
