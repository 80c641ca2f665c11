"""The training loop: every architecture, fold, tuning trial and DDP rank runs through `train`.

Reads top to bottom: set up (device, seed, model, data, loss, optimizer, schedule) -> per epoch
train_one_epoch() then evaluate() -> log, checkpoint, early stop. The learning rate follows
1) a linear warmup over --warmup-epochs, 2) then a cosine decay 3) down to --eta-min at the last
step, 4) updated every optimizer step.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, WeightedRandomSampler
from tqdm import tqdm

from mtl import checkpoint as ckpt_io
from mtl import labels
from mtl.config import TrainConfig, dump
from mtl.data import read_face_crop_record
from mtl.dataset import FaceDataset, load_fold
from mtl.errors import ConfigError, MTLError
from mtl.inference import amp_dtype, autocast, predict_probs, resolve_device, to_device, use_channels_last
from mtl.io import atomic_write_text
from mtl.loader import make_loader
from mtl.losses import build_loss, class_counts
from mtl.metrics import score
from mtl.model import model_from_config, normalization, unwrap
from mtl.transforms import eval_transform, make_preprocess, train_transform

TARGET_KEYS = ("mask", "gender", "age_group", "age")


class TrainingError(MTLError):
    """Training cannot go on (e.g. the loss became NaN); the message says where and what was kept."""


# ---------------------------------------------------------------- distributed helpers
def distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(obj, world):
    """All ranks' objects as a list (just [obj] without DDP)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- pieces
def out_dir_for(cfg: TrainConfig) -> Path:
    """--out, or a fresh runs/<time>_<model>_<arch> that never overwrites an earlier run."""
    if cfg.out:
        return Path(cfg.out)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}_{cfg.model}_{cfg.arch}"
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    return path


def lr_factor(step: int, total: int, warmup: int, eta_ratio: float) -> float:
    """Multiplier of the base LR at an optimizer step: linear warmup, then cosine down to eta_min / lr."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return eta_ratio + (1 - eta_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, loss_module, weight_decay):
    """AdamW groups: no weight decay on biases, norms and learned loss weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = [p for p in loss_module.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    return groups


def balanced_sampler(dataset: FaceDataset, num_samples, generator):
    """Draw each 18-class combination about equally often (samples with unknown labels by their mask class)."""
    joint = labels.encode(dataset.mask, dataset.gender, dataset.age_group)
    keys = np.where(joint >= 0, joint, 100 + dataset.mask)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    weights = torch.as_tensor(1.0 / counts[inverse], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples, replacement=True, generator=generator)


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


# ---------------------------------------------------------------- one epoch
def train_one_epoch(state, epoch: int) -> dict:
    """One pass over the training loader; returns mean losses and throughput."""
    cfg, model, loss_fn, opt = state["cfg"], state["model"], state["loss_fn"], state["optimizer"]
    device, dtype, scaler = state["device"], state["dtype"], state["scaler"]
    loader = state["train_loader"]
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    sums, n_seen, t0 = {}, 0, time.time()
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", dynamic_ncols=True, leave=False,
               disable=not (cfg.progress and state["rank"] == 0))
    opt.zero_grad(set_to_none=True)
    steps_in_epoch = len(loader)
    for i, batch in enumerate(bar):
        images = to_device(batch["image"], device, state["channels_last"])
        targets = {k: batch[k].to(device, non_blocking=True) for k in TARGET_KEYS}
        images, other, lam = mix_batch(images, targets, cfg, gen)
        is_step = (i + 1) % cfg.accumulate == 0 or i + 1 == steps_in_epoch
        sync = state["ddp"] and not is_step
        with (model.no_sync() if sync else _null()):
            with autocast(device, dtype):
                outputs = model(images)
            outputs = {k: v.float() for k, v in outputs.items()}
            loss, parts = loss_fn(outputs, targets)
            if other is not None:
                loss_b, parts_b = loss_fn(outputs, other)
                loss = lam * loss + (1 - lam) * loss_b
                parts = {k: lam * parts[k] + (1 - lam) * parts_b[k] for k in parts}
            if not torch.isfinite(loss.detach()):
                raise TrainingError(f"loss became {float(loss.detach())} at epoch {epoch}, step {state['step']} "
                                    f"(batch {i}); stopped, {state['last_good']} kept; try a lower --lr "
                                    f"or --grad-clip")
            scaler.scale(loss / cfg.accumulate).backward()
        if is_step:
            if cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            state["scheduler"].step()
            state["step"] += 1
            if state["ema"] is not None:
                state["ema"].update(unwrap(model), step=state["step"])
        n = len(images)
        n_seen += n
        for k, v in {"loss": loss, **parts}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
        rate = n_seen * state["world"] / max(time.time() - t0, 1e-9)
        bar.set_postfix(loss=f"{sums['loss'] / n_seen:.3f}", img_s=f"{rate:.0f}")
        writer = state["writer"]
        if writer is not None and state["step"] % 10 == 0 and is_step:
            writer.add_scalar("train/loss", float(loss.detach()), state["step"])
            for k, v in parts.items():
                writer.add_scalar(f"train/loss_{k}", float(v.detach()), state["step"])
            writer.add_scalar("train/lr", opt.param_groups[0]["lr"], state["step"])
    stats = {k: v / max(n_seen, 1) for k, v in sums.items()}
    stats["img_per_s"] = n_seen * state["world"] / max(time.time() - t0, 1e-9)
    return stats


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- validation
def evaluate(state) -> tuple[dict, dict]:
    """(metrics, numpy probabilities) on the validation people; under DDP each rank scores a shard, rank 0 joins."""
    model = state["ema"].module if state["ema"] is not None else unwrap(state["model"])
    probs = predict_probs(model, state["val_loader"], state["device"], state["dtype"], state["channels_last"])
    parts = gather((state["val_indices"], probs), state["world"])
    order = np.concatenate([p[0] for p in parts])
    joined = {k: np.concatenate([p[1][k] for p in parts]) for k in probs}
    inverse = np.argsort(order)
    joined = {k: v[inverse] for k, v in joined.items()}
    val = state["val_set"]
    truth = {"mask": val.mask, "gender": val.gender, "age": val.age}
    return score(joined, truth, state["cfg"].age_threshold), joined


# ---------------------------------------------------------------- logging
def log_epoch_images(writer, state, metrics, probs, epoch):
    """Confusion matrices per task and for the 18 classes, and a grid of misclassified validation photos."""
    from mtl.metrics import confusion, predict_classes
    from mtl.plots import confusion_figure, photo_grid
    val = state["val_set"]
    threshold = state["cfg"].age_threshold
    pred = predict_classes(probs)
    truth_joint = labels.encode(val.mask, val.gender, val.age_group)
    parts = dict(zip(labels.TASKS, labels.decode(pred)))
    truths = {"mask": val.mask, "gender": val.gender, "age": val.age_group}
    for task in labels.TASKS:
        names = labels.TASK_CLASSES[task]
        cm = confusion(truths[task], parts[task], len(names))
        writer.add_figure(f"confusion/{task}", confusion_figure(cm, names, f"{task} (epoch {epoch})"), epoch)
    names18 = [labels.class_name(c) for c in range(labels.NUM_JOINT)]
    writer.add_figure("confusion/18_classes", confusion_figure(confusion(truth_joint, pred, labels.NUM_JOINT),
                                                              names18, f"18 classes (epoch {epoch})"), epoch)
    wrong = np.flatnonzero(pred != truth_joint)
    if len(wrong) and state["cfg"].log_images:
        from mtl.metrics import recombine
        confidence = recombine(probs)[wrong, pred[wrong]]
        worst = wrong[np.argsort(-confidence)][:state["cfg"].log_images]
        images = [val.pixels(i) for i in worst]
        captions = [f"true {labels.class_name(truth_joint[i])}\npred {labels.class_name(pred[i])} "
                    f"({recombine(probs)[i, pred[i]]:.2f})" for i in worst]
        writer.add_figure("misclassified", photo_grid(images, captions, f"most confident mistakes, epoch {epoch} "
                                                                        f"(age threshold {threshold})"), epoch)


def summary_line(epoch, cfg, stats, metrics, seconds, best):
    reg = f" age_reg {metrics['age_reg_f1']:.3f}" if "age_reg_f1" in metrics else ""
    return (f"epoch {epoch}/{cfg.epochs}  loss {stats['loss']:.4f}  val f1 {metrics['f1']:.4f} "
            f"(mask {metrics['mask_f1']:.3f} gender {metrics['gender_f1']:.3f} age {metrics['age_f1']:.3f}{reg})  "
            f"{stats['img_per_s']:.0f} img/s  {seconds:.0f}s{'  *best' if best else ''}")


# ---------------------------------------------------------------- main entry
def train(cfg: TrainConfig, on_epoch=None, log=print) -> dict:
    """Train one fold (or every fold with cfg.all_folds, each into out/fold<k>); returns the best metrics."""
    if not cfg.all_folds:
        return train_fold(cfg, on_epoch, log)
    out = out_dir_for(cfg)
    results = []
    for k in range(cfg.folds):
        fold_cfg = TrainConfig(**{**cfg.to_dict(), "fold": k, "all_folds": False, "out": str(out / f"fold{k}")})
        log(f"=== fold {k + 1}/{cfg.folds} -> {fold_cfg.out}")
        results.append(train_fold(fold_cfg, on_epoch, log))
    summary = {"folds": [r["metrics"] for r in results], "f1_mean": float(np.mean([r["best_f1"] for r in results])),
               "f1_std": float(np.std([r["best_f1"] for r in results]))}
    if distributed()[0] == 0:
        atomic_write_text(json.dumps(summary, indent=2), out / "metrics.json")
    log(f"all folds: 18-class macro F1 {summary['f1_mean']:.4f} +- {summary['f1_std']:.4f}; ensemble them with "
        f"predict.py --checkpoint '{out}/fold*/best.pt'")
    return {"out": str(out), "best_f1": summary["f1_mean"], "metrics": summary, "folds": results}


def setup(cfg: TrainConfig, log=print) -> dict:
    """Everything a run needs, checked before any training step: model, data, loss, optimizer, schedule, outputs."""
    rank, world = distributed()
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    seed_everything(cfg.seed)
    resume = ckpt_io.load(cfg.resume) if cfg.resume else None
    if resume is not None:
        ckpt_io.check_resumable(resume, cfg)
    out = Path(cfg.out) if cfg.out else (Path(cfg.resume).parent if cfg.resume else out_dir_for(cfg))
    if rank == 0 and resume is None and (out / "last.pt").exists():
        raise ConfigError(f"--out {out} already holds a run; choose another --out or continue it with "
                          f"--resume {out / 'last.pt'}")
    cfg.out = str(out)

    model = model_from_config(cfg)
    mean, std = normalization(model)
    preprocess = make_preprocess(cfg.img_size, cfg.load_size, cfg.center_crop, mean, std,
                                 face_crop=read_face_crop_record(cfg.data))
    fold = load_fold(cfg.data, preprocess["load_size"], cfg.folds, cfg.fold, cfg.seed, cfg.relabel, cfg.drop_ages,
                     cfg.extra, cfg.cache_dir, cfg.cache, cfg.workers, cfg.skip_bad,
                     progress=cfg.progress and rank == 0, log=log if rank == 0 else (lambda *_: None))
    if len(fold.train_samples) == 0 or len(fold.val_samples) == 0:
        raise ConfigError(f"fold {cfg.fold} of {cfg.folds} leaves no training or no validation photos")
    train_set = FaceDataset(fold.train_samples, fold.train_images, train_transform(preprocess, cfg.augment),
                            cfg.age_threshold)
    val_set = FaceDataset(fold.val_samples, fold.val_images, eval_transform(preprocess), cfg.age_threshold)
    if cfg.oversample_old:
        old_rows = np.flatnonzero(train_set.age_group == 2)
        train_set = train_set.oversampled(old_rows, cfg.oversample_old,
                                          train_transform(preprocess, cfg.oversample_augment))
        log(f"--oversample-old {cfg.oversample_old}: {len(old_rows)} photos of people aged {cfg.age_threshold}+ "
            f"repeated {cfg.oversample_old} more time(s) with the {cfg.oversample_augment!r} augmentation")

    loss_fn = build_loss(cfg.losses, cfg.arch, class_counts(train_set.targets()), cfg.loss_weights,
                         cfg.loss_weighting, cfg.age_reg_weight).to(device)
    channels_last = use_channels_last(cfg.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, loss_fn, cfg.weight_decay), lr=cfg.lr)
    batches = math.ceil(len(train_set) / (cfg.batch_size * world))
    steps_per_epoch = math.ceil(batches / cfg.accumulate)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, min(1.0, cfg.eta_min / cfg.lr)))
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.ema)

    state = {"cfg": cfg, "rank": rank, "world": world, "device": device, "dtype": dtype, "out": out,
             "channels_last": channels_last, "preprocess": preprocess, "train_set": train_set, "val_set": val_set,
             "loss_fn": loss_fn, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "ema": ema,
             "raw_model": model, "step": 0, "start_epoch": 1, "best": -1.0, "best_epoch": 0, "bad_epochs": 0,
             "best_metrics": {}, "last_good": "no checkpoint yet", "skipped": fold.skipped}
    if resume is not None:
        restore(state, resume)
        log(f"resumed from {cfg.resume} at epoch {state['start_epoch']} (best f1 {state['best']:.4f})")
    if cfg.compile:
        model = torch.compile(model)  # NOTE: checkpoints save the raw model, so no '_orig_mod.' prefix is written
    state["ddp"] = world > 1
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    state["model"] = model
    val_indices = np.arange(rank, len(val_set), world)
    state["val_indices"] = val_indices
    state["val_loader"] = make_loader(torch.utils.data.Subset(val_set, val_indices), cfg.batch_size * 2,
                                      cfg.workers, device=device)
    return state


def restore(state, resume):
    """Load model, optimizer, schedule, scaler, EMA, learned loss weights and early-stopping state from last.pt."""
    state["raw_model"].load_state_dict(ckpt_io.clean_state_dict(resume["model"]))
    state["optimizer"].load_state_dict(resume["optimizer"])
    state["scheduler"].load_state_dict(resume["scheduler"])
    state["scaler"].load_state_dict(resume["scaler"])
    state["loss_fn"].load_state_dict(resume["loss"])
    if state["ema"] is not None and resume.get("ema") is not None:
        state["ema"].module.load_state_dict(resume["ema"])
    for key in ("step", "best", "best_epoch", "bad_epochs", "best_metrics"):
        state[key] = resume["train_state"][key]
    state["start_epoch"] = resume["epoch"] + 1
    state["last_good"] = resume["path"]


def train_loader_for(state, epoch):
    """The training loader of one epoch, seeded by (seed, epoch) so a resumed run replays the same batches."""
    cfg, world, rank = state["cfg"], state["world"], state["rank"]
    train_set = state["train_set"]
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 7919 * rank)
    if cfg.sampler == "balanced":
        sampler = balanced_sampler(train_set, math.ceil(len(train_set) / world), gen)
    elif world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = torch.utils.data.RandomSampler(train_set, generator=gen)
    train_set.set_random_seed(cfg.seed * 1000 + epoch)  # used when workers == 0
    torch.manual_seed(cfg.seed * 1000 + epoch)
    return make_loader(train_set, cfg.batch_size, cfg.workers, sampler=sampler, generator=gen,
                       drop_last=len(train_set) > cfg.batch_size * world, device=state["device"])


def checkpoint_dict(state, epoch, metrics, full: bool) -> dict:
    """best.pt holds the weights validated (EMA ones if on); last.pt adds everything needed to resume."""
    cfg = state["cfg"]
    raw = state["raw_model"]
    weights = state["ema"].module.state_dict() if (state["ema"] is not None and not full) else raw.state_dict()
    out = {"model": weights, "config": cfg.to_dict(), "schema": ckpt_io.schema_for(cfg),
           "preprocess": state["preprocess"], "epoch": epoch, "metrics": metrics}
    if full:
        out.update(optimizer=state["optimizer"].state_dict(), scheduler=state["scheduler"].state_dict(),
                   scaler=state["scaler"].state_dict(), loss=state["loss_fn"].state_dict(),
                   ema=state["ema"].module.state_dict() if state["ema"] is not None else None,
                   train_state={k: state[k] for k in ("step", "best", "best_epoch", "bad_epochs", "best_metrics")})
    return out


def train_fold(cfg: TrainConfig, on_epoch=None, log=print) -> dict:
    """Train one person-level fold; writes best.pt, last.pt, config.yaml, metrics.json and TensorBoard logs."""
    state = setup(cfg, log)
    rank, out = state["rank"], state["out"]
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dump(cfg), out / "config.yaml")
        writer = SummaryWriter(str(out))
        n_train, n_val = len(state["train_set"]), len(state["val_set"])
        log(f"run {out}: {cfg.arch} {cfg.model}, fold {cfg.fold}/{cfg.folds}, {n_train} train / {n_val} val "
            f"photos, device {state['device']}{', amp ' + str(state['dtype']).split('.')[-1] if state['dtype'] else ''}"
            f", age threshold {cfg.age_threshold}")
    state["writer"] = writer
    epoch = state["start_epoch"] - 1
    try:
        for epoch in range(state["start_epoch"], cfg.epochs + 1):
            t0 = time.time()
            state["train_loader"] = train_loader_for(state, epoch)
            stats = train_one_epoch(state, epoch)
            metrics, probs = evaluate(state)
            improved = metrics["f1"] > state["best"]
            if improved:
                state.update(best=metrics["f1"], best_epoch=epoch, bad_epochs=0, best_metrics={**metrics,
                                                                                             "epoch": epoch})
            else:
                state["bad_epochs"] += 1
            if rank == 0:
                write_epoch(state, writer, epoch, stats, metrics, probs, improved)
                log(summary_line(epoch, cfg, stats, metrics, time.time() - t0, improved))
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            if cfg.patience and state["bad_epochs"] >= cfg.patience:
                log(f"early stop: no better 18-class F1 for {cfg.patience} epochs (best {state['best']:.4f} at "
                    f"epoch {state['best_epoch']})")
                break
    finally:
        if writer is not None:
            write_hparams(writer, cfg, state)
            writer.close()
    return {"out": str(out), "best_f1": state["best"], "best_epoch": state["best_epoch"],
            "metrics": state["best_metrics"], "epochs_run": epoch - state["start_epoch"] + 1}


def write_epoch(state, writer, epoch, stats, metrics, probs, improved):
    """Rank 0's per-epoch outputs: scalars, figures, checkpoints, metrics.json."""
    out = state["out"]
    for k, v in metrics.items():
        writer.add_scalar(f"val/{k}", v, epoch)
    for k, v in stats.items():
        writer.add_scalar(f"epoch/{k}", v, epoch)
    for k, v in state["loss_fn"].weights().items():
        writer.add_scalar(f"loss_weight/{k}", v, epoch)
    log_epoch_images(writer, state, metrics, probs, epoch)
    ckpt_io.save(checkpoint_dict(state, epoch, metrics, full=True), out / "last.pt")
    state["last_good"] = str(out / "last.pt")
    if improved:
        ckpt_io.save(checkpoint_dict(state, epoch, metrics, full=False), out / "best.pt")
        atomic_write_text(json.dumps(state["best_metrics"], indent=2), out / "metrics.json")
    writer.flush()


def write_hparams(writer, cfg, state):
    """The run's hyper-parameters with its best metrics, so TensorBoard's HPARAMS tab compares runs in one table."""
    if not state["best_metrics"]:
        return
    hparams = {k: (str(v) if isinstance(v, (list, dict)) or v is None else v) for k, v in cfg.to_dict().items()
               if k not in ("data", "out", "resume", "progress", "cache_dir")}
    metrics = {f"hparam/{k}": float(v) for k, v in state["best_metrics"].items() if k != "epoch"}
    writer.add_hparams(hparams, metrics, run_name=".")
