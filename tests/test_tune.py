"""tune.py: a study over mtl's own training loop writes every output, continues where it stopped, survives
failed and interrupted trials, prunes, runs as parallel worker processes on one journal, and shows each trial
once in TensorBoard's HPARAMS tab (read from the real tensorboard server).

Real training runs on a 30-person synthetic set made by the same generator (an epoch of the session's
120-person set costs ~15 CPU seconds, too much for nine epochs here). The resume, failure and pruning
tests replace mtl.train.train with a scripted stand-in: trial n reports the F1 curve 0.9 - 0.1 n + 0.01 epoch,
so later trials are worse and the median pruner's choices are known in advance.
"""
import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import matplotlib.pyplot as plt
import optuna
import pandas as pd
import pytest
import yaml

import mtl.train
from mtl import config
from mtl.cli import main_guard
from mtl.train import TrainingError, TrainResult
from mtl.tune import TuneSettings, check_settings
from mtl.tune import space as search_space
from mtl.tune import study as tune_study
from tests.conftest import TINY
from tests.helpers import ROOT, free_port

SPACE = {"loss_weights": {"type": "loss_weights", "low": 0.2, "high": 5.0},
         "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}}


@pytest.fixture(scope="module")
def tune_data(tmp_path_factory):
    from data_tools.make_synthetic import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp("tune") / "data", people=30, seed=1, eval_people=4,
                          size=(48, 64), progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base config (TINY at 32x40, no photo grids) and the search space, as the YAML files a user would write."""
    folder = tmp_path_factory.mktemp("tune_files")
    base, space = folder / "tiny.yaml", folder / "space.yaml"
    base.write_text(yaml.safe_dump({**TINY, "img_size": [32, 40], "log_images": 0}))
    space.write_text(yaml.safe_dump(SPACE))
    return {"config": base, "space": space}


@pytest.fixture(scope="module")
def args(files, tune_data, cache_dir):
    """tune.py's arguments for a study in `out` (each test adds --trials and more)."""
    def make(out, *more):
        return ["--config", str(files["config"]), "--space", str(files["space"]), "--data", str(tune_data),
                "--cache-dir", str(cache_dir), "--out", str(out), *map(str, more)]
    return make


def run_tune(argv):
    """tune.py's main in this process, with its exit code (0 when it returns)."""
    import tune
    try:
        main_guard(lambda: tune.main(argv))
    except SystemExit as exc:
        return exc.code
    return 0


def trials_csv(out):
    return pd.read_csv(Path(out) / "trials.csv")


def scripted_train(fail_on=(), interrupt_on=(), same_f1=False):
    """A stand-in for mtl.train.train (see the module docstring); trials in fail_on get a NaN loss at epoch 2; with
    same_f1 every trial reports the F1 curve of trial 0."""
    def train(cfg, on_epoch=None, log=print, log_hparams=True):
        n = int(Path(cfg.out).name)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        f1s = []
        for epoch in range(1, cfg.epochs + 1):
            if n in fail_on and epoch == 2:
                raise TrainingError(f"loss became nan at epoch {epoch}, step 7 (batch 3); try a lower --lr")
            if n in interrupt_on:
                raise KeyboardInterrupt
            f1s.append(0.9 - 0.1 * (0 if same_f1 else n) + 0.01 * epoch)
            on_epoch(epoch, {"f1": f1s[-1]})
        return TrainResult(cfg.out, max(f1s), len(f1s), {"f1": max(f1s)}, len(f1s))
    return train


# ---------------------------------------------------------------- real training
@pytest.fixture(scope="module")
def real_study(args, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "study"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_tune(args(out, "--trials", 4, "--epochs", 1)) == 0
    (out / "printed.txt").write_text(printed.getvalue())
    return out


@pytest.mark.slow
def test_study_writes_every_output(real_study):
    table = trials_csv(real_study)
    assert list(table["number"]) == [0, 1, 2, 3] and set(table["state"]) == {"COMPLETE"}
    assert table["f1"].between(0, 1).all() and (table["epochs_run"] == 1).all()
    weights = table["loss_weights"].map(yaml.safe_load)
    assert all(abs(sum(w) - 3) < 1e-3 for w in weights), weights  # normalized: only the ratios are searched
    assert table["lr"].between(1e-3, 1e-2).all()
    for name in ("study.db", "best.yaml", "history.png", "base_config.yaml", "search_space.yaml"):
        assert (real_study / name).stat().st_size > 0, name
    # NOTE: importances.png needs trials whose F1 differ, which four 1-epoch trials need not give: tested below
    for n in range(4):  # each trial's own run: config, best weights and TensorBoard logs (hparams included)
        run = real_study / "trials" / str(n)
        assert (run / "config.yaml").is_file() and (run / "best.pt").is_file() and not (run / "last.pt").exists()
        assert list(run.glob("events.out.tfevents.*"))
    printed = (real_study / "printed.txt").read_text()
    assert "top trials of study 'mtl':" in printed and " rank  trial " in printed and "4 complete" in printed


@pytest.mark.slow
def test_study_names_its_objective_and_records_the_weights_trained(real_study):
    study = optuna.load_study(study_name="mtl", storage=f"sqlite:///{real_study / 'study.db'}")
    assert study.metric_names == ["val_f1_18"]  # what optuna-dashboard calls the objective
    for t in study.trials:  # beside the raw log-uniform draws (params), the weights the trial trained with
        raw = [t.params[f"loss_weight_{task}"] for task in ("mask", "gender", "age")]
        shown = [t.user_attrs[f"loss_weight_{task}_normalized"] for task in ("mask", "gender", "age")]
        assert shown == search_space.normalize_weights(raw) == t.user_attrs["config"]["loss_weights"]


def hparams_tab(logdir, sessions: int):
    """The HPARAMS tab of `tensorboard --logdir logdir` (the real command): its columns, and run -> hparams."""
    port = free_port()
    command = shutil.which("tensorboard") or "tensorboard"
    server = subprocess.Popen([command, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def post(name, body):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/data/plugin/hparams/{name}",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)

    try:
        deadline, seen = time.time() + 300, None  # a bound on the event, not a speed
        while True:  # the server loads the event files after it starts: wait until the sessions are in
            assert server.poll() is None, f"tensorboard did not start: {server.stderr.read()[-2000:]}"
            with contextlib.suppress(urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                groups = post("session_groups", {"experimentName": "", "startIndex": 0, "sliceSize": 1000,
                                                 "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"]})
                if groups.get("totalSize", 0) >= sessions and groups == seen:
                    break
                seen = groups
            assert time.time() < deadline, f"tensorboard showed {seen} after 5 minutes"
            time.sleep(1)
        columns = [h["name"] for h in post("experiment", {"experimentName": ""})["hparamInfos"]]
        runs = {s["name"]: g["hparams"] for g in groups["sessionGroups"] for s in g["sessions"]}
        return columns, runs, groups["totalSize"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_tensorboard_shows_each_trial_once_with_its_searched_values(real_study):
    columns, runs, total = hparams_tab(real_study, sessions=4)
    searched = ["loss_weight_age_normalized", "loss_weight_gender_normalized", "loss_weight_mask_normalized", "lr"]
    assert sorted(columns) == [*searched, "state"]
    assert total == 4 and sorted(runs) == [f"trials/{n}" for n in range(4)]  # each trial once, beside its curves
    table = trials_csv(real_study).set_index("number")
    for n in range(4):
        weights = yaml.safe_load(table.loc[n, "loss_weights"])
        assert [runs[f"trials/{n}"][f"loss_weight_{task}_normalized"] for task in ("mask", "gender", "age")] == \
            pytest.approx(weights)
        assert runs[f"trials/{n}"]["lr"] == pytest.approx(table.loc[n, "lr"])
    board = real_study / "tensorboard"
    assert list(board.glob("events.out.tfevents.*"))  # study/f1 and study/best_f1 by trial number


@pytest.mark.slow
def test_best_yaml_trains(real_study, tmp_path, monkeypatch):
    best = yaml.safe_load((real_study / "best.yaml").read_text())
    table = trials_csv(real_study)
    top = table.loc[table["f1"].idxmax()]
    assert best["out"] is None and best["lr"] == pytest.approx(top["lr"])
    assert best["loss_weights"] == yaml.safe_load(top["loss_weights"])
    import train_multitask
    monkeypatch.setattr(sys, "argv", ["train_multitask.py", "--config", str(real_study / "best.yaml"),
                                      "--epochs", "1", "--out", str(tmp_path / "run")])
    train_multitask.main()
    assert (tmp_path / "run" / "best.pt").is_file()
    assert config.load_yaml(tmp_path / "run" / "config.yaml")["loss_weights"] == best["loss_weights"]


@pytest.mark.slow
def test_two_workers_share_one_journal(args, tmp_path):
    out = tmp_path / "study"  # this process is worker 0; worker 1 is a spawned process
    assert run_tune(args(out, "--trials", 2, "--epochs", 1, "--workers", 2)) == 0
    assert (out / "journal.log").is_file() and not (out / "study.db").exists()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "journal.log")))
    trials = optuna.load_study(study_name="mtl", storage=storage).get_trials()
    assert [t.number for t in trials] == [0, 1]  # none lost, none twice, none beyond --trials
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both workers trained
    assert (out / "best.yaml").is_file() and len(trials_csv(out)) == 2


# ---------------------------------------------------------------- scripted training
@pytest.mark.slow
def test_rerun_continues_and_stops_at_trials(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mtl.train, "train", scripted_train())
    out = tmp_path / "study"
    assert run_tune(args(out, "--trials", 3, "--epochs", 2)) == 0
    assert run_tune(args(out, "--trials", 3, "--epochs", 2)) == 0  # finished: nothing new
    assert "3 of 3 trials finished; nothing to run" in capsys.readouterr().out
    assert list(trials_csv(out)["number"]) == [0, 1, 2]
    assert run_tune(args(out, "--trials", 5, "--epochs", 2, "--pruner", "none")) == 0  # only the difference
    table = trials_csv(out)
    assert list(table["number"]) == [0, 1, 2, 3, 4] and set(table["state"]) == {"COMPLETE"}


@pytest.mark.slow
def test_importances_are_drawn_when_trials_differ_and_the_log_says_why_not(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mtl.train, "train", scripted_train())  # trials score 0.92, 0.82, 0.72: F1s that differ
    assert run_tune(args(tmp_path / "differ", "--trials", 3, "--epochs", 2, "--pruner", "none")) == 0
    png = tmp_path / "differ" / "importances.png"
    assert png.stat().st_size > 0 and plt.imread(png).shape[2] in (3, 4)
    assert "no importances.png" not in capsys.readouterr().out
    monkeypatch.setattr(mtl.train, "train", scripted_train(same_f1=True))
    assert run_tune(args(tmp_path / "same", "--trials", 3, "--epochs", 2, "--pruner", "none")) == 0
    assert not (tmp_path / "same" / "importances.png").exists() and (tmp_path / "same" / "history.png").is_file()
    assert "no importances.png yet: all 3 complete trials scored the same 18-class F1 (0.9200)" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_failed_trial_is_recorded_and_the_study_goes_on(args, tmp_path, monkeypatch):
    monkeypatch.setattr(mtl.train, "train", scripted_train(fail_on={1}))
    out = tmp_path / "study"
    assert run_tune(args(out, "--trials", 3, "--epochs", 2)) == 0
    table = trials_csv(out).set_index("number")
    assert list(table["state"]) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # 3 finished, as asked
    assert table.loc[1, "fail_reason"].startswith("TrainingError: loss became nan at epoch 2")
    assert table.loc[1, "epochs_run"] == 1


@pytest.mark.slow
def test_trials_failing_in_a_row_stop_the_study(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mtl.train, "train", scripted_train(fail_on=range(100)))
    out = tmp_path / "study"
    assert run_tune(args(out, "--trials", 5, "--epochs", 2, "--max-failures", 2)) == 2
    assert "2 trials in a row failed (last: TrainingError: loss became nan" in capsys.readouterr().err
    assert list(trials_csv(out)["state"]) == ["FAIL", "FAIL"]


@pytest.mark.slow
def test_interrupted_study_is_kept_and_resumes(args, tmp_path, monkeypatch):
    monkeypatch.setattr(mtl.train, "train", scripted_train(interrupt_on={1}))
    out = tmp_path / "study"
    assert run_tune(args(out, "--trials", 3, "--epochs", 2)) == 130
    table = trials_csv(out)
    assert list(table["state"]) == ["COMPLETE", "FAIL"] and table["fail_reason"][1] == "interrupted (Ctrl-C)"
    monkeypatch.setattr(mtl.train, "train", scripted_train())
    assert run_tune(args(out, "--trials", 3, "--epochs", 2)) == 0
    assert list(trials_csv(out)["state"]) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


@pytest.mark.slow
def test_process_done_while_another_runs_the_last_trial_exits_0(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mtl.train, "train", scripted_train())
    out = tmp_path / "study"
    out.mkdir()
    # another machine's trial, running now: asked (not told) in the same database under the same study name
    elsewhere = optuna.create_study(study_name="mtl", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    elsewhere.ask()
    assert run_tune(args(out, "--trials", 3, "--epochs", 2)) == 0
    assert "1 trial is still running elsewhere" in capsys.readouterr().out
    assert list(trials_csv(out)["state"]) == ["RUNNING", "COMPLETE", "COMPLETE"]  # 2 here + 1 there = --trials


@pytest.mark.parametrize("url, package", [("mysql://tuner:s3cret-pw@127.0.0.1/optuna", "pip install mysqlclient"),
                                          ("postgresql+psycopg2://tuner:s3cret-pw@127.0.0.1/optuna",
                                           "pip install psycopg2-binary")])
def test_missing_database_driver_is_one_line_before_any_trial(args, tmp_path, capsys, url, package):
    out = tmp_path / "study"
    assert run_tune(args(out, "--trials", 2, "--storage", url)) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.rstrip().endswith(package), captured.err
    assert "tuner:***@127.0.0.1" in captured.err and "s3cret-pw" not in captured.out + captured.err
    assert not (out / "trials").exists()


def test_postgresql_url_has_its_driver(tmp_path):
    tune_study.check_database_url("postgresql://tuner:pw@127.0.0.1/optuna")  # psycopg 3, from requirements.txt
    assert tune_study.shown_storage("postgresql://tuner:pw@db.lab:5432/optuna") == "postgresql://tuner:***@db.lab:5432/optuna"


def test_heartbeat_grace_must_outlast_the_interval(args, tmp_path, capsys):
    assert run_tune(args(tmp_path / "study", "--trials", 2, "--heartbeat-interval", 60, "--heartbeat-grace", 30)) == 2
    assert "--heartbeat-grace (30 s) must be longer than --heartbeat-interval (60 s)" in capsys.readouterr().err


@pytest.mark.slow
def test_median_pruner_stops_weak_trials_early(args, tmp_path, monkeypatch):
    monkeypatch.setattr(mtl.train, "train", scripted_train())
    out = tmp_path / "study"
    assert run_tune(args(out, "--trials", 8, "--epochs", 4)) == 0
    table = trials_csv(out).set_index("number")
    assert list(table.index[table["state"] == "PRUNED"]) == [5, 6, 7]  # each worse than the median
    # the median pruner waits for 5 trials and judges from epoch 2 on, so each pruned trial ran 2 of 4 epochs
    assert list(table["epochs_run"]) == [4, 4, 4, 4, 4, 2, 2, 2]


@pytest.mark.parametrize("flags, pruned_at", [((), 4), (("--pruner-warmup", 3), 3)])
@pytest.mark.slow
def test_median_pruner_waits_half_the_epochs_or_the_warmup_given(args, tmp_path, monkeypatch, flags, pruned_at):
    monkeypatch.setattr(mtl.train, "train", scripted_train())
    out = tmp_path / "study"
    assert run_tune(args(out, "--trials", 7, "--epochs", 8, *flags)) == 0
    assert list(trials_csv(out)["epochs_run"]) == [8] * 5 + [pruned_at] * 2


def test_bad_pruner_warmup_is_refused(args, tmp_path, capsys):
    assert run_tune(args(tmp_path / "study", "--trials", 2, "--pruner-warmup", 0)) == 2
    assert "--pruner-warmup must be a whole number of epochs >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("space, message", [
    ({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}}, "unknown key 'learning_rate'"),
    ({"lr": {"type": "uniform", "low": 1e-4, "high": 1e-3}}, "lr: unknown type 'uniform'"),
    ({"lr": {"type": "float", "low": 1e-3, "high": 1e-4}}, "lr: low (0.001) must be below high"),
    ({"losses.age.gamma": {"type": "float", "low": 0.5, "high": 2.0}}, "has no option(s) gamma"),
    ({"fold": {"type": "int", "low": 0, "high": 4}}, "fold cannot be searched"),
])
def test_bad_search_space_is_refused_before_any_trial(args, tmp_path, capsys, space, message):
    path = tmp_path / "bad_space.yaml"
    path.write_text(yaml.safe_dump(space))
    out = tmp_path / "study"
    assert run_tune([*args(out, "--trials", 2), "--space", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad_space.yaml" in err, err
    assert not (out / "trials").exists()


# ---------------------------------------------------------------- search space
def test_sampled_values_become_a_config(tune_data):
    space = search_space.load_space(ROOT / "configs" / "search_space_wide.yaml")
    balanced = {"losses": {"age": {"name": "ce", "class_weights": "balanced", "label_smoothing": 0.05}}}
    base = config.build({"data": str(tune_data), **balanced}, ROOT / "configs" / "default.yaml")
    trial = optuna.trial.FixedTrial({"loss_weight_mask": 1.0, "loss_weight_gender": 2.0, "loss_weight_age": 1.0,
                                     "lr": 1e-3, "weight_decay": 0.01, "losses.age.name": "focal",
                                     "losses.age.gamma": 2.0, "age_threshold": 59, "augment": "baseline"})
    values = search_space.sample(trial, space, base.losses)
    assert values["loss_weights"] == [0.75, 1.5, 0.75]  # ratios 1:2:1, normalized to sum 3
    assert "losses.age.label_smoothing" not in values  # focal takes no label smoothing: left out of this trial
    cfg = config.build({"data": str(tune_data), **search_space.to_overrides(values, base.losses)},
                       ROOT / "configs" / "default.yaml")
    assert cfg.losses["age"] == {"name": "focal", "gamma": 2.0, "class_weights": "balanced"}  # the base's options
    assert cfg.losses["mask"] == base.losses["mask"] and cfg.age_threshold == 59


@pytest.mark.parametrize("name", ["search_space.yaml", "search_space_wide.yaml"])
def test_shipped_search_spaces_fit_the_default_config(tune_data, name):
    default = ROOT / "configs" / "default.yaml"
    settings = check_settings(TuneSettings(space=str(ROOT / "configs" / name), config=str(default),
                                           overrides={"data": str(tune_data)}))
    space = search_space.load_space(settings.space)
    base = search_space.check_space(space, settings, settings.space)
    assert base.to_dict() == config.build({"data": str(tune_data), "progress": False}, default).to_dict()
    for where in ("low", "mid", "high"):  # every corner of the space is a config that trains what was asked
        values = search_space.point(space, where, base.losses)
        cfg = config.build({"data": str(tune_data), **search_space.to_overrides(values, base.losses)}, default)
        for key, spec in ((k, v) for k, v in space.items() if k in values):  # NOTE: not the options a loss lacks
            task, _, option = key.partition(".")[2].partition(".")
            got = cfg.losses[task][option] if key.startswith("losses.") else getattr(cfg, key)
            assert got == values[key], (where, key, got)
            if spec["type"] == "loss_weights":
                assert sum(got) == pytest.approx(search_space.LOSS_WEIGHT_SUM), (where, key, got)
            elif spec["type"] == "categorical":
                assert got in spec["choices"], (where, key, got)
            else:
                assert spec["low"] <= got <= spec["high"], (where, key, got)
