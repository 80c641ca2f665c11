"""Trial workers: study.optimize in this process, or --workers processes on one journal (one per GPU)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time

from mtl import config
from mtl.errors import MTLError
from mtl.tune.objective import Objective
from mtl.tune.settings import TuneSettings, TuningError
from mtl.tune.space import load_space
from mtl.tune.study import busy_states, open_study, quiet_optuna, release_dead_trials

START_WAIT_S = 300  # parallel workers wait this long at most for each other before their first trial


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
    quiet_optuna()
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
