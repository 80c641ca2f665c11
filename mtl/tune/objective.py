"""One trial: sample its values, train with mtl.train.train reporting F1 every epoch, record the outcome."""
from __future__ import annotations

import contextlib
import gc
import math
import os
import socket
import traceback
from pathlib import Path

from mtl import config, labels
from mtl.errors import MTLError
from mtl.tune.outputs import log_trial_tensorboard
from mtl.tune.settings import TuneSettings, TuningError, one_line
from mtl.tune.space import describe, sample, to_overrides
from mtl.tune.study import busy_states, release_dead_trials


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
            if not math.isfinite(result.best_f1):
                raise TuningError(f"validation F1 is {result.best_f1}")
            trial.set_user_attr("epochs_run", int(result.epochs_run))
            trial.set_user_attr("best_epoch", int(result.best_epoch))
            trial.set_user_attr("metrics", {k: float(v) for k, v in result.metrics.items()
                                            if isinstance(v, (int, float))})
            return float(result.best_f1)
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
