"""Models: a timm trunk and task heads, in three architectures chosen by name.

- `multihead` (default): one shared trunk, three heads (mask 3 logits, gender 1 logit, age 3 logits).
- `joint18`: one shared trunk, one 18-way head (what most top teams of the competition used).
- `separate`: three independent trunks, one per task (the approach of two seed write-ups).

Every architecture returns a dict of logits keyed by what it predicts ('mask', 'gender', 'age',
'joint', and 'age_reg', the regressed age in years, when --age-reg-weight > 0);
`mtl.metrics.head_probs` turns any of them into the same per-task probabilities. Heads come from
HEADS by name and get both the trunk's feature map and its pooled features, so attention heads
(which need the unpooled map) plug in beside the linear one.
"""
from __future__ import annotations

import difflib
import os

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mtl import labels, names
from mtl.errors import ConfigError

AGE_MEAN, AGE_SCALE = 40.0, 20.0  # NOTE: the regression head predicts (age - 40) / 20, a unit-scale target
OUTPUT_SIZES = {"mask": labels.NUM_CLASSES["mask"], "gender": 1, "age": labels.NUM_CLASSES["age"],
                "joint": labels.NUM_JOINT, "age_reg": 1}


class LinearHead(nn.Module):
    """Dropout + linear layer on the pooled features."""

    def __init__(self, map_features, pooled_features, out_features, dropout=0.2, **_):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(pooled_features, out_features)

    def forward(self, feature_map, pooled):
        return self.fc(self.drop(pooled))


class MLDecoderHead(nn.Module):
    """ML-Decoder-style head (Ridnik et al. 2023): one learned query per output cross-attends to the trunk's
    unpooled tokens (no self-attention), then a feed-forward block and a per-query ("group") linear map."""

    def __init__(self, map_features, pooled_features, out_features, dropout=0.1, dim=256, num_heads=8, ff_dim=1024,
                 **_):
        super().__init__()
        self.proj = nn.Linear(map_features, dim)
        self.queries = nn.Parameter(torch.randn(out_features, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.drop = nn.Dropout(dropout)
        self.group_weight = nn.Parameter(torch.randn(out_features, dim) * dim ** -0.5)
        self.group_bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, feature_map, pooled):
        tokens = feature_map.flatten(2).transpose(1, 2) if feature_map.ndim == 4 else feature_map  # CNN or ViT
        memory = torch.relu(self.proj(tokens))
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        q = self.norm1(q + self.drop(self.attn(q, memory, memory, need_weights=False)[0]))
        q = self.norm2(q + self.drop(self.ff(q)))
        return (q * self.group_weight).sum(-1) + self.group_bias


class CosineHead(nn.Module):
    """ArcFace's head: scale * cos(angle between the feature and each class centre); the margin is the loss's."""

    def __init__(self, map_features, pooled_features, out_features, dropout=0.2, scale=30.0, **_):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.weight = nn.Parameter(torch.randn(out_features, pooled_features) * pooled_features ** -0.5)
        self.scale = float(scale)

    def forward(self, feature_map, pooled):
        cosine = F.linear(F.normalize(self.drop(pooled), dim=1), F.normalize(self.weight, dim=1))
        return self.scale * cosine


HEADS = {"linear": LinearHead, "ml_decoder": MLDecoderHead}  # the --head choices (names.HEADS)


class Trunk(nn.Module):
    """A timm model without its classifier: returns (feature map or tokens, pooled features)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.map_features = backbone.num_features
        # NOTE: some trunks (MobileNetV3, LCNet) widen the pooled features with a conv head after pooling
        self.pooled_features = getattr(backbone, "head_hidden_size", None) or backbone.num_features

    def forward(self, x):
        feature_map = self.backbone.forward_features(x)
        return feature_map, self.backbone.forward_head(feature_map, pre_logits=True)


class TaskModel(nn.Module):
    """Trunks and heads wired by a plan: {output name: index of the trunk that feeds it}.

    Takes RGB images as uint8 (or floats) in 0..255, shape (B, 3, H, W), and normalizes them itself with
    the trunk's mean and std (buffers, saved with the weights): DataLoaders move 4x fewer bytes, and the
    normalization can never differ between training and inference.
    """

    def __init__(self, trunks, plan, head="linear", head_dropout=0.2, cosine=None, mean=(0.5,) * 3, std=(0.5,) * 3):
        super().__init__()
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.trunks = nn.ModuleList(trunks)
        self.plan = dict(plan)
        cosine = cosine or {}
        dims = [(trunk.map_features, trunk.pooled_features) for trunk in self.trunks]
        self.heads = nn.ModuleDict({
            name: (CosineHead(*dims[t], OUTPUT_SIZES[name], head_dropout, scale=cosine[name]) if name in cosine
                   else HEADS[head](*dims[t], OUTPUT_SIZES[name], dropout=head_dropout))
            for name, t in self.plan.items()})

    def forward(self, x):
        x = (x.float() - self.input_mean) / self.input_std
        features = [trunk(x) for trunk in self.trunks]
        out = {name: self.heads[name](*features[t]) for name, t in self.plan.items()}
        for name in ("gender", "age_reg"):
            if name in out:
                out[name] = out[name].squeeze(1)
        if "age_reg" in out:
            out["age_reg"] = out["age_reg"] * AGE_SCALE + AGE_MEAN
        return out


# architecture name -> (number of trunks, {output: index of the trunk that feeds it}); --arch chooses one (names.ARCHS)
ARCHS = {"multihead": (1, {"mask": 0, "gender": 0, "age": 0}),
         "joint18": (1, {"joint": 0}),
         "separate": (3, {"mask": 0, "gender": 1, "age": 2})}


def plan_for(arch: str, age_reg: bool) -> tuple[int, dict]:
    """(number of trunks, {output: trunk index}) for an architecture of ARCHS."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; known: {', '.join(names.ARCHS)}")
    n, plan = ARCHS[arch][0], dict(ARCHS[arch][1])
    if age_reg:
        plan["age_reg"] = plan.get("age", 0)
    return n, plan


def check_model_name(name: str):
    """Raise ConfigError for a name timm does not know, suggesting close ones."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ConfigError(f"unknown --model {name!r}{hint}")


def check_trunk(name: str, pretrained_file=None):
    """The trunk a run asks for can be built: timm knows the name, the weights file exists (checked where models are
    built, as timm does, not with the config: mtl.config stays light)."""
    check_model_name(name)
    if pretrained_file and not os.path.isfile(pretrained_file):
        raise ConfigError(f"--pretrained-file not found: {pretrained_file}")


def create_backbone(name, pretrained=True, pretrained_file=None, drop_path_rate=0.0):
    """A timm model without classifier; pretrained weights from the hub or a local file, never silently random."""
    check_trunk(name, pretrained_file)
    kwargs = {"num_classes": 0}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:
        return timm.create_model(name, pretrained=bool(pretrained or pretrained_file), **kwargs)
    except TypeError:
        kwargs.pop("drop_path_rate", None)  # NOTE: a few timm models take no drop_path_rate
        return create_backbone(name, pretrained, pretrained_file, 0.0)
    except Exception as exc:  # noqa: BLE001 - any failure to get the weights
        if not (pretrained or pretrained_file):
            raise
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        source = pretrained_file or "the Hugging Face hub"
        raise ConfigError(f"could not load pretrained weights for {name} from {source} ({why}); pass "
                          f"--pretrained-file PATH with a local weights file, or --no-pretrained to train "
                          f"from random weights") from None


def trunk_groups(backbone: nn.Module) -> dict:
    """{parameter name: its group} by timm's own coarse grouping: 0 the stem, 1, 2, ... the block groups in order.

    The groups of `model.group_matcher(coarse=True)` (e.g. EfficientNet's stages blocks.0 ... blocks.6, ResNet's
    layer1 ... layer4, a ViT's blocks); what follows the last block (a conv head, a final norm) joins the last group.
    """
    from timm.models import group_parameters
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        raise ConfigError(f"{type(backbone).__name__} has no group_matcher: timm does not say which of its layers "
                          f"come first, so --freeze-blocks and --layer-decay cannot be used with it")
    return group_parameters(backbone, matcher(coarse=True), reverse=True)


def freeze_blocks(backbone: nn.Module, count: int, model_name: str = "") -> nn.Module:
    """Freeze the stem and the first `count` block groups of a timm trunk: no gradients, BatchNorm statistics fixed.

    Their BatchNorm layers become timm's FrozenBatchNorm2d (timm.utils.freeze), so running statistics never
    move, in train mode too; the state dict loses those layers' num_batches_tracked, which is why a checkpoint's
    model is built with the same freeze_blocks (model_from_config).
    """
    if not count:
        return backbone
    from timm.utils import freeze
    group_of = trunk_groups(backbone)
    blocks = max(group_of.values())
    if count > blocks:
        raise ConfigError(f"--freeze-blocks {count}: {model_name or type(backbone).__name__} has {blocks} block "
                          f"group(s) after its stem (timm's group_matcher), so at most {blocks}")
    frozen = [name for name, group in group_of.items() if group <= count]
    params = dict(backbone.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)  # NOTE: also parameters of the trunk itself (a ViT's pos_embed)
    freeze(backbone, sorted({name.rpartition(".")[0] for name in frozen} - {""}))
    return backbone


def create_model(model="efficientnet_b3", arch="multihead", pretrained=True, pretrained_file=None, head="linear",
                 head_dropout=0.2, drop_path_rate=0.0, age_reg=False, cosine=None, frozen_blocks=0) -> TaskModel:
    """Build an architecture by name around a timm trunk; `cosine` maps outputs to ArcFace cosine heads' scales;
    `frozen_blocks` freezes each trunk's stem and first block groups (freeze_blocks)."""
    n_trunks, plan = plan_for(arch, age_reg)
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; known: {', '.join(names.HEADS)}")
    trunks = [Trunk(freeze_blocks(create_backbone(model, pretrained, pretrained_file, drop_path_rate), frozen_blocks,
                                  model)) for _ in range(n_trunks)]
    data_cfg = timm.data.resolve_data_config({}, model=trunks[0].backbone)
    return TaskModel(trunks, plan, head=head, head_dropout=head_dropout, cosine=cosine, mean=data_cfg["mean"],
                     std=data_cfg["std"])


def model_from_config(cfg, pretrained=None) -> TaskModel:
    """The model a TrainConfig (or a checkpoint's config dict) describes; pretrained=False skips any download."""
    get = cfg.get if isinstance(cfg, dict) else (lambda key, default=None: getattr(cfg, key, default))
    cosine = {task: float(spec.get("scale", 30.0)) for task, spec in (get("losses") or {}).items()
              if spec.get("name") == "arcface"}
    use_pretrained = get("pretrained", True) if pretrained is None else pretrained
    return create_model(get("model"), get("arch"), use_pretrained, get("pretrained_file") if use_pretrained else None,
                        get("head", "linear"), get("head_dropout", 0.2), get("drop_path_rate", 0.0),
                        get("age_reg_weight", 0) > 0, cosine, get("freeze_blocks", 0))


def normalization(model: TaskModel) -> tuple[list, list]:
    """The input mean and std the model normalizes with (the trunk's, from timm's pretrained config)."""
    return ((model.input_mean.flatten() / 255).tolist(), (model.input_std.flatten() / 255).tolist())


def clean_state_dict(state: dict) -> dict:
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
