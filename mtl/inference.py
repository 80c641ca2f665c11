"""Batched inference: one forward pass answers all three tasks; shared by validation, predict.py and mtl.soup.

`predict_probs` runs one model over a loader under torch.inference_mode (AMP and channels_last when
asked, hflip TTA averaged); `predict_probs_many` runs an ensemble's models over the same batches, so
each photo is read and transformed once for all members that share a preprocessing record.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm import tqdm

from mtl.checks import check_device_name
from mtl.errors import ConfigError
from mtl.metrics import head_probs
from mtl.names import AMP_MODES


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when there is a GPU, else cpu; a device this machine lacks is a one-line ConfigError."""
    if check_device_name(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu "
                              f"(or auto)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: Apple MPS is not available here; use --device cpu (or auto)")
    return device


def amp_dtype(amp: str, device: torch.device):
    """The autocast dtype for --amp on this device (None = full precision). 'auto' is bf16 on CUDA, off on CPU.

    'auto' takes fp16 on GPUs without native bfloat16 (before Ampere: T4, V100), where torch emulates it slowly;
    an explicit --amp bf16 there is a ConfigError, as cuDNN has no bfloat16 convolutions for them.
    """
    if amp not in AMP_MODES:
        raise ConfigError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda" and not native_bf16(device):
        if amp == "auto":
            return torch.float16
        raise ConfigError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no native bfloat16 (compute "
                          f"capability below 8.0); use --amp fp16 or auto")
    return torch.bfloat16


def native_bf16(device: torch.device) -> bool:
    """Whether a CUDA device computes in bfloat16 natively (Ampere and later), not by emulation."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def use_channels_last(setting, device: torch.device) -> bool:
    """channels_last memory for the model and its input: 'auto' on CUDA only; True or False as asked, on any device."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def autocast(device: torch.device, dtype):
    """torch.autocast for dtype, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(images, device, channels_last=False):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def prepare_model(model, device, channels_last=False):
    """Move a model to the device in eval mode (channels_last memory on request)."""
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def predict_probs(model, loader, device, *, dtype=None, channels_last=False, tta=(), progress=False,
                  desc="predicting") -> dict:
    """Per-task probabilities (numpy) for every sample of the loader, in loader order; TTA views are averaged."""
    return predict_probs_many([model], loader, device, dtype=dtype, channels_last=channels_last, tta=tta,
                              progress=progress, desc=desc)[0]


@torch.inference_mode()
def predict_probs_many(models, loader, device, *, dtype=None, channels_last=False, tta=(), progress=False,
                       desc="predicting") -> list[dict]:
    """predict_probs for several models in one pass over the loader: each batch is decoded and transformed once."""
    for model in models:
        model.eval()
    chunks = [{} for _ in models]
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True, leave=False):
        images = to_device(batch["image"], device, channels_last)
        views = [images]
        if "hflip" in tta:
            flipped = torch.flip(images, dims=[3])
            views.append(flipped.contiguous(memory_format=torch.channels_last) if channels_last else flipped)
        for model, out in zip(models, chunks):
            probs = None
            for view in views:
                with autocast(device, dtype):
                    p = head_probs(model(view))
                probs = p if probs is None else {k: probs[k] + p[k] for k in probs}
            for key, value in probs.items():
                out.setdefault(key, []).append((value / len(views)).float().cpu().numpy())
    return [{key: np.concatenate(parts) for key, parts in out.items()} for out in chunks]
