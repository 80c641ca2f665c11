"""Losses: per-task losses chosen by name, and their weighted (or learned) sum.

Each task's loss is built from a spec such as {'name': 'focal', 'gamma': 2, 'class_weights': 'balanced'}.
Every loss takes class logits (B, K) and integer targets (B,); gender's single logit z is seen as
the two logits [0, z] (softmax of which is [1 - sigmoid(z), sigmoid(z)]) by every loss but `bce`.
Samples whose label for a task is UNKNOWN (-1) contribute nothing to that task's loss.

Total = w_mask L_mask + w_gender L_gender + w_age L_age (+ w_reg L_reg), or with
`loss_weighting='uncertainty'` (Kendall et al. 2018) sum_i L_i / (2 exp s_i) + s_i / 2 with learned s_i.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl import labels, names
from mtl.checks import check_loss_spec
from mtl.errors import ConfigError
from mtl.model import AGE_SCALE


def balanced_weights(counts) -> torch.Tensor:
    """Inverse-frequency class weights with mean 1 (classes absent from the fold get weight 1)."""
    counts = torch.as_tensor(counts, dtype=torch.float32)
    present = counts > 0
    weights = torch.ones_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights / weights[present].mean()


def _class_weights(option, counts, k):
    if option in (None, "none", False):
        return None
    if option == "balanced":
        return balanced_weights(counts)
    weights = torch.as_tensor(option, dtype=torch.float32)
    if weights.shape != (k,):
        raise ConfigError(f"class_weights must be 'balanced' or {k} numbers, got {option!r}")
    return weights


def two_logits(z):
    """One binary logit (B,) -> class logits (B, 2) with the same softmax as sigmoid."""
    return torch.stack([torch.zeros_like(z), z], dim=1)


class CrossEntropy(nn.Module):
    def __init__(self, weight=None, label_smoothing=0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.label_smoothing)


class Focal(nn.Module):
    """Focal loss (Lin et al. 2017): cross entropy scaled by (1 - p_true)^gamma, optional class weights."""

    def __init__(self, weight=None, gamma=2.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.gamma = float(gamma)

    def forward(self, logits, target):
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum()
        return loss.mean()


class SoftF1(nn.Module):
    """1 - soft macro F1 over the batch (probabilities as soft counts), optionally plus CE."""

    def __init__(self, weight=None, ce_weight=0.0, eps=1e-7):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ce_weight, self.eps = float(ce_weight), eps

    def forward(self, logits, target):
        probs = F.softmax(logits.float(), dim=1)
        onehot = F.one_hot(target, probs.shape[1]).float()
        tp = (probs * onehot).sum(0)
        fp = (probs * (1 - onehot)).sum(0)
        fn = ((1 - probs) * onehot).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn + self.eps)
        weight = self.weight if self.weight is not None else torch.ones_like(f1)
        loss = 1 - (f1 * weight).sum() / weight.sum()
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits, target, weight=self.weight)
        return loss


class AsymmetricLoss(nn.Module):
    """Single-label asymmetric loss (ASL, Ridnik et al. 2021): the target's log-probability down-weighted by
    (1 - p)^gamma_pos, other classes' (with label smoothing eps) by p^gamma_neg; gammas 0 and eps 0 give CE."""

    def __init__(self, weight=None, gamma_pos=0.0, gamma_neg=4.0, eps=0.1):
        super().__init__()
        self.register_buffer("weight", weight)
        self.gamma_pos, self.gamma_neg, self.eps = float(gamma_pos), float(gamma_neg), float(eps)

    def forward(self, logits, target):
        k = logits.shape[1]
        log_p = F.log_softmax(logits.float(), dim=1)
        onehot = F.one_hot(target, k).float()
        p = log_p.exp()
        base = 1 - p * onehot - (1 - p) * (1 - onehot)  # 1 - p for the target, p for the others
        focus = base.clamp(min=0) ** (self.gamma_pos * onehot + self.gamma_neg * (1 - onehot))
        soft = onehot * (1 - self.eps) + self.eps / k
        loss = -(soft * log_p * focus).sum(1)
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum()
        return loss.mean()


class ArcFace(nn.Module):
    """Additive angular margin (Deng et al. 2019) on a CosineHead's logits = scale * cos(theta): the target's
    becomes scale * cos(theta + margin), then cross entropy; at inference the head's plain logits are used."""

    def __init__(self, weight=None, scale=30.0, margin=0.3):
        super().__init__()
        self.register_buffer("weight", weight)
        self.scale, self.margin = float(scale), float(margin)

    def margin_logits(self, logits, target):
        cosine = (logits.float() / self.scale).clamp(-1 + 1e-7, 1 - 1e-7)
        theta = torch.acos(cosine)
        target_cos = torch.cos(theta + self.margin)
        onehot = F.one_hot(target, cosine.shape[1]).bool()
        return self.scale * torch.where(onehot, target_cos, cosine)

    def forward(self, logits, target):
        return F.cross_entropy(self.margin_logits(logits, target), target, weight=self.weight)


class BinaryCE(nn.Module):
    """BCE on one logit, with optional pos_weight (for the female class) and label smoothing."""

    binary = True

    def __init__(self, pos_weight=None, label_smoothing=0.0):
        super().__init__()
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor(float(pos_weight)))
        self.label_smoothing = float(label_smoothing)

    def forward(self, logit, target):
        t = target.float() * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(logit.float(), t, pos_weight=self.pos_weight)


def _build_ce(spec, counts, k):
    return CrossEntropy(_class_weights(spec.get("class_weights"), counts, k), spec.get("label_smoothing", 0.0))


def _build_focal(spec, counts, k):
    return Focal(_class_weights(spec.get("class_weights"), counts, k), spec.get("gamma", 2.0))


def _build_soft_f1(spec, counts, k):
    return SoftF1(_class_weights(spec.get("class_weights"), counts, k), spec.get("ce_weight", 0.0))


def _build_bce(spec, counts, k):
    pos_weight = spec.get("pos_weight")
    if pos_weight == "balanced":
        counts = torch.as_tensor(counts, dtype=torch.float32)
        pos_weight = float(counts[0] / counts[1].clamp(min=1))
    return BinaryCE(pos_weight, spec.get("label_smoothing", 0.0))


def _build_asl(spec, counts, k):
    return AsymmetricLoss(_class_weights(spec.get("class_weights"), counts, k), spec.get("gamma_pos", 0.0),
                          spec.get("gamma_neg", 4.0), spec.get("eps", 0.1))


def _build_arcface(spec, counts, k):
    return ArcFace(_class_weights(spec.get("class_weights"), counts, k), spec.get("scale", 30.0),
                   spec.get("margin", 0.3))


# loss name -> builder; the names and the options each takes are names.LOSS_OPTIONS
LOSSES = {"ce": _build_ce, "focal": _build_focal, "soft_f1": _build_soft_f1, "bce": _build_bce,
          "asl": _build_asl, "arcface": _build_arcface}


def build_task_loss(task: str, spec: dict, counts) -> nn.Module:
    """The loss module for one task ('mask', 'gender', 'age' or 'joint'), class weights from the fold's counts."""
    check_loss_spec(task, spec)
    k = labels.NUM_JOINT if task == "joint" else labels.NUM_CLASSES[task]
    return LOSSES[spec["name"]](spec, counts, k)


# which target a model output is trained on
TARGET_OF = {"mask": "mask", "gender": "gender", "age": "age_group"}


def joint_consistency(targets) -> torch.Tensor:
    """(B, 18) bool: the classes that agree with each sample's known labels (all 18 if nothing is known)."""
    classes = torch.arange(labels.NUM_JOINT, device=targets["mask"].device)
    parts = dict(zip(("mask", "gender", "age_group"), labels.split_index(classes)))
    ok = torch.ones(len(targets["mask"]), labels.NUM_JOINT, dtype=torch.bool, device=classes.device)
    for key, part in parts.items():
        t = targets[key][:, None]
        ok &= (t < 0) | (t == part[None, :])
    return ok


class MultiTaskLoss(nn.Module):
    """Weighted (or uncertainty-weighted) sum of the per-task losses over one batch."""

    def __init__(self, task_losses: dict, weights=(1.0, 1.0, 1.0), weighting="fixed",
                 age_reg_weight=0.0):
        super().__init__()
        if weighting not in names.WEIGHTINGS:
            raise ConfigError(f"unknown --loss-weighting {weighting!r}; known: {', '.join(names.WEIGHTINGS)}")
        self.losses = nn.ModuleDict(task_losses)
        self.fixed = dict(zip(labels.TASKS, weights))
        self.fixed["joint"] = 1.0
        self.age_reg_weight = float(age_reg_weight)
        self.weighting = weighting
        self.log_vars = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in task_losses}) \
            if weighting == "uncertainty" else None

    def weights(self) -> dict:
        """The weight in force for each task loss (learned ones included), as floats."""
        if self.log_vars is None:
            return {name: self.fixed[name] for name in self.losses}
        return {name: float(0.5 * torch.exp(-s.detach())) for name, s in self.log_vars.items()}

    def task_loss(self, name, output, targets):
        """One task's loss over the samples that carry its label; exactly 0 (with gradient) when none do."""
        if name == "joint":
            return self._joint_loss(output, targets)
        target = targets[TARGET_OF[name]]
        known = target >= 0
        if not known.any():
            return output.sum() * 0.0
        out, t = output[known], target[known]
        if name == "gender" and not getattr(self.losses[name], "binary", False):
            out = two_logits(out)
        return self.losses[name](out, t)

    def _joint_loss(self, logits, targets):
        """18-way loss on fully labelled samples; partially labelled ones add -log P(classes consistent with them)."""
        full = (targets["mask"] >= 0) & (targets["gender"] >= 0) & (targets["age_group"] >= 0)
        total, n = logits.sum() * 0.0, len(logits)
        if full.any():
            t = labels.joint_index(targets["mask"][full], targets["gender"][full], targets["age_group"][full])
            total = total + self.losses["joint"](logits[full], t) * full.sum() / n
        consistent = joint_consistency(targets)
        partial = ~full & (~consistent).any(1)
        if partial.any():
            log_p = F.log_softmax(logits[partial].float(), dim=1)
            nll = -torch.logsumexp(log_p.masked_fill(~consistent[partial], float("-inf")), dim=1)
            total = total + nll.sum() / n
        return total

    def forward(self, outputs: dict, targets: dict):
        """(total loss, {name: loss}) for one batch; targets hold mask, gender, age_group and age_years."""
        parts = {name: self.task_loss(name, outputs[name], targets) for name in self.losses}
        if self.log_vars is None:
            total = sum(self.fixed[name] * loss for name, loss in parts.items())
        else:
            total = sum(loss * 0.5 * torch.exp(-self.log_vars[name]) + 0.5 * self.log_vars[name]
                        for name, loss in parts.items())
        if "age_reg" in outputs and self.age_reg_weight > 0:
            years = targets["age_years"]
            known = years >= 0
            pred = outputs["age_reg"]
            reg = (F.smooth_l1_loss(pred[known].float() / AGE_SCALE, years[known].float() / AGE_SCALE)
                   if known.any() else pred.sum() * 0.0)
            parts["age_reg"] = reg
            total = total + self.age_reg_weight * reg
        return total, parts


def class_counts(targets: dict) -> dict:
    """Per-task class counts over known labels (for balanced class weights): {'mask': [..], ...}."""
    counts = {}
    for name, key in TARGET_OF.items():
        t = targets[key]
        counts[name] = torch.bincount(t[t >= 0], minlength=labels.NUM_CLASSES[name]).tolist()
    t = labels.encode(targets["mask"].numpy(), targets["gender"].numpy(), targets["age_group"].numpy())
    t = torch.as_tensor(t)
    counts["joint"] = torch.bincount(t[t >= 0], minlength=labels.NUM_JOINT).tolist()
    return counts


def build_loss(losses: dict, arch: str, counts: dict, weights=(1.0, 1.0, 1.0), weighting="fixed",
               age_reg_weight=0.0) -> MultiTaskLoss:
    """The MultiTaskLoss for an architecture: joint18 trains one 18-way loss, the others three task losses."""
    if arch == "joint18":
        spec = losses.get("joint", {"name": "ce"})
        task_losses = {"joint": build_task_loss("joint", spec, counts["joint"])}
    else:
        task_losses = {task: build_task_loss(task, losses[task], counts[task]) for task in labels.TASKS}
    return MultiTaskLoss(task_losses, weights, weighting, age_reg_weight)
