"""Checkpoints of untrained tiny models, written as train_multitask.py writes them (no training: seconds)."""
from pathlib import Path

import torch

from mtl import checkpoint, config
from mtl.model import model_from_config, normalization
from mtl.transforms import make_preprocess
from tests.conftest import TINY


def untrained_checkpoint(path, face_crop=None, seed=0, **overrides) -> Path:
    """A checkpoint of a tiny untrained model (config TINY + overrides), its batch-norm statistics made non-trivial."""
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
                     "preprocess": preprocess, "epoch": 0, "metrics": {}}, path)
    return Path(path)
