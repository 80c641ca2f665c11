"""The write-ups' toolbox: ML-Decoder head, ASL and ArcFace losses, augmentation presets, oversampling the 60+."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl import config
from mtl.losses import ArcFace, AsymmetricLoss, build_loss, class_counts
from mtl.model import CosineHead, MLDecoderHead, model_from_config
from mtl.train import train
from mtl.transforms import AUGMENTATIONS, make_preprocess, train_transform

TARGETS = {"mask": torch.tensor([0, 1, 2, 0]), "gender": torch.tensor([0, 1, 1, 0]),
           "age_group": torch.tensor([0, 1, 2, 1]), "age_years": torch.tensor([20.0, 40.0, 65.0, 35.0])}


@pytest.mark.parametrize("trunk,size", [("test_efficientnet", 40), ("test_vit", 32)])
@pytest.mark.parametrize("losses", [{}, {"age": {"name": "asl", "gamma_neg": 4.0, "gamma_pos": 1.0},
                                        "mask": {"name": "arcface", "margin": 0.3, "scale": 16.0}}])
def test_heads_and_losses_train_a_few_steps(trunk, size, losses):
    torch.manual_seed(0)
    cfg = config.build({"model": trunk, "pretrained": False, "head": "ml_decoder", "losses": losses,
                        "head_dropout": 0.0})
    model = model_from_config(cfg)
    assert isinstance(model.heads["gender"], MLDecoderHead)
    if losses:
        assert isinstance(model.heads["mask"], CosineHead)
    loss_fn = build_loss(cfg.losses, cfg.arch, class_counts(TARGETS))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    first = None
    for _ in range(8):
        out = model(x)
        assert out["mask"].shape == (4, 3) and out["gender"].shape == (4,) and out["age"].shape == (4, 3)
        loss, _ = loss_fn(out, TARGETS)
        assert torch.isfinite(loss)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_ml_decoder_reads_the_unpooled_map():
    head = MLDecoderHead(16, 16, 3, dropout=0.0)
    fmap = torch.randn(2, 16, 4, 4)
    pooled = fmap.mean((2, 3))
    moved = fmap.clone()
    moved[:, :, 0, 0] += 5.0  # same mean would not matter to a pooled head; the decoder sees the change
    assert not torch.allclose(head(fmap, pooled), head(moved, pooled))
    tokens = fmap.flatten(2).transpose(1, 2)
    assert torch.allclose(head(fmap, pooled), head(tokens, pooled), atol=1e-6)


def test_asl_with_zero_gammas_and_no_smoothing_is_cross_entropy():
    logits, target = torch.randn(32, 3), torch.randint(0, 3, (32,))
    asl = AsymmetricLoss(gamma_pos=0.0, gamma_neg=0.0, eps=0.0)
    assert torch.isclose(asl(logits, target), F.cross_entropy(logits, target), atol=1e-6)
    assert not torch.isclose(AsymmetricLoss(gamma_pos=0.0, gamma_neg=4.0)(logits, target),
                             F.cross_entropy(logits, target))


def test_arcface_at_margin_zero_is_scaled_cosine_and_margin_lowers_the_target():
    head = CosineHead(8, 8, 3, dropout=0.0, scale=30.0)
    features = torch.randn(5, 8)
    logits = head(None, features)
    cosine = F.normalize(features) @ F.normalize(head.weight).T
    assert torch.allclose(logits, 30.0 * cosine, atol=1e-5)
    target = torch.tensor([0, 1, 2, 0, 1])
    assert torch.allclose(ArcFace(scale=30.0, margin=0.0).margin_logits(logits, target), logits, atol=1e-3)
    with_margin = ArcFace(scale=30.0, margin=0.5).margin_logits(logits, target)
    rows = torch.arange(5)
    assert (with_margin[rows, target] < logits[rows, target]).all()
    assert torch.allclose(with_margin[F.one_hot(target, 3) == 0], logits[F.one_hot(target, 3) == 0])


def test_arcface_is_refused_for_gender():
    with pytest.raises(Exception, match="single-logit gender"):
        config.build({"losses": {"gender": {"name": "arcface"}}, "model": "test_efficientnet"})


@pytest.mark.parametrize("preset", sorted(AUGMENTATIONS))
def test_every_preset_returns_the_configured_size(preset):
    photo = np.random.default_rng(0).integers(0, 255, (512, 384, 3), dtype=np.uint8)
    record = make_preprocess((224, 224), load_size=(384, 512), center_crop=(380, 380))
    transform = train_transform(record, preset)
    transform.set_random_seed(0)
    for _ in range(3):
        assert tuple(transform(image=photo)["image"].shape) == (3, 224, 224)


def steps_per_epoch(out) -> int:
    """The optimizer steps training took in its first epoch: the step of its `train/epoch` point."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out), size_guidance={"scalars": 0}).Reload()
    return next(int(e.step) for e in events.Scalars("train/epoch") if e.value == 1)


@pytest.mark.slow
def test_oversample_old_repeats_the_60_plus_people(tiny_config):
    from mtl.dataset import DataSpec, load_fold
    cfg = tiny_config(epochs=1, oversample_old=2, oversample_augment="gridshuffle")
    fold = load_fold(DataSpec.of(cfg), tuple(cfg.img_size), cache_dir=cfg.cache_dir,
                     workers=0, progress=False, log=lambda *_: None)
    photos, old = len(fold.train_samples), int((fold.train_samples["age"] >= cfg.age_threshold).sum())
    assert old > 0
    train(cfg, log=lambda *_: None)
    plain = tiny_config(epochs=1, out=cfg.out + "-plain")
    train(plain, log=lambda *_: None)
    # NOTE: the last incomplete batch is dropped, so an epoch is photos // batch_size steps
    assert steps_per_epoch(plain.out) == photos // cfg.batch_size
    assert steps_per_epoch(cfg.out) == (photos + 2 * old) // cfg.batch_size > steps_per_epoch(plain.out)
