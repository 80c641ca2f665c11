"""The optimizer and its learning-rate schedule: AdamW over parameter groups, the rate set at every optimizer step.

`param_groups` puts no weight decay on biases, norms and learned loss weights, leaves frozen parameters
out (--freeze-blocks), and with --layer-decay gives each earlier trunk block group its own lower rate
(`lr_scales`). The learning rate follows 1) a linear warmup over --warmup-epochs, 2) then a cosine decay
3) down to --eta-min at the last step, 4) updated every optimizer step (`lr_factor`, the same for every group).
"""
from __future__ import annotations

import math

import torch

from mtl.model import trunk_groups


def make_optimizer(model, loss_fn, cfg, *, steps_per_epoch: int) -> tuple:
    """(AdamW over param_groups, its LambdaLR schedule) for a run of cfg.epochs epochs of steps_per_epoch steps."""
    optimizer = torch.optim.AdamW(param_groups(model, loss_fn, cfg.weight_decay, cfg.lr, cfg.layer_decay), lr=cfg.lr)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    eta_ratio = min(1.0, cfg.eta_min / cfg.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, eta_ratio))


def lr_factor(step: int, total: int, warmup: int, eta_ratio: float) -> float:
    """Multiplier of the base LR at an optimizer step: linear warmup, then cosine down to eta_min / lr."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return eta_ratio + (1 - eta_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_scales(model, layer_decay: float) -> dict:
    """{parameter name: its lr multiplier}: each trunk's last group 1, every earlier group `layer_decay` times the next
    (timm's layer-wise decay over model.trunk_groups); heads and anything outside a trunk 1."""
    scales = {}
    if layer_decay == 1:
        return scales
    for t, trunk in enumerate(model.trunks):
        group_of = trunk_groups(trunk.backbone)
        last = max(group_of.values())
        scales.update({f"trunks.{t}.backbone.{name}": layer_decay ** (last - group)
                       for name, group in group_of.items()})
    return scales


def param_groups(model, loss_module, weight_decay, lr=None, layer_decay=1.0):
    """AdamW groups: no weight decay on biases, norms and learned loss weights; frozen parameters left out.

    The first two groups (with and without weight decay) train at lr; with layer_decay < 1 each earlier trunk group
    gets its own pair at lr * its scale (lr_scales). The schedule multiplies every group's lr by the same factor.
    """
    scales = lr_scales(model, layer_decay)
    groups = {(1.0, True): [], (1.0, False): []}  # NOTE: without layer decay exactly the two groups of every release
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((scales.get(name, 1.0), p.ndim > 1), []).append(p)
    out = [{"params": params, "weight_decay": weight_decay if decays else 0.0,
            **({"lr": lr * scale} if lr is not None else {})}
           for (scale, decays), params in sorted(groups.items(), key=lambda item: (-item[0][0], not item[0][1]))]
    extra = [p for p in loss_module.parameters() if p.requires_grad]
    if extra:
        out.append({"params": extra, "weight_decay": 0.0})
    return out
