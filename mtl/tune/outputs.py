"""What a study leaves for people: trials.csv, the top-trials table, best.yaml, history.png, importances.png and
TensorBoard (each trial once in the HPARAMS tab)."""
from __future__ import annotations

import warnings
from pathlib import Path

from mtl import config, labels
from mtl.errors import ConfigError
from mtl.io import atomic_write_csv, atomic_write_text
from mtl.tune.settings import TuneSettings, one_line
from mtl.tune.space import LOSS_WEIGHT_SUM, encode_choice, fmt_value
from mtl.tune.study import counted_states, finished, shown_storage

TOP_METRICS = ("mask_f1", "gender_f1", "age_f1")

BOARD_METRICS = ("f1", *TOP_METRICS, "epochs_run")


def searched_values(frozen) -> dict:
    """A trial's searched values as trained: its params, with the normalized loss weights for the raw draws."""
    values = {k: v for k, v in frozen.params.items() if not k.startswith("loss_weight_")}
    values.update({k: v for k, v in frozen.user_attrs.items() if k.startswith("loss_weight_")
                   and k.endswith("_normalized")})
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}


def write_board_experiment(space: dict, settings: TuneSettings):
    """The study's one HPARAMS experiment (tensorboard/): a column per searched value, the trials' metrics."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams
    example = {}
    for key, spec in space.items():  # NOTE: every key, also loss options only some trials take
        if spec["type"] == "loss_weights":
            example.update({f"loss_weight_{task}_normalized": 1.0 for task in labels.TASKS})
        elif spec["type"] == "categorical":
            choice = encode_choice(spec["choices"][0])
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
    return shown.to_string(index=False, formatters={c: fmt_value for c in shown if shown[c].dtype.kind == "f"})


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


def importances_missing(complete) -> str | None:
    """Why fANOVA cannot rank the searched values from these complete trials yet (None: it can)."""
    varying = {k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1}
    if len(complete) < 2 or not varying:
        return f"it needs 2 complete trials with different searched values ({len(complete)} complete so far)"
    if len({t.value for t in complete}) == 1:  # NOTE: fANOVA finds zero variance to explain and raises
        return (f"all {len(complete)} complete trials scored the same 18-class F1 ({complete[0].value:.4f}), so no "
                f"searched value explains a difference; more epochs or trials give it one")
    return None


def write_plots(study, settings: TuneSettings, log=print) -> list:
    """history.png (F1 by trial) and importances.png (fANOVA); the log says why importances.png is not written."""
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    from mtl.plots import save_png
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
        why = importances_missing(complete)
        if why:
            log(f"no importances.png yet: {why}")
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
