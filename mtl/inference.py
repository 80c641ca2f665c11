"""Batched inference: one forward pass answers all three tasks; shared by validation and predict.py."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mtl.metrics import head_probs

TTA = ("hflip",)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when there is a GPU, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device):
    """The autocast dtype for --amp on this device (None = full precision). 'auto' is bf16 on CUDA, off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype):
    """torch.autocast for dtype, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_worker(worker_id):
    """DataLoader worker init: seed numpy, random and the albumentations pipeline from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def make_loader(dataset, batch_size, workers=2, shuffle=False, sampler=None, generator=None, drop_last=False,
                device=None):
    """A DataLoader with the project's worker seeding, pinned memory on CUDA."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
                      num_workers=workers, pin_memory=device is not None and device.type == "cuda",
                      drop_last=drop_last, worker_init_fn=seed_worker, generator=generator,
                      persistent_workers=False)


def to_device(images, device, channels_last=False):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@torch.inference_mode()
def predict_probs(model, loader, device, dtype=None, channels_last=False, tta=(), progress=False,
                  desc="predicting") -> dict:
    """Per-task probabilities (numpy) for every sample of the loader, in loader order; TTA views are averaged."""
    model.eval()
    chunks = {}
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True, leave=False):
        images = to_device(batch["image"], device, channels_last)
        views = [images] + ([torch.flip(images, dims=[3])] if "hflip" in tta else [])
        probs = None
        for view in views:
            with autocast(device, dtype):
                p = head_probs(model(view))
            probs = p if probs is None else {k: probs[k] + p[k] for k in probs}
        for key, value in probs.items():
            chunks.setdefault(key, []).append((value / len(views)).float().cpu().numpy())
    return {key: np.concatenate(parts) for key, parts in chunks.items()}
