"""The names a setting or flag chooses from, without what they name: no torch, timm or albumentations here.

Each tuple is the key list of the registry that implements it (model.ARCHS and model.HEADS,
transforms.AUGMENTATIONS, losses.LOSSES, ...; tests/test_config.py checks they agree), so a new
architecture, head, augmentation or loss is added in two places: its implementation there and its name here.
The settings (mtl.config) and the command lines (argparse `choices=`) read them from here, so `--help` and a
mistyped name are answered before the heavy libraries load.
"""
from __future__ import annotations

from mtl.errors import ConfigError

ARCHS = ("multihead", "joint18", "separate")  # model.ARCHS: how trunks feed the heads
HEADS = ("linear", "ml_decoder")  # model.HEADS: the task heads
AUGMENTATIONS = ("none", "flip", "baseline", "color", "cutout", "strong", "gridshuffle")  # transforms.AUGMENTATIONS
WEIGHTINGS = ("fixed", "uncertainty")  # losses.MultiTaskLoss: the given task loss weights, or learned ones
SAMPLERS = ("none", "balanced")  # train.train_loader_for: how an epoch draws its photos
AMP_MODES = ("auto", "bf16", "fp16", "off")  # inference.amp_dtype: the autocast dtype
TTA = ("hflip",)  # inference.predict_probs_many: the test-time views averaged with the photo itself
ENSEMBLES = ("soft", "hard")  # ensemble.combine
PRUNERS = ("median", "hyperband", "none")  # tune.study: Optuna's pruner of weak trials
EXPORT_FORMATS = ("onnx", "torchscript")  # export.EXPORTERS
CALIBRATE = ("none", "mask", "gender", "age")  # train.fit_calibration: the heads whose offsets move (or none)

# losses.LOSSES: each loss by name, with the options its spec may set (losses.<task>: {name: focal, gamma: 2})
LOSS_OPTIONS = {
    "ce": ("label_smoothing", "class_weights"),
    "focal": ("gamma", "class_weights"),
    "soft_f1": ("ce_weight", "class_weights"),
    "bce": ("pos_weight", "label_smoothing"),
    "asl": ("gamma_pos", "gamma_neg", "eps", "class_weights"),
    "arcface": ("scale", "margin", "class_weights"),
}
LOSSES = tuple(LOSS_OPTIONS)
GENDER_ONLY_LOSSES = ("bce",)  # NOTE: one logit: only the binary gender task has one
NOT_GENDER_LOSSES = ("arcface",)  # NOTE: ArcFace needs one class centre per class; gender has a single logit


def check_tta(views) -> tuple:
    """The TTA views to average, as a tuple; 'none' or nothing means no TTA; an unknown name is a ConfigError."""
    views = tuple(n for n in (views or ()) if n not in ("none", ""))
    unknown = [n for n in views if n not in TTA]
    if unknown:
        raise ConfigError(f"unknown --tta {', '.join(unknown)}; known: none, {', '.join(TTA)}")
    return views
