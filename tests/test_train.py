"""Training: it learns, writes every artifact, resumes exactly, runs under DDP, and refuses bad input clearly."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl import checkpoint, config, labels
from mtl.calibration import Calibration
from mtl.errors import ConfigError
from mtl.train import Interrupted, TrainingError, interrupt_after, train
from tests.helpers import ROOT, SHARED, free_port

QUIET = {"log": lambda *_: None}


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_short_run_learns_on_held_out_people(trained_run):
    # chance is about 1/18 for the 18-class macro F1; held-out people are the validation fold
    assert trained_run["best_f1"] > 0.3, trained_run["metrics"]
    assert trained_run["metrics"]["mask_acc"] > 0.85
    assert trained_run["metrics"]["gender_acc"] > 0.75


def test_run_writes_every_artifact(trained_run):
    out = Path(trained_run["out"])
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["f1"] == pytest.approx(trained_run["best_f1"])
    best = checkpoint.load(out / "best.pt")
    assert best["schema"] == labels.LabelSchema(60).to_dict() and best["epoch"] == trained_run["best_epoch"]
    assert best["preprocess"]["img_size"] == [48, 64] and best["config"]["arch"] == "multihead"
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in best["model"])
    assert config.build(config_file=out / "config.yaml").epochs == 20
    events = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == set(TRAIN_SCALARS + VAL_SCALARS + ("loss_weight/mask", "loss_weight/gender",
                                                                       "loss_weight/age"))
    assert set(tags["images"]) == {"confusion/mask", "confusion/gender", "confusion/age", "confusion/18_classes",
                                   "misclassified"}
    # validation and training share the x-axis (the optimizer step), so their curves overlay
    epoch_ends = [e.step for e in events.Scalars("train/epoch")]
    assert [e.value for e in events.Scalars("train/epoch")] == list(range(1, 21))
    assert [e.step for e in events.Scalars("val/f1")] == epoch_ends
    assert set(epoch_ends) <= {e.step for e in events.Scalars("train/loss")}
    assert [e.step for e in events.Images("confusion/mask")] == epoch_ends
    hparams = EventAccumulator(str(out / "hparams"), size_guidance={"scalars": 0}).Reload()
    assert hparams.Scalars("hparam/f1")[0].value == pytest.approx(trained_run["best_f1"])
    assert hparams.Scalars("hparam/f1_calibrated")[0].value == pytest.approx(trained_run["metrics"]["f1_calibrated"])


def test_a_validation_set_too_small_to_calibrate_stores_offsets_of_zero_and_says_why(trained_run):
    out = Path(trained_run["out"])
    best = checkpoint.load(out / "best.pt")
    cal = Calibration.from_dict(best["calibration"])
    photos = len(best["validation"]["person_id"])
    assert 100 < photos < 200  # fold 0 of 5: a fifth of the 120 people, seven photos each
    assert cal.fitted_on == photos and cal.is_identity and cal.f1_after == cal.f1_before == best["metrics"]["f1"]
    assert cal.notes == (f"only {photos} photos with every task's truth known (< 200): offsets left at 0",)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["calibration"] == best["calibration"] and saved["f1_calibrated"] == saved["f1"]
    events = EventAccumulator(str(out), size_guidance={"scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("val/f1_calibrated")] == [e.value for e in events.Scalars("val/f1")]


TRAIN_SCALARS = ("train/loss", "train/loss_mask", "train/loss_gender", "train/loss_age", "train/loss_age_reg",
                 "train/lr", "train/img_per_s", "train/epoch")
VAL_SCALARS = tuple(f"val/{k}" for k in ("f1", "acc", "mask_f1", "mask_acc", "gender_f1", "gender_acc", "age_f1",
                                         "age_acc", "age_reg_mae", "age_reg_f1", "age_reg_acc", "f1_age_reg",
                                         "f1_calibrated"))


def hparams_experiment(logdir):
    """The HPARAMS table TensorBoard's hparams plugin builds for a logdir: (hparam infos, metric names)."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    backend = backend_context.Context(base_plugin.TBContext(data_provider=provider, logdir=str(logdir),
                                                            multiplexer=mux))
    ctx = context.RequestContext()
    experiment = backend.experiment_from_metadata(ctx, "", True, backend.hparams_metadata(ctx, ""),
                                                  backend.hparams_from_data_provider(ctx, "", 1000))
    return {h.name: h for h in experiment.hparam_infos}, [m.name.tag for m in experiment.metric_infos]


def test_hparams_table_puts_the_settings_that_differ_first(trained_run, tiny_config, tmp_path):
    import shutil
    shutil.copytree(trained_run["out"], tmp_path / "logs" / "a")
    train(tiny_config(epochs=1, out=str(tmp_path / "logs" / "b"), lr=1e-3, loss_weights=[1.0, 2.0, 1.0]), **QUIET)
    columns, metrics = hparams_experiment(tmp_path / "logs")
    assert {"loss_weight_mask", "loss_weight_gender", "loss_weight_age"} <= set(columns)
    assert "loss_weights" not in columns and "out" not in columns and "cache_dir" not in columns
    assert columns["loss_weight_gender"].differs and not columns["loss_weight_mask"].differs
    differing = {name for name, info in columns.items() if info.differs}
    assert {"lr", "model", "epochs", "img_size", "batch_size", "age_reg_weight"} <= differing
    assert not columns["seed"].differs and not columns["arch"].differs
    assert set(metrics) == {f"hparam/{k}" for k in ("f1", "acc", "mask_f1", "mask_acc", "gender_f1", "gender_acc",
                                                     "age_f1", "age_acc", "best_epoch", "f1_calibrated")} | {
        f"hparam/{k}" for k in ("age_reg_mae", "age_reg_f1", "age_reg_acc", "f1_age_reg")}
    events = (tmp_path / "logs").rglob("events.out.tfevents*")
    # NOTE: no run writes an experiment summary: one run's would fix the columns for every run
    assert not [p for p in events if b"_hparams_/experiment" in p.read_bytes()]


@pytest.mark.slow
def test_calibration_is_fitted_on_the_validation_people_only(tiny_config, cache_dir, monkeypatch):
    from mtl import calibration
    from mtl.dataset import DataSpec, load_fold
    real, seen = calibration.fit, []

    def spy(probs, truth, schema, **options):
        if "groups" in options:  # NOTE: not fit's own calls, on parts of the people, to cross-validate by person
            seen.append((len(truth["mask"]), set(options["groups"]), options["tasks"]))
        return real(probs, truth, schema, **options)
    monkeypatch.setattr(calibration, "fit", spy)
    cfg = tiny_config(epochs=2, folds=3, calibrate=["age", "mask"])
    train(cfg, **QUIET)
    fold = load_fold(DataSpec.of(cfg), [40, 52], cache_dir=cache_dir, workers=0, progress=False, log=lambda *_: None)
    val_people = set(fold.val_samples["person_id"])
    assert 250 < len(fold.val_samples) < len(fold.train_samples)  # a third of the 120 people, seven photos each
    assert not val_people & set(fold.train_samples["person_id"])
    assert seen == [(len(fold.val_samples), val_people, ["mask", "age"])] * 2  # once per epoch, the validation people
    best = checkpoint.load(Path(cfg.out) / "best.pt")
    assert best["calibration"]["fitted_on"] == len(fold.val_samples) != len(fold.train_samples)
    assert best["calibration"]["offsets"]["gender"] == [0.0, 0.0]  # a head --calibrate leaves out never moves
    assert best["validation"]["person_id"] == fold.val_samples["person_id"].astype(str).tolist()
    assert best["metrics"]["f1_calibrated"] == best["calibration"]["f1_after"]


def test_checkpoint_rebuilds_the_model_it_validated(trained_run, cache_dir):
    from mtl.dataset import DataSpec, FaceDataset, load_fold
    from mtl.inference import predict_probs
    from mtl.loader import make_loader
    from mtl.metrics import score
    from mtl.transforms import eval_transform
    best = checkpoint.load(Path(trained_run["out"]) / "best.pt")
    model = checkpoint.build_model(best)  # the config's architecture, the stored weights, no download
    assert all(torch.equal(value, best["model"][key]) for key, value in model.state_dict().items())
    fold = load_fold(DataSpec.of(best["config"]), best["preprocess"]["load_size"], cache_dir=cache_dir, workers=0,
                     progress=False, log=lambda *_: None)
    schema = checkpoint.label_schema(best)
    val = FaceDataset(fold.val_samples, fold.val_images, eval_transform(best["preprocess"]), schema)
    probs = predict_probs(model, make_loader(val, 64, workers=0), torch.device("cpu"))
    measured = {k: v for k, v in best["metrics"].items() if k != "f1_calibrated"}
    assert score(probs, val.truth(), schema) == pytest.approx(measured, abs=1e-6)  # what training measured
    # and the probabilities its calibration was fitted on, photo by photo
    stored = checkpoint.read_validation(best)[0]
    assert set(stored) == set(probs) and all(np.allclose(stored[k], probs[k], atol=1e-5) for k in probs)


@pytest.mark.slow
def test_resume_continues_exactly(tiny_config, tmp_path):
    train(tiny_config(epochs=3, out=str(tmp_path / "full"), ema=0.9), **QUIET)
    first = tiny_config(epochs=3, out=str(tmp_path / "part"), ema=0.9)
    with pytest.raises(Interrupted):
        train(first, on_epoch=interrupt_after(2), **QUIET)
    saved = checkpoint.load(tmp_path / "part" / "last.pt")
    assert saved["epoch"] == 2
    resumed_cfg = config.build({"resume": str(tmp_path / "part" / "last.pt")}, base=saved["config"])
    seen = []
    result = train(resumed_cfg, on_epoch=lambda e, m: seen.append(e), **QUIET)
    assert seen == [3]
    a = checkpoint.load(tmp_path / "full" / "last.pt")
    b = checkpoint.load(tmp_path / "part" / "last.pt")
    assert b["epoch"] == 3 and result.epochs_run == 1
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert list(a["optimizer"]["state"]) == list(b["optimizer"]["state"])
    for key, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[s], b["optimizer"]["state"][key][s]) for s in state), key


def test_progress_counts_the_best_epoch_and_early_stopping():
    from mtl.run_files import Progress
    progress = Progress()
    assert [progress.record(e, {"f1": f1}) for e, f1 in ((1, 0.2), (2, 0.5), (3, 0.5), (4, 0.4))] == \
        [True, True, False, False]
    assert (progress.best, progress.best_epoch, progress.bad_epochs) == (0.5, 2, 2)
    assert progress.best_metrics == {"f1": 0.5, "epoch": 2} and progress.best_calibration is None
    assert progress.stopped(2) and not progress.stopped(3) and not progress.stopped(0)
    # last.pt's train_state: the keys every earlier version wrote, read back as they were (no calibration then)
    old = {"step": 40, "best": 0.5, "best_epoch": 2, "bad_epochs": 2, "best_metrics": {"f1": 0.5, "epoch": 2}}
    again = Progress()
    again.load_state_dict(old)
    assert again == progress.__class__(**old) and again.state_dict() == {**old, "best_calibration": None}
    # the calibration of the best epoch is kept with it, and only with it
    cal = Calibration({"mask": (0, 1, 0), "gender": (0, 0), "age": (0, 0, 2)}, 0.5, 0.6, 300)
    assert progress.record(5, {"f1": 0.7}, cal) and not progress.record(6, {"f1": 0.1}, None)
    assert progress.best_calibration == cal.to_dict() and progress.state_dict()["best_calibration"] == cal.to_dict()


@pytest.mark.parametrize("options", [
    {"arch": "joint18", "mixup": 0.4, "mix_prob": 1.0},
    {"arch": "separate", "cutmix": 1.0, "mix_prob": 1.0, "sampler": "balanced", "calibrate": []},
    {"arch": "multihead", "loss_weighting": "uncertainty", "ema": 0.9, "accumulate": 2, "age_threshold": 59,
     "drop_ages": "57-59", "losses": {"age": {"name": "focal", "gamma": 2.0, "class_weights": "balanced"},
                                      "mask": {"name": "soft_f1", "ce_weight": 1.0}}},
])
@pytest.mark.slow
def test_options_train_with_finite_losses(tiny_config, options):
    import math
    result = train(tiny_config(epochs=1, **options), **QUIET)
    out = Path(result.out)
    events = EventAccumulator(str(out), size_guidance={"scalars": 0}).Reload()
    heads = {"joint"} if options["arch"] == "joint18" else {"mask", "gender", "age"}
    assert {t for t in events.Tags()["scalars"] if t.startswith("train/loss")} == \
        {"train/loss"} | {f"train/loss_{h}" for h in heads}  # each head's loss of the architecture, and no other
    losses = [e.value for t in events.Tags()["scalars"] if t.startswith("train/loss") for e in events.Scalars(t)]
    assert losses and all(math.isfinite(v) for v in losses)
    best, last = checkpoint.load(out / "best.pt"), checkpoint.load(out / "last.pt")
    assert result.epochs_run == 1 and best["schema"]["age_threshold"] == options.get("age_threshold", 60)
    assert any(k.startswith("trunks.2.") for k in best["model"]) == (options["arch"] == "separate")
    if options.get("loss_weighting") == "uncertainty":  # learned: the weights moved from their start, 1/2
        assert any(events.Scalars(f"loss_weight/{t}")[-1].value != 0.5 for t in heads)
    if options["arch"] == "joint18":  # its 18 offsets, whatever heads --calibrate names
        assert list(best["calibration"]["offsets"]) == ["joint"] and best["calibration"] == last["calibration"]
    if options.get("calibrate") == []:  # --calibrate none: nothing fitted, nothing applied
        assert best["calibration"] is None and "f1_calibrated" not in best["metrics"]
        assert json.loads((out / "metrics.json").read_text())["calibration"] is None
    if options.get("ema"):  # best.pt holds the EMA weights validated, last.pt the trained ones beside them
        assert not torch.equal(best["model"]["trunks.0.backbone.conv_stem.weight"],
                               last["model"]["trunks.0.backbone.conv_stem.weight"])
        assert torch.equal(best["model"]["trunks.0.backbone.conv_stem.weight"],
                           last["ema"]["trunks.0.backbone.conv_stem.weight"])


def check_out_of_fold_calibration(cv: Path, folds: int) -> dict:
    """Every fold's best.pt holds the one calibration fitted on every person's out-of-fold prediction: the all-folds
    metrics.json's; returns that metrics.json."""
    summary = json.loads((cv / "metrics.json").read_text())
    bests = [checkpoint.load(cv / f"fold{k}" / "best.pt") for k in range(folds)]
    people = [set(b["validation"]["person_id"]) for b in bests]
    assert not set.intersection(*people) and len(set.union(*people)) == 120  # each person answered once, by one fold
    record = summary["calibration"]
    assert all(b["calibration"] == record for b in bests)
    assert record["fitted_on"] == sum(len(b["validation"]["person_id"]) for b in bests) == 120 * 7
    assert summary["oof_f1"] == record["f1_before"] and summary["oof_f1_calibrated"] == record["f1_after"]
    return summary


@pytest.mark.slow
def test_all_folds_trains_each_fold(tiny_config, tmp_path):
    result = train(tiny_config(epochs=1, folds=2, all_folds=True, out=str(tmp_path / "cv")), **QUIET)
    assert len(result.folds) == 2
    assert (tmp_path / "cv" / "fold0" / "best.pt").is_file() and (tmp_path / "cv" / "fold1" / "best.pt").is_file()
    assert "f1_mean" in check_out_of_fold_calibration(tmp_path / "cv", 2)


@pytest.mark.slow
def test_an_all_folds_run_resumed_trains_what_is_left_and_ends_calibrated_out_of_fold(tiny_config, tmp_path, capsys):
    cv = tmp_path / "cv"
    calls = []

    def stop_in_the_last_fold(epoch, metrics):
        calls.append(epoch)
        if len(calls) == 3:  # fold 0's two epochs, then the first of fold 1
            raise Interrupted("killed")
    with pytest.raises(Interrupted):
        train(tiny_config(epochs=2, folds=2, all_folds=True, out=str(cv)), on_epoch=stop_in_the_last_fold, **QUIET)
    assert not (cv / "metrics.json").exists() and checkpoint.load(cv / "fold1" / "last.pt")["epoch"] == 1
    fold0 = (cv / "fold0" / "last.pt").read_bytes()
    assert cli(["--resume", cv / "fold1" / "last.pt", "--all-folds", "--epochs", "2"], capsys)[0] == 0
    assert (cv / "fold0" / "last.pt").read_bytes() == fold0  # the finished fold trains no more
    assert checkpoint.load(cv / "fold1" / "last.pt")["epoch"] == 2
    check_out_of_fold_calibration(cv, 2)
    code, err = cli(["--resume", cv / "fold1" / "best.pt", "--all-folds", "--out", tmp_path / "elsewhere"], capsys)
    assert code == 2 and "continues every fold in" in err


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_config, monkeypatch):
    from mtl import losses
    real = losses.MultiTaskLoss.forward
    calls = {"n": 0}

    def poisoned(self, outputs, targets):
        calls["n"] += 1
        total, parts = real(self, outputs, targets)
        return (total * float("nan"), parts) if calls["n"] > 25 else (total, parts)
    monkeypatch.setattr(losses.MultiTaskLoss, "forward", poisoned)
    cfg = tiny_config(epochs=3)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, step \d+") as err:
        train(cfg, **QUIET)
    assert "last.pt" in str(err.value)
    assert checkpoint.load(Path(cfg.out) / "last.pt")["epoch"] == 1


def test_existing_run_is_never_overwritten(trained_run):
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config.build({**checkpoint.load(Path(trained_run["out"]) / "last.pt")["config"],
                            "resume": None}), **QUIET)


@pytest.mark.parametrize("flags,message", [
    (["--model", "efficientnet_b99"], "unknown --model 'efficientnet_b99'"),
    (["--loss-weights", "1", "0", "1"], "--loss-weights must be positive numbers"),
    (["--loss-weights", "1", "nan", "1"], "--loss-weights must be positive numbers"),
    (["--age-threshold", "120"], "--age-threshold must be from 31 to 99"),
    (["--arch", "twoheads"], "argument --arch: invalid choice: 'twoheads' (choose from 'multihead',"),
    (["--fold", "7"], "--fold must be from 0 to 4"),
    (["--augment", "wild"], "argument --augment: invalid choice: 'wild' (choose from 'none', 'flip',"),
    (["--age-loss", "focal:beta=2"], "has no option(s) beta"),
])
def test_bad_flags_give_one_line_errors(flags, message, capsys):
    import train_multitask
    from mtl.cli import main_guard
    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: train_multitask.main(["--config", str(ROOT / "configs" / "demo.yaml"), *flags]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_command_line_error_exits_2_with_one_line():
    result = run_cli("train_multitask.py", "--config", "configs/demo.yaml", "--age-threshold", "20")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --age-threshold must be from 31 to 99, got 20"


def test_resume_from_another_architecture_is_refused(trained_run, capsys):
    import train_multitask
    from mtl.cli import main_guard
    last = Path(trained_run["out"]) / "last.pt"
    with pytest.raises(SystemExit):
        main_guard(lambda: train_multitask.main(["--resume", str(last), "--arch", "joint18"]))
    assert "trained with --arch multihead, not joint18" in capsys.readouterr().err


def test_missing_pretrained_weights_name_the_way_out(tiny_config):
    with pytest.raises(ConfigError, match="--no-pretrained") as err:
        train(tiny_config(pretrained=True, model="resnet18"), **QUIET)
    assert "--pretrained-file" in str(err.value)


SHARED_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_imagenet.pth"


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="needs ../shared/weights")
def test_pretrained_file_loads_real_weights():
    from mtl.model import create_model, normalization
    model = create_model("tf_efficientnet_lite0", pretrained=True, pretrained_file=str(SHARED_WEIGHTS))
    reference = torch.load(SHARED_WEIGHTS, map_location="cpu")
    key = "conv_stem.weight"
    assert torch.equal(model.trunks[0].backbone.state_dict()[key], reference[key])
    assert normalization(model)[0] == [0.5, 0.5, 0.5]


@pytest.mark.slow
def test_ddp_two_cpu_processes(synthetic_data, cache_dir, tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "train_multitask.py", "--config", "configs/demo.yaml", "--data", str(synthetic_data), "--cache-dir",
         str(cache_dir), "--out", str(out), "--epochs", "2", "--img-size", "40", "52", "--workers", "0",
         "--no-progress", "--batch-size", "16"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert result.stdout.count("epoch 2/2") == 1  # only rank 0 reports
    assert len(list(out.glob("events.out.tfevents*"))) >= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["f1"] <= 1


# ---------------------------------------------------------------- where runs write, and what they refuse
def cli(argv, capsys=None):
    """train_multitask.py in-process: its exit code (0 on success) and, with capsys, its stderr."""
    import train_multitask
    from mtl.cli import main_guard
    try:
        main_guard(lambda: train_multitask.main([str(a) for a in argv]))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, (capsys.readouterr().err.strip() if capsys else None)


@pytest.mark.slow
def test_resume_writes_next_to_the_resumed_file(tiny_config, tmp_path, monkeypatch, capsys):
    import shutil
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    train(tiny_config(epochs=1, out="runs/first"), **QUIET)  # a relative --out, as users type it
    original = {name: (tmp_path / "a" / "runs" / "first" / name).read_bytes() for name in ("last.pt", "best.pt")}
    shutil.copytree(tmp_path / "a" / "runs" / "first", tmp_path / "copy")
    monkeypatch.chdir(tmp_path / "b")  # another working directory, an absolute path
    assert cli(["--resume", tmp_path / "copy" / "last.pt", "--epochs", "2"], capsys)[0] == 0
    assert checkpoint.load(tmp_path / "copy" / "last.pt")["epoch"] == 2
    assert json.loads((tmp_path / "copy" / "metrics.json").read_text())["epoch"] == \
        checkpoint.load(tmp_path / "copy" / "best.pt")["epoch"]
    assert not (tmp_path / "b" / "runs").exists()
    for name, content in original.items():
        assert (tmp_path / "a" / "runs" / "first" / name).read_bytes() == content, name
    code, err = cli(["--resume", tmp_path / "copy" / "last.pt", "--out", tmp_path / "a" / "runs" / "first"], capsys)
    assert code == 2 and "already holds a run" in err  # never into another run's folder


@pytest.mark.slow
def test_resume_into_a_new_out_carries_the_best_checkpoint(tiny_config, tmp_path, capsys):
    train(tiny_config(epochs=2, out=str(tmp_path / "first")), **QUIET)
    before = {p.name: p.read_bytes() for p in (tmp_path / "first").iterdir() if p.is_file()}
    assert cli(["--resume", tmp_path / "first" / "last.pt", "--out", tmp_path / "second", "--epochs", "3"],
               capsys)[0] == 0
    last = checkpoint.load(tmp_path / "second" / "last.pt")
    best = checkpoint.load(tmp_path / "second" / "best.pt")
    assert last["epoch"] == 3 and best["epoch"] == last["train_state"]["best_epoch"]
    assert json.loads((tmp_path / "second" / "metrics.json").read_text())["epoch"] == best["epoch"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "first").iterdir() if p.is_file()} == before


@pytest.mark.parametrize("held", ["best.pt", "metrics.json", "config.yaml", "events.out.tfevents.1.host", "hparams",
                                  "last.pt"])
def test_out_holding_any_file_of_a_run_is_refused(tiny_config, tmp_path, held):
    out = tmp_path / "trial"
    out.mkdir()
    (out / held).mkdir() if held == "hparams" else (out / held).write_bytes(b"kept")
    with pytest.raises(ConfigError, match="already holds a run") as err:
        train(tiny_config(epochs=1, out=str(out)), **QUIET)
    assert ("--resume" in str(err.value)) == (held == "last.pt")
    assert sorted(p.name for p in out.iterdir()) == [held]


def test_an_output_folder_that_cannot_be_written_fails_before_any_data_is_read(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    flags = ["--config", ROOT / "configs" / "demo.yaml", "--data", tmp_path / "no-such-data"]
    code, err = cli([*flags, "--out", tmp_path / "file" / "run"], capsys)
    assert code == 2 and err.startswith(f"error: --out {tmp_path / 'file' / 'run'}: cannot write there")
    code, err = cli([*flags, "--out", tmp_path / "file"], capsys)
    assert code == 2 and err == f"error: --out {tmp_path / 'file'} is a file, not a folder"
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(readonly)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root in a container that allows mounts)")
    try:
        code, err = cli([*flags, "--out", readonly / "run"], capsys)
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    assert code == 2 and err == f"error: --out {readonly / 'run'}: cannot write there (Read-only file system)"


@pytest.mark.parametrize("full", ["file_size_limit", "tmpfs"])
@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_that_says_what_was_kept(tiny_config, tmp_path, capsys, full):
    import resource
    import shutil
    first = train(tiny_config(epochs=1, out=str(tmp_path / "run")), **QUIET)
    run = Path(first.out)
    size = (run / "last.pt").stat().st_size
    if full == "tmpfs":
        disk = tmp_path / "disk"
        disk.mkdir()
        used = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + 600_000}", "tmpfs", str(disk)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root in a container that allows mounts)")
        try:
            shutil.copytree(run, disk / "run")
            code, err = cli(["--resume", disk / "run" / "last.pt", "--epochs", "2"], capsys)
            left = {p.name: p.read_bytes() for p in (disk / "run").iterdir() if p.is_file()}
        finally:
            subprocess.run(["umount", str(disk)], check=True)
        run, why = disk / "run", "No space left on device"
    else:  # NOTE: works for any user: writes past RLIMIT_FSIZE fail with EFBIG (Python ignores SIGXFSZ)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, limit[1]))
        try:
            code, err = cli(["--resume", run / "last.pt", "--epochs", "2"], capsys)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        left = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        why = "File too large"
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err == (f"error: cannot write {run / 'last.pt'} ({why}); it is unchanged; stopped in epoch 2; kept "
                   f"{run / 'last.pt'} (epoch 1) and {run / 'best.pt'} (epoch 1); free space and continue with "
                   f"--resume {run / 'last.pt'}")
    assert not [name for name in left if name.endswith(".tmp")]
    assert torch.load(io.BytesIO(left["last.pt"]), weights_only=True)["epoch"] == 1
    assert torch.load(io.BytesIO(left["best.pt"]), weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_resume_repairs_best_pt_and_metrics_json_behind_last_pt(tiny_config, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(epochs=1, out=str(out)), **QUIET)
    best = checkpoint.load(out / "best.pt")
    metrics = (out / "metrics.json").read_text()
    (out / "best.pt").unlink()  # what a kill right after last.pt of an improving epoch leaves
    (out / "metrics.json").unlink()
    resumed = train(config.build({"resume": str(out / "last.pt")}, base=checkpoint.load(out / "last.pt")["config"]),
                    **QUIET)
    assert resumed.epochs_run == 0
    repaired = checkpoint.load(out / "best.pt")
    assert repaired["epoch"] == best["epoch"] == 1 and repaired["metrics"] == best["metrics"]
    assert repaired["calibration"] == best["calibration"] is not None  # the calibration of those weights
    assert repaired["validation"]["person_id"] == best["validation"]["person_id"]
    assert all(torch.equal(repaired["model"][k], best["model"][k]) for k in best["model"])
    assert (out / "metrics.json").read_text() == metrics


@pytest.mark.slow
def test_resume_removes_the_temp_files_of_killed_writes(tiny_config, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(epochs=1, out=str(out)), **QUIET)
    for name in (".last.pt.k1ll3d00.tmp", ".best.pt.abc_1234.tmp", "notes.tmp"):
        (out / name).write_bytes(b"half a checkpoint")
    train(config.build({"resume": str(out / "last.pt")}, base=checkpoint.load(out / "last.pt")["config"]), **QUIET)
    assert sorted(p.name for p in out.glob("*.tmp")) == ["notes.tmp"]


@pytest.mark.slow
def test_a_run_that_stopped_early_trains_no_more_when_resumed(tiny_config, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(epochs=1, out=str(out)), **QUIET)
    last = torch.load(out / "last.pt", weights_only=True)
    last["train_state"]["bad_epochs"] = 2  # as if epochs without a better F1 had stopped it
    torch.save(last, out / "last.pt")
    seen = []
    result = train(config.build({"resume": str(out / "last.pt"), "patience": 2, "epochs": 3}, base=last["config"]),
                   on_epoch=lambda e, m: seen.append(e), **QUIET)
    assert seen == [] and result.epochs_run == 0 and checkpoint.load(out / "last.pt")["epoch"] == 1


def test_outputs_are_readable_by_the_group_the_umask_allows(trained_run):
    from mtl.io import current_umask
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.json"):
        assert (Path(trained_run["out"]) / name).stat().st_mode & 0o777 == 0o666 & ~current_umask(), name


# ---------------------------------------------------------------- checkpoints of earlier versions
SCHEMA_V1_AT_59 = {"version": 1, "tasks": {"mask": ["wear", "incorrect", "not wear"], "gender": ["male", "female"],
                                           "age": ["<30", "30-59", "60+"]},
                   "num_joint": 18, "age_threshold": 59, "young_below": 30}  # as written before LabelSchema


def test_a_last_pt_of_schema_version_1_loads_and_resumes(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(epochs=1, out=str(out), age_threshold=59), **QUIET)
    last = torch.load(out / "last.pt", weights_only=True)
    assert set(last["train_state"]) == {"step", "best", "best_epoch", "bad_epochs", "best_metrics", "best_calibration"}
    del last["train_state"]["best_calibration"], last["calibration"], last["validation"]  # as written before them
    last["schema"] = SCHEMA_V1_AT_59
    torch.save(last, out / "last.pt")
    assert checkpoint.label_schema(checkpoint.load(out / "last.pt")) == labels.LabelSchema(59)
    assert cli(["--resume", out / "last.pt", "--epochs", "2"], capsys)[0] == 0
    resumed = checkpoint.load(out / "last.pt")
    assert resumed["epoch"] == 2 and resumed["schema"] == labels.LabelSchema(59).to_dict()
    assert resumed["train_state"]["step"] == 2 * last["train_state"]["step"]


def test_a_checkpoint_schema_this_code_cannot_read_is_one_line(trained_run, tmp_path, capsys):
    saved = torch.load(Path(trained_run["out"]) / "last.pt", weights_only=True)
    saved["schema"] = {**saved["schema"], "version": 7}  # e.g. written by a later mtl
    torch.save(saved, tmp_path / "later.pt")
    code, err = cli(["--resume", tmp_path / "later.pt", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err == (f"error: {tmp_path / 'later.pt'}: label schema version 7 is not one this mtl reads "
                                 f"(1, 2); use the mtl version that wrote it")
    assert not (tmp_path / "out").exists()
