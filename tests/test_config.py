"""Configs: configs/default.yaml is the one source of defaults, values are read by their field's type, and bad
values, `base:` cycles, empty checkpoints, missing GPUs and pretrained-weight contradictions are one-line errors."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch

import train_multitask
from mtl import checkpoint, config
from mtl.cli import add_train_arguments, main_guard
from mtl.errors import ConfigError, MTLError
from mtl.io import atomic_torch_save, atomic_write_text, remove_stale_temps
from mtl.model import model_from_config
from mtl.train_cli import get_args_parser, resolve_config
from mtl.tune.cli import build_parser as tune_parser
from tests.helpers import ROOT, run_command

DEMO = ROOT / "configs" / "demo.yaml"


def one_line_error(argv, capsys) -> str:
    """train_multitask.py's stderr for argv, asserting exit 2 with one line and no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: train_multitask.main([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


# ---------------------------------------------------------------- one source of defaults
def test_no_config_runs_exactly_configs_default_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # NOTE: found next to the package, not in the working directory
    parser = get_args_parser()
    plain = resolve_config(parser.parse_args([]))
    named = resolve_config(parser.parse_args(["--config", str(ROOT / "configs" / "default.yaml")]))
    assert plain.to_dict() == named.to_dict()
    assert plain.img_size == [240, 320] and plain.age_reg_weight == 0.0 and plain.patience == 4
    assert plain.losses["age"] == {"name": "ce", "class_weights": "balanced", "label_smoothing": 0.05}
    from mtl.cli import overrides_from_args
    tuned = config.build(overrides_from_args(tune_parser().parse_args([])), None)  # tune.py trials' base
    assert tuned.to_dict() == plain.to_dict()


def test_default_values_live_only_in_default_yaml():
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(config.TrainConfig))
    assert set(config.load_yaml(config.DEFAULT_CONFIG)) == set(config.FIELDS)


def test_default_yaml_describes_every_setting_once_for_the_file_and_its_flag():
    docs = config.docs()
    assert set(docs) == set(config.FIELDS) and all(doc.text for doc in docs.values())
    assert [doc.group for doc in docs.values()][:1] == ["data"] and docs["lr"].group == "optimisation"
    assert docs["out"] == config.Doc("data", "output folder", "a fresh runs/<time>_<model>_<arch>")
    assert config.value_text("out", None) == "a fresh runs/<time>_<model>_<arch>"
    assert config.value_text("drop_ages", None) == "none" and config.value_text("img_size", [240, 320]) == "240 320"
    text = " ".join(get_args_parser().format_help().split())
    assert "--out OUT output folder (default: a fresh runs/<time>_<model>_<arch>)" in text
    assert "--mask-loss NAME[:k=v,...] mask: each task's loss: its name and options" in text


def test_help_shows_every_flags_default():
    bare = __import__("argparse").ArgumentParser()
    add_train_arguments(bare)
    train_flags = {(a.option_strings[0], a.dest) for a in bare._actions if a.option_strings and a.dest != "help"}
    for parser in (get_args_parser(), tune_parser()):
        for action in parser._actions:
            if action.option_strings and (action.option_strings[0], action.dest) in train_flags:
                assert "(default: " in action.help, action.option_strings
    text = " ".join(get_args_parser().format_help().split())
    for shown in ("network input W H (or one number for a square) (default: 240 320)", "(default: 0.0003)",
                  "(default: ce:class_weights=balanced,label_smoothing=0.05)", "(default: efficientnet_b3)"):
        assert shown in text, shown


# ---------------------------------------------------------------- one schema: TrainConfig, the flags made from it
def bare_parser():
    parser = __import__("argparse").ArgumentParser()
    add_train_arguments(parser)
    return parser


def test_every_setting_is_a_flag_made_from_its_schema():
    from mtl import labels
    by_dest = {}
    for action in bare_parser()._actions:
        by_dest.setdefault(action.dest, []).append(action)
    assert set(by_dest) - {"help"} == set(config.FIELDS) - {"losses"} | {f"{t}_loss" for t in labels.LOSS_TASKS}
    for name, field in config.FIELDS.items():
        actions = by_dest.get(name, [])
        assert all(a.default is None for a in actions), name  # only flags given override the YAML config
        if not field.metadata["flags"] and name != "losses":  # each flag's help is its key's default.yaml comment
            assert actions[0].help.startswith(config.docs()[name].text.replace("%", "%%")), name
    assert by_dest["lr"][0].type is float and by_dest["img_size"][0].type is int and by_dest["img_size"][0].nargs == "+"
    assert [a.option_strings for a in by_dest["channels_last"]] == [["--channels-last"], ["--no-channels-last"]]
    groups = {g.title: [a.dest for a in g._group_actions] for g in bare_parser()._action_groups}
    assert groups["optimisation"][:3] == ["epochs", "batch_size", "lr"] and groups["running"][-1] == "progress"


def test_each_registry_holds_exactly_the_names_its_choices_list():
    from mtl import deploy, losses, model, names, transforms
    assert tuple(model.ARCHS) == names.ARCHS == ("multihead", "joint18", "separate")
    assert tuple(model.HEADS) == names.HEADS and tuple(transforms.AUGMENTATIONS) == names.AUGMENTATIONS
    assert tuple(losses.LOSSES) == names.LOSSES and tuple(deploy.EXPORTERS) == tuple(deploy.RUNNERS) == \
        names.EXPORT_FORMATS
    for key, known in (("arch", names.ARCHS), ("head", names.HEADS), ("augment", names.AUGMENTATIONS),
                       ("oversample_augment", names.AUGMENTATIONS), ("loss_weighting", names.WEIGHTINGS),
                       ("amp", names.AMP_MODES), ("sampler", names.SAMPLERS)):
        assert config.choices(key) == known, key
    assert config.choices("device") is None
    from mtl import calibration
    assert config.choices("calibrate") == names.CALIBRATE == ("none", *calibration.HEAD_TASKS)


def test_flags_with_choices_list_them_and_refuse_others_before_any_work(capsys):
    text = " ".join(bare_parser().format_help().split())
    assert "--arch ARCH architecture (mtl/model.py); one of multihead, joint18, separate (default: multihead)" in text
    assert "one of none, flip, baseline, color, cutout, strong, gridshuffle (default: strong)" in text
    with pytest.raises(SystemExit) as exit_:
        get_args_parser().parse_args(["--amp", "fp8"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --amp: invalid choice: 'fp8' (choose from 'auto', 'bf16', 'fp16', 'off')" in err


@pytest.mark.parametrize("key,value", [("arch", "twoheads"), ("head", "mlp"), ("augment", "wild"),
                                       ("oversample_augment", "wild"), ("loss_weighting", "learned"),
                                       ("amp", "fp8"), ("sampler", "sometimes")])
def test_a_value_outside_its_registry_is_one_line_naming_the_flag(key, value, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"{key}: {value}\n")
    with pytest.raises(ConfigError) as err:
        config.build(config_file=path)
    assert str(err.value) == (f"{config.flag_name(key)} must be one of {', '.join(config.choices(key))}, "
                              f"got {value!r}")


def test_calibrate_names_heads_or_none(tmp_path, capsys):
    parser = get_args_parser()
    assert resolve_config(parser.parse_args([])).calibrate == ["age"]  # configs/default.yaml's
    assert resolve_config(parser.parse_args(["--calibrate", "age", "gender", "age"])).calibrate == ["gender", "age"]
    assert resolve_config(parser.parse_args(["--calibrate", "none"])).calibrate == []
    for text, heads in (("calibrate: []\n", []), ("calibrate: none\n", []), ("calibrate: age\n", ["age"])):
        (tmp_path / "c.yaml").write_text(text)
        assert config.build(config_file=tmp_path / "c.yaml").calibrate == heads, text
        assert config.build(config_file=tmp_path / "c.yaml").to_dict() == \
            config.build(base=config.build(config_file=tmp_path / "c.yaml").to_dict()).to_dict()  # as checkpoints
    assert one_line_error(["--calibrate", "none", "age", "--out", tmp_path / "run"], capsys) == \
        "error: --calibrate takes heads (mask, gender, age) or none alone, got none age"
    (tmp_path / "bad.yaml").write_text("calibrate: [age, sex]\n")
    with pytest.raises(ConfigError) as err:
        config.build(config_file=tmp_path / "bad.yaml")
    assert str(err.value) == "--calibrate must be one of none, mask, gender, age, got ['age', 'sex']"
    with pytest.raises(SystemExit):
        parser.parse_args(["--calibrate", "sex"])
    assert "argument --calibrate: invalid choice: 'sex'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_task_named_in_a_config_keeps_the_other_tasks_losses(tmp_path):
    path = tmp_path / "focal.yaml"
    path.write_text("losses:\n  age: {name: focal, gamma: 2e0}\n")
    cfg = config.build({"losses": {"gender": {"name": "bce", "pos_weight": 2.0}}}, path)
    assert cfg.losses["age"] == {"name": "focal", "gamma": 2.0}
    assert cfg.losses["gender"] == {"name": "bce", "pos_weight": 2.0}
    assert cfg.losses["mask"] == {"name": "ce", "label_smoothing": 0.05}  # configs/default.yaml's


# ---------------------------------------------------------------- typed values
def test_yaml_values_are_read_by_their_field_type(tmp_path):
    path = tmp_path / "typed.yaml"
    path.write_text("lr: 1e-3\neta_min: 1E-7\npretrained: 'false'\ncache: 'off'\nskip_bad: yes\nchannels_last: off\n"
                    "amp: off\nfolds: '3'\nepochs: 4.0\nimg_size: 64\nextra: more.csv\nwarmup_epochs: 1\n")
    cfg = config.build(config_file=path)
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float) and cfg.eta_min == 1e-7
    assert cfg.pretrained is False and cfg.cache is False and cfg.skip_bad is True and cfg.channels_last is False
    assert cfg.amp == "off"  # YAML 1.1 would read `off` as false, not the --amp choice
    assert cfg.folds == 3 and cfg.epochs == 4 and isinstance(cfg.epochs, int)
    assert cfg.img_size == [64, 64] and cfg.extra == ["more.csv"] and cfg.warmup_epochs == 1.0
    assert config.build({"lr": "2e-4", "pretrained": "no", "seed": "7"}).lr == 2e-4  # overrides too
    assert config.parse_loss_spec("ce:label_smoothing=1e-2") == {"name": "ce", "label_smoothing": 0.01}


@pytest.mark.parametrize("text,message", [
    ("folds: five\n", "folds must be a whole number, got 'five'"),
    ("epochs: 2.5\n", "epochs must be a whole number, got 2.5"),
    ("pretrained: maybe\n", "pretrained must be true or false, got 'maybe'"),
    ("lr: fast\n", "lr must be a number, got 'fast'"),
    ("data: [a, b]\n", "data must be text, got ['a', 'b']"),
    ("img_size: [240, wide]\n", "img_size must be a whole number, got 'wide'"),
    ("base: bad.yaml\n", "its `base:` chain comes back to itself (bad.yaml -> bad.yaml)"),
    ("base: other.yaml\n", "its `base:` chain comes back to itself (bad.yaml -> other.yaml -> bad.yaml)"),
    ("base: 5\n", "base must name a YAML file next to it, got 5"),
])
def test_bad_yaml_values_are_one_line_errors_naming_file_and_key(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    (tmp_path / "other.yaml").write_text("base: bad.yaml\nepochs: 3\n")
    err = one_line_error(["--config", path, "--out", tmp_path / "run"], capsys)
    assert message in err and "bad.yaml" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,message", [("data: 5\n", "5/train/train.csv"),
                                          ("extra: 5\n", "extra-data CSV not found: ")])
def test_numbers_for_paths_are_read_as_paths(tmp_path, capsys, synthetic_data, cache_dir, text, message):
    path = tmp_path / "paths.yaml"
    path.write_text(text)
    argv = ["--config", path, "--out", tmp_path / "run", "--cache-dir", cache_dir, "--no-progress", "--model",
            "test_efficientnet", "--no-pretrained"]
    if text.startswith("extra"):
        argv += ["--data", synthetic_data]
    err = one_line_error(argv, capsys)
    assert message in err and err.endswith("5" if text.startswith("extra") else "train.csv")
    assert not (tmp_path / "run").exists()  # the empty folder made to check it is writable is gone again


# ---------------------------------------------------------------- checkpoints, devices, pretrained weights
@pytest.mark.parametrize("content", [b"", b"P"])
def test_empty_or_truncated_checkpoint_is_a_one_line_error(tmp_path, capsys, content):
    bad = tmp_path / "last.pt"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match="last.pt: (empty file|not a readable checkpoint)"):
        checkpoint.load(bad)
    assert "last.pt" in one_line_error(["--resume", bad], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_device_the_machine_lacks_is_a_one_line_error(tmp_path, capsys, trained_run, synthetic_data):
    from mtl.inference import resolve_device
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device(name)
    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        resolve_device("gpu")
    err = one_line_error(["--config", DEMO, "--device", "cuda", "--out", tmp_path / "run"], capsys)
    assert err.startswith("error: --device cuda: this machine has no CUDA GPU")
    import mtl.predict
    with pytest.raises(MTLError, match="--device cuda: this machine has no CUDA GPU"):
        run_command(mtl.predict, "--checkpoint", Path(trained_run["out"]) / "best.pt", "--data", synthetic_data,
                    "--out", tmp_path / "submission.csv", "--device", "cuda")
    assert not (tmp_path / "submission.csv").exists()


def _shared_weights():
    for folder in ROOT.parents:
        path = folder / "shared" / "weights" / "tf_efficientnet_lite0_imagenet.pth"
        if path.is_file():
            return path
    return None


def test_pretrained_file_is_used_where_the_config_says_pretrained_false(tmp_path, capsys):
    import timm
    torch.manual_seed(123)
    weights = timm.create_model("test_efficientnet").state_dict()
    torch.save(weights, tmp_path / "mine.pth")
    cfg = config.build({"model": "test_efficientnet", "pretrained_file": str(tmp_path / "mine.pth")}, DEMO)
    assert config.load_yaml(DEMO)["pretrained"] is False and cfg.pretrained is True
    trunk = model_from_config(cfg).trunks[0].backbone.state_dict()
    assert all(torch.equal(trunk[k], weights[k]) for k in trunk), "the file's weights were not loaded"
    err = one_line_error(["--config", DEMO, "--no-pretrained", "--pretrained-file", tmp_path / "mine.pth"], capsys)
    assert "--no-pretrained contradicts --pretrained-file" in err


@pytest.mark.skipif(_shared_weights() is None, reason="needs shared/weights/tf_efficientnet_lite0_imagenet.pth")
def test_real_pretrained_file_is_used_with_the_demo_config():
    path = _shared_weights()
    cfg = config.build({"model": "tf_efficientnet_lite0", "pretrained_file": str(path)}, DEMO)
    trunk = model_from_config(cfg).trunks[0].backbone.state_dict()
    reference = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(trunk["conv_stem.weight"], reference["conv_stem.weight"])
    assert torch.equal(trunk["blocks.6.0.conv_pwl.weight"], reference["blocks.6.0.conv_pwl.weight"])


# ---------------------------------------------------------------- output files
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text("x", tmp_path / "a.txt")
        atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "a.pt")
    finally:
        os.umask(old)
    for name in ("a.txt", "a.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_only_the_temp_files_of_killed_writes_are_removed(tmp_path):
    stale = [".last.pt.abcd1234.tmp", ".best.pt.zz_9x0qy.tmp", ".metrics.json.k2j4h5g6.tmp"]
    kept = ["notes.tmp", ".last.pt.tmp", ".last.pt.abcd1234.tmp.bak", "last.pt", ".last.pt.ABCD1234.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / stale[0]).write_text("x")
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["sub"])
    assert (tmp_path / "sub" / stale[0]).exists()
