"""Checkpoints of untrained tiny models, written as train_multitask.py writes them (no training: seconds)."""
from pathlib import Path

import torch

from mtl import checkpoint, config
from mtl.model import model_from_config, normalization
from mtl.transforms import make_preprocess
from tests.conftest import TINY


def untrained_checkpoint(path, face_crop=None, seed=0, calibration=None, **overrides) -> Path:
    """A checkpoint of a tiny untrained model (config TINY + overrides), its batch-norm statistics made non-trivial;
    calibration: the record (mtl.calibration.Calibration.to_dict, or any dict to test refusals) it holds."""
    cfg = config.build({**TINY, "data": "unused", **overrides})
    torch.manual_seed(seed)
    model = model_from_config(cfg, pretrained=False)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # NOTE: fresh running stats make every BN an identity
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    mean, std = normalization(model)
    preprocess = make_preprocess(cfg.img_size, cfg.load_size, cfg.center_crop, mean, std, face_crop=face_crop)
    checkpoint.save({"model": model.state_dict(), "config": cfg.to_dict(), "schema": checkpoint.schema_for(cfg),
                     "preprocess": preprocess, "epoch": 0, "metrics": {}, "calibration": calibration}, path)
    return Path(path)


# offsets that turn every answer to 60+: e^20 times the odds of the top age group (the trained run is sure of
# no "younger than 60" beyond odds of e^16)
TO_60_PLUS = {"mask": (0.0, 0.0, 0.0), "gender": (0.0, 0.0), "age": (0.0, 0.0, 20.0)}


def with_calibration(source, dest, offsets=TO_60_PLUS) -> Path:
    """A copy of a checkpoint holding a calibration of the given offsets (constructed, not fitted)."""
    from mtl.calibration import Calibration
    saved = checkpoint.load(source)
    saved.pop("path")
    saved["calibration"] = Calibration(offsets, 0.5, 0.5, 300, ("constructed by a test",)).to_dict()
    checkpoint.save(saved, dest)
    return Path(dest)
