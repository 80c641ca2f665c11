"""Preprocessing and augmentation: albumentations pipelines built from one preprocessing record.

The preprocessing record (a plain dict, stored in every checkpoint) says how a photo becomes the
network's input: `load_size` [W, H] (decode + resize, cached), optional `center_crop` [W, H] in
load-size pixels, `img_size` [W, H] (network input), `mean`/`std` (the trunk's normalization, which the
model applies itself to the uint8 tensors these pipelines make), and `face_crop` (the crop_faces
settings the data was made with, or None). Training adds a named
augmentation preset between the crop and the resize; evaluation and predict.py use
`eval_transform(record)` and nothing else, so inference can never drift from training. Whole
batches are mixed (--mixup, --cutmix) by `mix_batch`.
"""
from __future__ import annotations

import albumentations as A
import cv2
import torch
from albumentations.pytorch import ToTensorV2

from mtl import names
from mtl.checks import size_pair
from mtl.errors import ConfigError


def make_preprocess(img_size, load_size=None, center_crop=None, mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225), face_crop=None) -> dict:
    """The preprocessing record; load_size defaults to img_size (crop size, if any, must fit inside it)."""
    img_size = size_pair(img_size, "--img-size")
    load_size = size_pair(load_size, "--load-size") or img_size
    center_crop = size_pair(center_crop, "--center-crop")
    if center_crop and (center_crop[0] > load_size[0] or center_crop[1] > load_size[1]):
        raise ConfigError(f"--center-crop {center_crop[0]}x{center_crop[1]} does not fit in "
                          f"--load-size {load_size[0]}x{load_size[1]}")
    return {"load_size": list(load_size), "center_crop": list(center_crop) if center_crop else None,
            "img_size": list(img_size), "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "face_crop": face_crop}


def _crop(record):
    crop = record.get("center_crop")
    return [A.CenterCrop(height=crop[1], width=crop[0])] if crop else []


def _finish(record):
    """Resize and make a uint8 CHW tensor; the model itself normalizes with the record's mean and std."""
    w, h = record["img_size"]
    return [A.Resize(height=h, width=w, interpolation=cv2.INTER_AREA), ToTensorV2()]


def _flip():
    return [A.HorizontalFlip(p=0.5)]


def _geometry():
    return [A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                     border_mode=cv2.BORDER_REFLECT_101, p=0.5)]


def _photometric():
    return [A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)]


def _camera():
    """What other cameras and photo collections do to a face: colour, grey, noise, blur, JPEG."""
    return [A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.3, hue=0.03, p=0.5),
            A.ToGray(p=0.05),
            A.OneOf([A.GaussNoise(std_range=(0.02, 0.08)), A.GaussianBlur(blur_limit=(3, 5)),
                     A.MotionBlur(blur_limit=(3, 5))], p=0.3),
            A.ImageCompression(quality_range=(40, 95), p=0.3)]


def _cutout():
    return [A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.05, 0.15),
                            hole_width_range=(0.05, 0.15), fill="random_uniform", p=0.3)]


AUGMENTATIONS = {  # the --augment presets (names.AUGMENTATIONS)
    "none": lambda: [],
    "flip": _flip,
    "baseline": lambda: _flip() + _geometry() + _photometric(),
    "color": lambda: _flip() + _geometry() + _camera()[:2],
    "cutout": lambda: _flip() + _geometry() + _photometric() + _cutout(),
    "strong": lambda: _flip() + _geometry() + _photometric() + _camera() + _cutout(),
    # NOTE: a participant's idea that helped age: shuffled tiles make the model read texture (skin, hair), not layout
    "gridshuffle": lambda: _flip() + _photometric() + [A.RandomGridShuffle(grid=(3, 3), p=0.5)],
}


def check_augment(name: str) -> str:
    """Return the preset name, or a ConfigError that lists the known ones."""
    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown augment preset {name!r}; known: {', '.join(names.AUGMENTATIONS)}")
    return name


def train_transform(record: dict, augment: str = "baseline") -> A.Compose:
    """Crop, augmentation preset, resize, to a uint8 tensor."""
    return A.Compose(_crop(record) + AUGMENTATIONS[check_augment(augment)]() + _finish(record))


def eval_transform(record: dict) -> A.Compose:
    """Crop, resize, to a uint8 tensor: validation, prediction and TTA all start here."""
    return A.Compose(_crop(record) + _finish(record))


# ---------------------------------------------------------------- batches
def mix_batch(images, targets, cfg, generator):
    """Mixup or vertical CutMix with probability mix_prob: (images, other targets, lam); lam=1 means no mix."""
    choices = [m for m in ("mixup", "cutmix") if getattr(cfg, m) > 0]
    if not choices or torch.rand((), generator=generator) >= cfg.mix_prob:
        return images, None, 1.0
    kind = choices[int(torch.randint(len(choices), (), generator=generator))]
    alpha = getattr(cfg, kind)
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha else 1.0
    perm = torch.randperm(len(images), generator=generator).to(images.device)
    other = {k: v[perm] for k, v in targets.items()}
    images = images.float()  # NOTE: uint8 0..255 photos; the model normalizes floats on the same scale
    if kind == "mixup":
        return lam * images + (1 - lam) * images[perm], other, lam
    cut = int(round(images.shape[3] * lam))  # NOTE: vertical CutMix: left part from this photo, right from another
    mixed = images.clone()
    mixed[..., cut:] = images[perm][..., cut:]
    return mixed, other, cut / images.shape[3]
