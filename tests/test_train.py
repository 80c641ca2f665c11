"""Training: it learns, writes every artifact, resumes exactly, runs under DDP, and refuses bad input clearly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl import checkpoint, config, labels
from mtl.errors import ConfigError
from mtl.train import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda *_: None}


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
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
    assert best["schema"] == labels.schema(60) and best["epoch"] == trained_run["best_epoch"]
    assert best["preprocess"]["img_size"] == [48, 64] and best["config"]["arch"] == "multihead"
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in best["model"])
    assert config.build(config_file=out / "config.yaml").epochs == 20
    events = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/loss_mask", "train/loss_gender", "train/loss_age", "train/loss_age_reg",
                "train/lr", "val/f1", "val/mask_f1", "val/age_acc", "val/age_reg_f1", "loss_weight/mask"):
        assert tag in tags["scalars"], tag
    for tag in ("confusion/mask", "confusion/gender", "confusion/age", "confusion/18_classes", "misclassified"):
        assert tag in tags["images"], tag
    hparams = [p for p in out.rglob("events.out.tfevents*")]
    assert any(b"hparams" in p.read_bytes() for p in hparams)


def test_checkpoint_rebuilds_the_model(trained_run):
    best = checkpoint.load(Path(trained_run["out"]) / "best.pt")
    model = checkpoint.build_model(best)
    out = model.eval()(torch.zeros(1, 3, 64, 48))
    assert set(out) == {"mask", "gender", "age", "age_reg"}


def test_resume_continues_exactly(tiny_config, tmp_path):
    full = train(tiny_config(epochs=3, out=str(tmp_path / "full"), ema=0.9), **QUIET)
    first = tiny_config(epochs=3, out=str(tmp_path / "part"), ema=0.9)
    with pytest.raises(_Stop):
        train(first, on_epoch=_stop_after(2), **QUIET)
    saved = checkpoint.load(tmp_path / "part" / "last.pt")
    assert saved["epoch"] == 2
    resumed_cfg = config.build({"resume": str(tmp_path / "part" / "last.pt")}, base=saved["config"])
    seen = []
    result = train(resumed_cfg, on_epoch=lambda e, m: seen.append(e), **QUIET)
    assert seen == [3]
    a = checkpoint.load(tmp_path / "full" / "last.pt")
    b = checkpoint.load(tmp_path / "part" / "last.pt")
    assert b["epoch"] == 3 and result["epochs_run"] == 1
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert all(torch.equal(va[s], vb[s]) for s in va)


class _Stop(Exception):
    pass


def _stop_after(n):
    def on_epoch(epoch, metrics):
        if epoch == n:
            raise _Stop
    return on_epoch


@pytest.mark.parametrize("options", [
    {"arch": "joint18", "mixup": 0.4, "mix_prob": 1.0},
    {"arch": "separate", "cutmix": 1.0, "mix_prob": 1.0, "sampler": "balanced"},
    {"arch": "multihead", "loss_weighting": "uncertainty", "ema": 0.9, "accumulate": 2, "age_threshold": 59,
     "drop_ages": "57-59", "losses": {"age": {"name": "focal", "gamma": 2.0, "class_weights": "balanced"},
                                      "mask": {"name": "soft_f1", "ce_weight": 1.0}}},
])
def test_options_train_with_finite_losses(tiny_config, options):
    result = train(tiny_config(epochs=1, **options), **QUIET)
    assert 0.0 <= result["best_f1"] <= 1.0 and result["epochs_run"] == 1


def test_all_folds_trains_each_fold(tiny_config, tmp_path):
    result = train(tiny_config(epochs=1, folds=2, all_folds=True, out=str(tmp_path / "cv")), **QUIET)
    assert len(result["folds"]) == 2
    assert (tmp_path / "cv" / "fold0" / "best.pt").is_file() and (tmp_path / "cv" / "fold1" / "best.pt").is_file()
    assert "f1_mean" in json.loads((tmp_path / "cv" / "metrics.json").read_text())


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
    (["--arch", "twoheads"], "--arch must be one of"),
    (["--fold", "7"], "--fold must be from 0 to 4"),
    (["--augment", "wild"], "unknown augment preset 'wild'"),
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


SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "tf_efficientnet_lite0_imagenet.pth"


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="needs ../shared/weights")
def test_pretrained_file_loads_real_weights():
    from mtl.model import create_model, normalization
    import timm
    model = create_model("tf_efficientnet_lite0", pretrained=True, pretrained_file=str(SHARED_WEIGHTS))
    reference = torch.load(SHARED_WEIGHTS, map_location="cpu")
    key = "conv_stem.weight"
    assert torch.equal(model.trunks[0].backbone.state_dict()[key], reference[key])
    assert normalization(model)[0] == [0.5, 0.5, 0.5]
    assert timm.is_model("tf_efficientnet_lite0")


def test_ddp_two_cpu_processes(synthetic_data, cache_dir, tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
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
