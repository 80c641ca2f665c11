"""The CPU twins of the CUDA paths: AMP (bf16 autocast), channels_last, --compile and pinned batches, run on the CPU.

bench/gpu_check.py runs the same paths on a GPU; what can run on the CPU is tested here, so most mistakes are
found without one.
"""
import warnings

import pytest
import torch

from mtl import checkpoint, config
from mtl.errors import ConfigError
from mtl.inference import amp_dtype, use_channels_last
from mtl.loader import make_loader
from mtl.train import Interrupted, interrupt_after, setup, train

QUIET = {"log": lambda *_: None}


def first_conv_dtypes(monkeypatch):
    """Record the dtype of the first convolution's output of every model train() builds."""
    import mtl.train
    seen = []
    build = mtl.train.model_from_config

    def model_from_config(cfg, pretrained=None):
        model = build(cfg, pretrained)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        return model
    monkeypatch.setattr(mtl.train, "model_from_config", model_from_config)
    return seen


@pytest.mark.slow
def test_bf16_autocast_training_resumes_exactly_on_the_cpu(tiny_config, tmp_path, monkeypatch):
    dtypes = first_conv_dtypes(monkeypatch)
    # NOTE: small photos: bf16 convolutions are emulated on most CPUs, 4x slower than fp32
    options = {"epochs": 2, "amp": "bf16", "channels_last": True, "device": "cpu", "ema": 0.9, "img_size": [24, 32],
               "batch_size": 64}
    full = train(tiny_config(out=str(tmp_path / "full"), **options), **QUIET)
    with pytest.raises(Interrupted):
        train(tiny_config(out=str(tmp_path / "part"), **options), on_epoch=interrupt_after(1), **QUIET)
    saved = checkpoint.load(tmp_path / "part" / "last.pt")
    resumed = train(config.build({"resume": str(tmp_path / "part" / "last.pt")}, base=saved["config"]), **QUIET)
    assert resumed.epochs_run == 1 and 0 <= full.best_f1 <= 1
    assert set(dtypes) == {torch.bfloat16}  # the trunk ran under bf16 autocast in training and validation
    a, b = checkpoint.load(tmp_path / "full" / "last.pt"), checkpoint.load(tmp_path / "part" / "last.pt")
    assert a["config"]["amp"] == b["config"]["amp"] == "bf16"
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    for va, vb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(va[s], vb[s]) for s in va)


def test_channels_last_on_the_cpu_only_when_asked(tiny_config, tmp_path):
    def layouts(run):
        """(every conv weight channels_last, every one contiguous NCHW); 1x1 kernels are both."""
        convs = [m.weight for m in run.raw_model.modules() if isinstance(m, torch.nn.Conv2d)]
        return (all(w.is_contiguous(memory_format=torch.channels_last) for w in convs),
                all(w.is_contiguous() for w in convs))

    asked = setup(tiny_config(channels_last=True, device="cpu", out=str(tmp_path / "a")), **QUIET)
    assert asked.channels_last is True and layouts(asked) == (True, False)
    default = setup(tiny_config(device="cpu", out=str(tmp_path / "b")), **QUIET)
    assert default.cfg.channels_last == "auto"
    assert default.channels_last is False and layouts(default) == (False, True)
    assert use_channels_last("auto", torch.device("cuda")) and not use_channels_last(False, torch.device("cuda"))


def test_channels_last_flag_and_bad_values():
    import argparse

    from mtl.cli import add_train_arguments, overrides_from_args
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert overrides_from_args(parser.parse_args(["--channels-last"]))["channels_last"] is True
    assert overrides_from_args(parser.parse_args(["--no-channels-last"]))["channels_last"] is False
    with pytest.raises(ConfigError, match="channels_last must be auto, true or false"):
        config.build({"channels_last": "sometimes"})


def test_amp_auto_takes_fp16_where_the_gpu_has_no_native_bf16(monkeypatch):
    import mtl.inference
    cuda = torch.device("cuda")
    assert amp_dtype("auto", torch.device("cpu")) is None and amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(mtl.inference, "native_bf16", lambda device: False)  # NOTE: a T4 or V100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert amp_dtype("auto", cuda) is torch.float16 and amp_dtype("fp16", cuda) is torch.float16
    with pytest.raises(ConfigError, match="--amp bf16: Tesla T4 has no native bfloat16"):
        amp_dtype("bf16", cuda)
    monkeypatch.setattr(mtl.inference, "native_bf16", lambda device: True)
    assert amp_dtype("auto", cuda) is torch.bfloat16 and amp_dtype("off", cuda) is None


@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_memory_asked_without_cuda_falls_back_to_the_same_batches(synthetic_data, cache_dir, workers):
    from mtl.dataset import DataSpec, FaceDataset, load_fold
    from mtl.transforms import eval_transform, make_preprocess
    size = (40, 52)
    fold = load_fold(DataSpec(synthetic_data), size, cache_dir=cache_dir, progress=False)
    dataset = torch.utils.data.Subset(FaceDataset(fold.val_samples, fold.val_images,
                                                  eval_transform(make_preprocess(size))), range(40))
    plain = list(make_loader(dataset, 8, workers, pin_memory=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NOTE: DataLoader warns when pinning is asked for without an accelerator
        pinned = list(make_loader(dataset, 8, workers, pin_memory=True))
        assert len(list(make_loader(dataset, 8, workers, device=torch.device("cuda")))) == len(plain)
    assert len(pinned) == len(plain) == 5
    for a, b in zip(pinned, plain):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
        assert a["image"].is_pinned() is torch.cuda.is_available()
        assert a["image"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_compile_trains_resumes_and_saves_plain_weights(tiny_config, tmp_path):
    # NOTE: inductor builds C++ kernels on the CPU: over a minute on 2 cores, hence slow
    options = {"epochs": 2, "compile": True, "device": "cpu", "batch_size": 32}
    with pytest.raises(Interrupted):
        train(tiny_config(out=str(tmp_path / "part"), **options), on_epoch=interrupt_after(1), **QUIET)
    saved = checkpoint.load(tmp_path / "part" / "last.pt")
    assert saved["config"]["compile"] is True
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in saved["model"])
    resumed = train(config.build({"resume": str(tmp_path / "part" / "last.pt")}, base=saved["config"]), **QUIET)
    assert resumed.epochs_run == 1 and 0 <= resumed.best_f1 <= 1
    model = checkpoint.build_model(checkpoint.load(tmp_path / "part" / "best.pt"))
    assert set(model.eval()(torch.zeros(2, 3, 52, 40, dtype=torch.uint8))) == {"mask", "gender", "age"}
