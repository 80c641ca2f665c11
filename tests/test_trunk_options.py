"""--freeze-blocks and --layer-decay: frozen trunk groups keep their pretrained weights and BatchNorm statistics
bit for bit while the rest learns, per-group learning rates follow the decay under the schedule, checkpoints
record both and resume exactly, and bad values are one-line errors naming the flag."""
from pathlib import Path

import pytest
import timm
import torch

from mtl import checkpoint, config
from mtl.errors import ConfigError
from mtl.model import create_model, trunk_groups
from mtl.optim import lr_factor, param_groups
from mtl.train import Interrupted, interrupt_after, train

QUIET = {"log": lambda *_: None}
MODEL, FREEZE, DECAY = "test_resnet", 2, 0.5  # test_resnet: the stem, then layer1 .. layer4


@pytest.fixture(scope="module")
def weights_file(trained_run, tmp_path_factory) -> Path:
    """The shared trained run's test_resnet trunk as a 'pretrained' weights file (trained BatchNorm statistics)."""
    state = checkpoint.load(Path(trained_run["out"]) / "best.pt")["model"]
    path = tmp_path_factory.mktemp("weights") / f"{MODEL}.pth"
    torch.save(backbone_state(state), path)
    return path


def trunk_config(data, cache_dir, weights_file, out, **overrides):
    """The tests' tiny run (conftest.TINY) from the weights file, with both options on."""
    from tests.conftest import TINY
    return config.build({**TINY, "model": MODEL, "pretrained": None, "pretrained_file": str(weights_file),
                         "data": str(data), "cache_dir": str(cache_dir), "out": str(out), "freeze_blocks": FREEZE,
                         "layer_decay": DECAY, **overrides})


@pytest.fixture(scope="module")
def trunk_run(synthetic_data, cache_dir, weights_file, tmp_path_factory):
    """One short run with both options on: its output folder."""
    out = tmp_path_factory.mktemp("trunk") / "run"
    result = train(trunk_config(synthetic_data, cache_dir, weights_file, out, epochs=6), **QUIET)
    return out, result


def backbone_state(state: dict) -> dict:
    prefix = "trunks.0.backbone."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_frozen_groups_stay_bit_identical_while_the_rest_learns(trunk_run, weights_file):
    out, result = trunk_run
    pretrained = torch.load(weights_file, map_location="cpu")
    group_of = trunk_groups(timm.create_model(MODEL, pretrained=False, num_classes=0))
    frozen_modules = {name.rpartition(".")[0] for name, group in group_of.items() if group <= FREEZE}
    later_modules = {name.rpartition(".")[0] for name, group in group_of.items() if group > FREEZE}
    for name in ("best.pt", "last.pt"):
        trained = backbone_state(checkpoint.load(out / name)["model"])
        frozen = [k for k in trained if k.rpartition(".")[0] in frozen_modules]
        assert any(k.endswith("running_mean") for k in frozen) and any(k.endswith("weight") for k in frozen)
        for key in frozen:  # weights, biases and BatchNorm running statistics
            assert torch.equal(trained[key], pretrained[key]), (name, key)
        later = [k for k in trained if k.rpartition(".")[0] in later_modules and k in pretrained
                 and trained[k].is_floating_point()]
        assert any(k.endswith("running_mean") for k in later)
        assert all(not torch.equal(trained[k], pretrained[k]) for k in later), name
    # the model learns: the 18-class macro F1 on held-out people is well above chance (1/18)
    assert result.best_f1 > 0.25, result.metrics
    assert result.metrics["mask_acc"] > 0.85 and result.metrics["gender_acc"] > 0.7


@pytest.fixture(scope="module")
def half_run(synthetic_data, cache_dir, weights_file, tmp_path_factory):
    """A 2-epoch run with both options, stopped after epoch 1 as a kill would leave it, and its config."""
    out = tmp_path_factory.mktemp("half") / "run"
    cfg = trunk_config(synthetic_data, cache_dir, weights_file, out, epochs=2, ema=0.9)
    with pytest.raises(Interrupted):
        train(cfg, on_epoch=interrupt_after(1), **QUIET)
    return out, cfg


@pytest.mark.slow
def test_layer_decay_sets_each_groups_lr_and_the_schedule_scales_them_alike(half_run):
    out, cfg = half_run
    last = checkpoint.load(out / "last.pt")
    assert (last["config"]["freeze_blocks"], last["config"]["layer_decay"]) == (FREEZE, DECAY)  # recorded
    groups = last["optimizer"]["param_groups"]
    blocks = max(trunk_groups(timm.create_model(MODEL, pretrained=False, num_classes=0)).values())
    # the trunk groups after the frozen ones (FREEZE + 1 .. blocks): the last at --lr, each earlier DECAY times less
    expected = [cfg.lr * DECAY ** (blocks - g) for g in range(blocks, FREEZE, -1)]
    assert sorted({g["initial_lr"] for g in groups}, reverse=True) == pytest.approx(expected)
    assert groups[0]["initial_lr"] == cfg.lr  # heads (and TensorBoard's train/lr) at the full rate
    # mid-schedule (after epoch 1 of 2) every group's lr is its own peak times the one warmup + cosine factor
    step = last["train_state"]["step"]
    factor = lr_factor(step, 2 * step, int(cfg.warmup_epochs * step), cfg.eta_min / cfg.lr)
    assert 0.1 < factor < 0.99
    for group in groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * factor)


@pytest.mark.slow
def test_resume_with_frozen_blocks_and_layer_decay_continues_exactly(half_run, tmp_path):
    out, cfg = half_run
    full = config.build({**cfg.to_dict(), "out": str(tmp_path / "full")})
    train(full, **QUIET)
    saved = checkpoint.load(out / "last.pt")
    resumed = config.build({"resume": str(out / "last.pt"), "out": str(tmp_path / "resumed")}, base=saved["config"])
    assert train(resumed, **QUIET).epochs_run == 1
    a, b = checkpoint.load(tmp_path / "full" / "last.pt"), checkpoint.load(tmp_path / "resumed" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert len(a["optimizer"]["param_groups"]) == len(b["optimizer"]["param_groups"]) > 3
    for key, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[s], b["optimizer"]["state"][key][s]) for s in state), key
    # the rebuilt model of a checkpoint (prediction, export) has the same frozen layers: its weights load
    model = checkpoint.build_model(checkpoint.load(tmp_path / "resumed" / "best.pt"))
    assert not model.trunks[0].backbone.conv1[0].weight.requires_grad


@pytest.mark.parametrize("option,value", [("freeze_blocks", 0), ("layer_decay", 1.0), ("layer_decay", 0.8)])
@pytest.mark.slow
def test_resume_with_other_trunk_options_is_refused(half_run, option, value):
    out, _ = half_run
    saved = checkpoint.load(out / "last.pt")
    cfg = config.build({"resume": str(out / "last.pt"), option: value}, base=saved["config"])
    with pytest.raises(ConfigError, match=f"trained with --{option.replace('_', '-')} .*, not {value}"):
        train(cfg, **QUIET)


# ---------------------------------------------------------------- without training
@pytest.mark.parametrize("name,arch", [("test_efficientnet", "multihead"), ("test_resnet", "separate"),
                                       ("test_vit", "multihead")])
def test_freezing_uses_timms_groups_for_every_trunk(name, arch):
    group_of = trunk_groups(timm.create_model(name, pretrained=False, num_classes=0))
    owners = {n.rpartition(".")[0]: g for n, g in group_of.items()}
    model = create_model(name, arch, pretrained=False, frozen_blocks=1)
    for trunk in model.trunks:  # separate: each of the three trunks
        backbone = trunk.backbone
        params = dict(backbone.named_parameters())
        assert all(params[n].requires_grad == (g > 1) for n, g in group_of.items() if n in params)
        assert not any(params[n].requires_grad for n, g in group_of.items() if g <= 1 and n in params)
        norms = {(g > 1, type(backbone.get_submodule(m)).__name__) for m, g in owners.items()
                 if "BatchNorm" in type(backbone.get_submodule(m)).__name__}
        if name != "test_vit":  # CNNs: the frozen groups' BatchNorms are FrozenBatchNorm2d, later ones train
            frozen = "FrozenBatchNormAct2d" if "efficientnet" in name else "FrozenBatchNorm2d"
            assert {kind for trains, kind in norms if not trains} == {frozen}
            assert {kind for trains, kind in norms if trains} <= {"BatchNorm2d", "BatchNormAct2d"}
    if name == "test_vit":
        assert not model.trunks[0].backbone.pos_embed.requires_grad  # a trunk's own parameter in the stem group


def test_param_groups_without_options_are_the_two_groups_of_every_release():
    model = create_model("test_efficientnet", pretrained=False)
    groups = param_groups(model, torch.nn.Module(), 0.01, 1e-3)
    assert [(g["weight_decay"], g["lr"]) for g in groups] == [(0.01, 1e-3), (0.0, 1e-3)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_layer_decay_leaves_heads_at_full_lr_and_keeps_the_weight_decay_rule():
    model = create_model("test_resnet", "separate", pretrained=False)
    groups = param_groups(model, torch.nn.Module(), 0.01, 1.0, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        lr, decay = lr_of[id(p)]
        assert decay == (0.01 if p.ndim > 1 else 0.0), name
        if name.startswith("heads."):
            assert lr == 1.0, name
        elif name.startswith("trunks.2.backbone.conv1."):  # the stem of the third trunk: 4 groups before layer4
            assert lr == 0.5 ** 4, name
        elif ".layer4." in name:
            assert lr == 1.0, name


@pytest.mark.parametrize("overrides,message", [
    ({"freeze_blocks": -1}, "--freeze-blocks must be a non-negative number, got -1"),
    ({"freeze_blocks": 1.5}, "--freeze-blocks must be a whole number, got 1.5"),
    ({"layer_decay": 0}, "--layer-decay must be above 0 and at most 1 (1 = off), got 0.0"),
    ({"layer_decay": 1.5}, "--layer-decay must be above 0 and at most 1 (1 = off), got 1.5"),
    ({"layer_decay": "nan"}, "--layer-decay must be above 0 and at most 1 (1 = off), got nan"),
    ({"freeze_blocks": 2, "pretrained": False}, "--freeze-blocks 2 keeps pretrained weights"),
])
def test_bad_values_are_one_line_naming_the_flag(overrides, message):
    with pytest.raises(ConfigError) as err:
        config.build({"model": "test_efficientnet", **overrides})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_more_frozen_blocks_than_the_trunk_has_stops_before_any_data_is_read(tmp_path):
    weights_file = tmp_path / "random.pth"
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), weights_file)
    cfg = config.build({"model": "test_efficientnet", "pretrained_file": str(weights_file), "freeze_blocks": 6,
                        "data": str(tmp_path / "no_such_data"), "out": str(tmp_path / "run"), "workers": 0})
    with pytest.raises(ConfigError) as err:
        train(cfg, **QUIET)
    assert str(err.value) == ("--freeze-blocks 6: test_efficientnet has 5 block group(s) after its stem "
                              "(timm's group_matcher), so at most 5")
    assert not (tmp_path / "run").exists()
