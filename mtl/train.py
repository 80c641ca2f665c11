"""The training loop: every architecture, fold, tuning trial and DDP rank runs through `train`.

Reads top to bottom: setup() builds a `Run` (device, seed, model, data, loss, optimizer, schedule, and
its `Progress`) -> per epoch train_one_epoch(run, loader, epoch, writer) then evaluate(run) -> log,
checkpoint, early stop. The learning rate follows 1) a linear warmup over --warmup-epochs, 2) then a
cosine decay 3) down to --eta-min at the last step, 4) updated every optimizer step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
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
from mtl.io import WriteError, atomic_copy, atomic_write_text, os_error, prepare_folder, remove_stale_temps
from mtl.loader import make_loader
from mtl.losses import build_loss, class_counts
from mtl.metrics import score
from mtl.model import model_from_config, normalization, trunk_groups, unwrap
from mtl.transforms import eval_transform, make_preprocess, train_transform

TARGET_KEYS = ("mask", "gender", "age_group", "age_years")
RUN_FILES = ("last.pt", "best.pt", "metrics.json", "config.yaml", "hparams")
LOG_EVERY = 10  # optimizer steps between points of the train/* curves (and one at each epoch's end)


class TrainingError(MTLError):
    """Training cannot go on (e.g. the loss became NaN); the message says where and what was kept."""


# ---------------------------------------------------------------- the run's state
@dataclasses.dataclass
class Progress:
    """Where a run stands: optimizer steps, the best epoch so far, early stopping; last.pt's `train_state`."""
    step: int = 0
    best: float = -1.0  # the best validation 18-class F1 so far
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    best_metrics: dict = dataclasses.field(default_factory=dict)  # the best epoch's metrics, with its "epoch"

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def load_state_dict(self, state: dict):
        """Restore from a state_dict (last.pt's train_state, the same keys since the first format)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])

    def record(self, epoch: int, metrics: dict) -> bool:
        """Count one validated epoch; True when its F1 is the best so far."""
        if metrics["f1"] > self.best:
            self.best, self.best_epoch, self.bad_epochs = metrics["f1"], epoch, 0
            self.best_metrics = {**metrics, "epoch": epoch}
            return True
        self.bad_epochs += 1
        return False

    def stopped(self, patience: int) -> bool:
        """Whether early stopping has ended the run (patience 0: never)."""
        return bool(patience) and self.bad_epochs >= patience


@dataclasses.dataclass
class Run:
    """One fold's training as setup() builds it: settings, where it runs, data, modules, progress and outputs."""
    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype | None  # the autocast dtype; None: full precision
    channels_last: bool
    schema: labels.LabelSchema
    preprocess: dict  # the record checkpoints store (transforms.eval_transform rebuilds the input pipeline)
    train_set: FaceDataset
    val_set: FaceDataset
    val_indices: np.ndarray  # this rank's share of val_set
    val_loader: object
    raw_model: torch.nn.Module  # what checkpoints save
    model: torch.nn.Module  # what trains: raw_model, under torch.compile and DDP when asked
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: object | None  # timm's ModelEmaV3 with --ema
    progress: Progress = dataclasses.field(default_factory=Progress)
    start_epoch: int = 1
    saved: dict = dataclasses.field(default_factory=dict)  # {'last.pt': (path, epoch), 'best.pt': ...} on disk
    resumed: dict | None = None  # NOTE: the whole last.pt of --resume, until reconcile_best has used it

    @property
    def ddp(self) -> bool:
        return self.world > 1

    def kept(self) -> str:
        """The checkpoints a stopped run leaves: 'runs/x/last.pt (epoch 3) and runs/x/best.pt (epoch 2)'."""
        return " and ".join(f"{path} (epoch {epoch})" for path, epoch in self.saved.values()) or "no checkpoint yet"


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


def run_files(folder: Path) -> list[str]:
    """The outputs of a run already in folder: checkpoints, metrics, config, TensorBoard events."""
    if not folder.is_dir():
        return []
    events = sorted(p.name for p in folder.glob("events.out.tfevents*"))
    return [name for name in RUN_FILES if (folder / name).exists()] + events[:1] + (
        [f"{len(events) - 1} more events file(s)"] if len(events) > 1 else [])


def check_out(out: Path, resume_path=None):
    """Refuse an output folder that holds a run's files, unless it is the folder of the last.pt being resumed."""
    if resume_path is not None and out.resolve() == Path(resume_path).resolve().parent:
        return
    held = ", ".join(run_files(out))
    if not held:
        return
    if resume_path is not None:
        raise ConfigError(f"--out {out} already holds a run ({held}); --resume {resume_path} continues next to "
                          f"that file, or in an --out that holds no run")
    if (out / "last.pt").is_file():
        raise ConfigError(f"--out {out} already holds a run ({held}); choose another --out or continue it with "
                          f"--resume {out / 'last.pt'}")
    raise ConfigError(f"--out {out} already holds a run's files ({held}) but no last.pt to resume (a run stopped "
                      f"before its first epoch ended leaves none); choose another --out or delete that folder")


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
def train_one_epoch(run: Run, loader, epoch: int, writer=None) -> dict:
    """One pass over the training loader; returns mean losses and throughput (train/* scalars go to writer)."""
    cfg, model, loss_fn, opt, progress = run.cfg, run.model, run.loss_fn, run.optimizer, run.progress
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    sums, n_seen, t0 = {}, 0, time.time()
    window, window_n = {}, 0  # NOTE: train/* points are means over the steps since the previous point
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", dynamic_ncols=True, leave=False,
               disable=not (cfg.progress and run.rank == 0))
    opt.zero_grad(set_to_none=True)
    steps_in_epoch = len(loader)
    for i, batch in enumerate(bar):
        images = to_device(batch["image"], run.device, run.channels_last)
        targets = {k: batch[k].to(run.device, non_blocking=True) for k in TARGET_KEYS}
        images, other, lam = mix_batch(images, targets, cfg, gen)
        is_step = (i + 1) % cfg.accumulate == 0 or i + 1 == steps_in_epoch
        with (model.no_sync() if run.ddp and not is_step else contextlib.nullcontext()):
            with autocast(run.device, run.dtype):
                outputs = model(images)
            outputs = {k: v.float() for k, v in outputs.items()}
            loss, parts = loss_fn(outputs, targets)
            if other is not None:
                loss_b, parts_b = loss_fn(outputs, other)
                loss = lam * loss + (1 - lam) * loss_b
                parts = {k: lam * parts[k] + (1 - lam) * parts_b[k] for k in parts}
            if not torch.isfinite(loss.detach()):
                raise TrainingError(f"loss became {float(loss.detach())} at epoch {epoch}, step {progress.step} "
                                    f"(batch {i}); stopped, {run.kept()} kept; try a lower --lr or --grad-clip")
            run.scaler.scale(loss / cfg.accumulate).backward()
        if is_step:
            if cfg.grad_clip:
                run.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
            run.scaler.step(opt)
            run.scaler.update()
            opt.zero_grad(set_to_none=True)
            run.scheduler.step()
            progress.step += 1
            if run.ema is not None:
                run.ema.update(unwrap(model), step=progress.step)
        n = len(images)
        n_seen += n
        window_n += n
        for k, v in {"loss": loss, **parts}.items():
            value = float(v.detach()) * n
            sums[k] = sums.get(k, 0.0) + value
            window[k] = window.get(k, 0.0) + value
        rate = n_seen * run.world / max(time.time() - t0, 1e-9)
        bar.set_postfix(loss=f"{sums['loss'] / n_seen:.3f}", img_s=f"{rate:.0f}")
        if writer is not None and is_step and (progress.step % LOG_EVERY == 0 or i + 1 == steps_in_epoch):
            for k, v in window.items():
                writer.add_scalar("train/loss" if k == "loss" else f"train/loss_{k}", v / window_n, progress.step)
            writer.add_scalar("train/lr", opt.param_groups[0]["lr"], progress.step)
            window, window_n = {}, 0
    stats = {k: v / max(n_seen, 1) for k, v in sums.items()}
    stats["img_per_s"] = n_seen * run.world / max(time.time() - t0, 1e-9)
    return stats


# ---------------------------------------------------------------- validation
def evaluate(run: Run) -> tuple[dict, dict]:
    """(metrics, numpy probabilities) on the validation people; under DDP each rank scores a shard, rank 0 joins."""
    model = run.ema.module if run.ema is not None else unwrap(run.model)
    probs = predict_probs(model, run.val_loader, run.device, run.dtype, run.channels_last)
    parts = gather((run.val_indices, probs), run.world)
    order = np.concatenate([p[0] for p in parts])
    joined = {k: np.concatenate([p[1][k] for p in parts]) for k in probs}
    inverse = np.argsort(order)
    joined = {k: v[inverse] for k, v in joined.items()}
    return score(joined, run.val_set.truth(), run.schema), joined


# ---------------------------------------------------------------- logging
def log_epoch_images(writer, run: Run, probs, epoch, step):
    """Confusion matrices per task and for the 18 classes, and a grid of misclassified validation photos."""
    from mtl.metrics import confusion, predict_classes, recombine
    from mtl.plots import confusion_figure, photo_grid
    val, schema = run.val_set, run.schema
    pred = predict_classes(probs)
    truth_joint = schema.encode(val.mask, val.gender, val.age_group)
    parts = dict(zip(labels.TASKS, schema.decode(pred)))
    truths = {"mask": val.mask, "gender": val.gender, "age": val.age_group}
    for task, names in schema.class_names.items():
        cm = confusion(truths[task], parts[task], len(names))
        writer.add_figure(f"confusion/{task}", confusion_figure(cm, names, f"{task} (epoch {epoch})"), step)
    names18 = schema.joint_names
    writer.add_figure("confusion/18_classes", confusion_figure(confusion(truth_joint, pred, labels.NUM_JOINT),
                                                              names18, f"18 classes (epoch {epoch})"), step)
    wrong = np.flatnonzero(pred != truth_joint)
    if len(wrong) and run.cfg.log_images:
        confidence = recombine(probs)[wrong, pred[wrong]]
        worst = wrong[np.argsort(-confidence)][:run.cfg.log_images]
        images = [val.pixels(i) for i in worst]
        captions = [f"true {names18[truth_joint[i]]}\npred {names18[pred[i]]} ({recombine(probs)[i, pred[i]]:.2f})"
                    for i in worst]
        title = f"most confident mistakes, epoch {epoch} (age threshold {schema.age_threshold})"
        writer.add_figure("misclassified", photo_grid(images, captions, title), step)


def summary_line(epoch, cfg, stats, metrics, seconds, best):
    reg = f" age_reg {metrics['age_reg_f1']:.3f}" if "age_reg_f1" in metrics else ""
    return (f"epoch {epoch}/{cfg.epochs}  loss {stats['loss']:.4f}  val f1 {metrics['f1']:.4f} "
            f"(mask {metrics['mask_f1']:.3f} gender {metrics['gender_f1']:.3f} age {metrics['age_f1']:.3f}{reg})  "
            f"{stats['img_per_s']:.0f} img/s  {seconds:.0f}s{'  *best' if best else ''}")


# ---------------------------------------------------------------- main entry
class Interrupted(Exception):
    """Raised by an `interrupt_after` callback: the run stopped as a kill after that epoch would leave it."""


def interrupt_after(epoch: int):
    """An on_epoch callback that stops training after `epoch`, its checkpoints written (resume tests and checks)."""
    def on_epoch(done, metrics):
        if done == epoch:
            raise Interrupted(f"interrupted after epoch {epoch}")
    return on_epoch


def train(cfg: TrainConfig, on_epoch=None, log=print, log_hparams: bool = True) -> dict:
    """Train one fold (or every fold with cfg.all_folds, each into out/fold<k>); returns the best metrics."""
    if not cfg.all_folds:
        return train_fold(cfg, on_epoch, log, log_hparams)
    out = out_dir_for(cfg)
    results = []
    for k in range(cfg.folds):
        fold_cfg = TrainConfig(**{**cfg.to_dict(), "fold": k, "all_folds": False, "out": str(out / f"fold{k}")})
        log(f"=== fold {k + 1}/{cfg.folds} -> {fold_cfg.out}")
        results.append(train_fold(fold_cfg, on_epoch, log, log_hparams))
    summary = {"folds": [r["metrics"] for r in results], "f1_mean": float(np.mean([r["best_f1"] for r in results])),
               "f1_std": float(np.std([r["best_f1"] for r in results]))}
    if distributed()[0] == 0:
        atomic_write_text(json.dumps(summary, indent=2), out / "metrics.json")
    log(f"all folds: 18-class macro F1 {summary['f1_mean']:.4f} +- {summary['f1_std']:.4f}; ensemble them with "
        f"predict.py --checkpoint '{out}/fold*/best.pt'")
    return {"out": str(out), "best_f1": summary["f1_mean"], "metrics": summary, "folds": results}


def setup(cfg: TrainConfig, log=print) -> Run:
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
    created = False
    if rank == 0:  # NOTE: every output check before any model, data or compute
        check_out(out, cfg.resume)
        created = prepare_folder(out)
        stale = remove_stale_temps(out)
        if stale:
            log(f"removed {len(stale)} temporary file(s) that killed writes left in {out}")
    cfg.out = str(out)
    try:
        return build_run(cfg, resume, out, rank, world, device, log)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # NOTE: only an empty folder this call made: nothing of a run is lost
        raise


def build_run(cfg: TrainConfig, resume, out: Path, rank: int, world: int, device, log=print) -> Run:
    """The model, data, loss, optimizer and schedule of a run (restored from `resume`, a last.pt, when given)."""
    model = model_from_config(cfg)
    mean, std = normalization(model)
    preprocess = make_preprocess(cfg.img_size, cfg.load_size, cfg.center_crop, mean, std,
                                 face_crop=read_face_crop_record(cfg.data))
    fold = load_fold(cfg.data, preprocess["load_size"], cfg.folds, cfg.fold, cfg.seed, cfg.relabel, cfg.drop_ages,
                     cfg.extra, cfg.cache_dir, cfg.cache, cfg.workers, cfg.skip_bad,
                     progress=cfg.progress and rank == 0, log=log if rank == 0 else (lambda *_: None))
    if len(fold.train_samples) == 0 or len(fold.val_samples) == 0:
        raise ConfigError(f"fold {cfg.fold} of {cfg.folds} leaves no training or no validation photos")
    schema = labels.LabelSchema(cfg.age_threshold)  # NOTE: the one place a run's age groups are defined
    train_set = FaceDataset(fold.train_samples, fold.train_images, train_transform(preprocess, cfg.augment), schema)
    val_set = FaceDataset(fold.val_samples, fold.val_images, eval_transform(preprocess), schema)
    if cfg.oversample_old:
        old_rows = np.flatnonzero(train_set.age_group == 2)
        train_set = train_set.oversampled(old_rows, cfg.oversample_old,
                                          train_transform(preprocess, cfg.oversample_augment))
        log(f"--oversample-old {cfg.oversample_old}: {len(old_rows)} photos of people aged {schema.age_names[2]} "
            f"repeated {cfg.oversample_old} more time(s) with the {cfg.oversample_augment!r} augmentation")

    loss_fn = build_loss(cfg.losses, cfg.arch, class_counts(train_set.targets()), cfg.loss_weights,
                         cfg.loss_weighting, cfg.age_reg_weight).to(device)
    channels_last = use_channels_last(cfg.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, loss_fn, cfg.weight_decay, cfg.lr, cfg.layer_decay), lr=cfg.lr)
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
    if resume is not None:
        progress, start_epoch = restore(resume, model, optimizer, scheduler, scaler, loss_fn, ema), resume["epoch"] + 1
        log(f"resumed from {cfg.resume} at epoch {start_epoch} (best f1 {progress.best:.4f})")
    else:
        progress, start_epoch = Progress(), 1
    trained = torch.compile(model) if cfg.compile else model  # NOTE: checkpoints save the raw model: no '_orig_mod.'
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    val_indices = np.arange(rank, len(val_set), world)
    val_loader = make_loader(torch.utils.data.Subset(val_set, val_indices), cfg.batch_size * 2, cfg.workers,
                             device=device)
    return Run(cfg=cfg, out=out, rank=rank, world=world, device=device, dtype=dtype, channels_last=channels_last,
               schema=schema, preprocess=preprocess, train_set=train_set, val_set=val_set, val_indices=val_indices,
               val_loader=val_loader, raw_model=model, model=trained, loss_fn=loss_fn, optimizer=optimizer,
               scheduler=scheduler, scaler=scaler, ema=ema, progress=progress, start_epoch=start_epoch,
               saved={"last.pt": (resume["path"], resume["epoch"])} if resume is not None else {}, resumed=resume)


def restore(resume, model, optimizer, scheduler, scaler, loss_fn, ema) -> Progress:
    """Load model, optimizer, schedule, scaler, EMA and learned loss weights from last.pt; its Progress."""
    model.load_state_dict(ckpt_io.clean_state_dict(resume["model"]))
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    scaler.load_state_dict(resume["scaler"])
    loss_fn.load_state_dict(resume["loss"])
    if ema is not None and resume.get("ema") is not None:
        ema.module.load_state_dict(resume["ema"])
    progress = Progress()
    progress.load_state_dict(resume["train_state"])
    return progress


def checkpoint_epoch(path: Path):
    """The epoch a checkpoint or metrics.json records, or None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text()).get("epoch")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:  # noqa: BLE001 - a file that cannot be read holds no epoch
        return None


def reconcile_best(run: Run, resume, log=print):
    """After --resume: best.pt and metrics.json hold the best epoch last.pt records, whatever a kill interrupted.

    Per epoch, last.pt is written first (it commits the epoch and its record of the best), then best.pt, then
    metrics.json; so a kill can only leave these two behind last.pt at an improving epoch, whose weights last.pt
    holds: they are rewritten from it. Resuming into a new --out copies them from the resumed run's folder.
    """
    out, source, best_epoch = run.out, Path(resume["path"]).parent, run.progress.best_epoch
    if not best_epoch:
        return
    if checkpoint_epoch(out / "best.pt") != best_epoch:
        if best_epoch == resume["epoch"]:
            ckpt_io.save(checkpoint_dict(run, best_epoch, resume["metrics"], full=False), out / "best.pt")
        elif source.resolve() != out.resolve() and checkpoint_epoch(source / "best.pt") == best_epoch:
            atomic_copy(source / "best.pt", out / "best.pt")
        else:
            raise ConfigError(f"{out / 'best.pt'} does not hold epoch {best_epoch}, the best epoch "
                              f"{resume['path']} records, and that epoch's weights are gone; resume from a copy of "
                              f"the run's folder as it was written")
        log(f"wrote {out / 'best.pt'}: epoch {best_epoch}, the best epoch {resume['path']} records")
    run.saved["best.pt"] = (out / "best.pt", best_epoch)
    if checkpoint_epoch(out / "metrics.json") != best_epoch:
        atomic_write_text(json.dumps(run.progress.best_metrics, indent=2), out / "metrics.json")


SAMPLERS = ("none", "balanced")  # the --sampler choices: how train_loader_for draws an epoch's photos


def train_loader_for(run: Run, epoch: int):
    """The training loader of one epoch, seeded by (seed, epoch) so a resumed run replays the same batches."""
    cfg, world, rank, train_set = run.cfg, run.world, run.rank, run.train_set
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
                       drop_last=len(train_set) > cfg.batch_size * world, device=run.device)


def checkpoint_dict(run: Run, epoch, metrics, full: bool) -> dict:
    """best.pt holds the weights validated (EMA ones if on); last.pt adds everything needed to resume."""
    weights = run.ema.module.state_dict() if (run.ema is not None and not full) else run.raw_model.state_dict()
    out = {"model": weights, "config": {**run.cfg.to_dict(), "resume": None}, "schema": run.schema.to_dict(),
           "preprocess": run.preprocess, "epoch": epoch, "metrics": metrics}
    if full:
        out.update(optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                   scaler=run.scaler.state_dict(), loss=run.loss_fn.state_dict(),
                   ema=run.ema.module.state_dict() if run.ema is not None else None,
                   train_state=run.progress.state_dict())
    return out


def train_fold(cfg: TrainConfig, on_epoch=None, log=print, log_hparams: bool = True) -> dict:
    """Train one person-level fold; writes best.pt, last.pt, config.yaml, metrics.json and TensorBoard logs."""
    run = setup(cfg, log)
    progress, out = run.progress, run.out
    writer, epochs_run, where = None, 0, f"before epoch {run.start_epoch}"
    try:
        if run.rank == 0:
            if run.resumed is not None:
                reconcile_best(run, run.resumed, log)
            atomic_write_text(dump(cfg), out / "config.yaml")
        run.resumed = None  # NOTE: the whole last.pt: dropped once reconciled
        if run.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out))
            log(f"run {out}: {cfg.arch} {cfg.model}, fold {cfg.fold}/{cfg.folds}, {len(run.train_set)} train / "
                f"{len(run.val_set)} val photos, device {run.device}"
                f"{', amp ' + str(run.dtype).split('.')[-1] if run.dtype else ''}"
                f", age threshold {run.schema.age_threshold}")
        for epoch in range(run.start_epoch, cfg.epochs + 1):
            if progress.stopped(cfg.patience):  # NOTE: a resumed run that had stopped early
                log(f"the run stopped early at epoch {epoch - 1} (no better 18-class F1 for {cfg.patience} epochs); "
                    f"nothing to train")
                break
            t0, where = time.time(), f"in epoch {epoch}"
            stats = train_one_epoch(run, train_loader_for(run, epoch), epoch, writer)
            metrics, probs = evaluate(run)
            improved = progress.record(epoch, metrics)
            if run.rank == 0:
                write_epoch(run, writer, epoch, stats, metrics, probs, improved)
                log(summary_line(epoch, cfg, stats, metrics, time.time() - t0, improved))
            epochs_run += 1
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            if progress.stopped(cfg.patience):
                log(f"early stop: no better 18-class F1 for {cfg.patience} epochs (best {progress.best:.4f} at "
                    f"epoch {progress.best_epoch})")
                break
        if writer is not None:
            if log_hparams:  # NOTE: a tuning trial's hparams are its searched values, written by the study
                write_hparams(writer, cfg, progress)
            writer.close()
            writer = None
    except Exception as exc:
        cause = exc if isinstance(exc, WriteError) else (None if isinstance(exc, MTLError) else os_error(exc))
        if cause is None:
            raise
        why = str(cause) if isinstance(cause, WriteError) else (f"cannot write the TensorBoard logs in {out} "
                                                               f"({cause.strerror or cause})")
        last = run.saved.get("last.pt")
        hint = f"; free space and continue with --resume {last[0]}" if last else ""
        raise TrainingError(f"{why}; stopped {where}; kept {run.kept()}{hint}") from None
    finally:
        if writer is not None:  # stopped by an error or Ctrl-C: the HPARAMS row of the epochs done, if it can be had
            with contextlib.suppress(Exception):  # NOTE: the error already on its way says what went wrong
                if log_hparams:
                    write_hparams(writer, cfg, progress)
            with contextlib.suppress(Exception):
                writer.close()
    return {"out": str(out), "best_f1": progress.best, "best_epoch": progress.best_epoch,
            "metrics": progress.best_metrics, "epochs_run": epochs_run}


def write_epoch(run: Run, writer, epoch, stats, metrics, probs, improved):
    """Rank 0's per-epoch outputs: scalars and figures at the global step, then last.pt, best.pt, metrics.json.

    last.pt goes first: it commits the epoch (and its record of the best), so a kill before it redoes the epoch
    and a kill after it leaves best.pt and metrics.json for reconcile_best to bring up to date on --resume.
    """
    out, step = run.out, run.progress.step
    for k, v in metrics.items():
        writer.add_scalar(f"val/{k}", v, step)
    writer.add_scalar("train/img_per_s", stats["img_per_s"], step)
    writer.add_scalar("train/epoch", epoch, step)
    for k, v in run.loss_fn.weights().items():
        writer.add_scalar(f"loss_weight/{k}", v, step)
    log_epoch_images(writer, run, probs, epoch, step)
    ckpt_io.save(checkpoint_dict(run, epoch, metrics, full=True), out / "last.pt")
    run.saved["last.pt"] = (out / "last.pt", epoch)
    if improved:
        ckpt_io.save(checkpoint_dict(run, epoch, metrics, full=False), out / "best.pt")
        run.saved["best.pt"] = (out / "best.pt", epoch)
        atomic_write_text(json.dumps(run.progress.best_metrics, indent=2), out / "metrics.json")
    writer.flush()


HPARAMS_LEFT_OUT = ("out", "resume", "progress", "cache", "cache_dir", "workers", "device", "log_images", "all_folds")


def hparams_of(cfg: TrainConfig) -> dict:
    """A run's settings as HPARAMS columns (numbers, booleans, text); loss weights as three numbers."""
    from mtl.cli import default_text
    columns = {}
    for key, value in cfg.to_dict().items():
        if key in HPARAMS_LEFT_OUT:
            continue
        if key == "loss_weights":
            columns.update({f"loss_weight_{task}": float(w) for task, w in zip(labels.TASKS, value)})
        elif key == "losses":
            columns.update({f"loss_{task}": default_text(key, spec) for task, spec in value.items()})
        elif value is None:
            columns[key] = "none"
        elif isinstance(value, (list, tuple, dict)):
            columns[key] = default_text(key, value)
        else:
            columns[key] = value
    return columns


def hparams_summaries(columns: dict, status_success=True) -> list:
    """TensorBoard summaries of one HPARAMS session (start: the columns, end: its status), without an experiment."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    start = plugin_data_pb2.SessionStartInfo()
    for key, value in columns.items():
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[key].number_value = value
        else:
            start.hparams[key].string_value = str(value)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS if status_success else api_pb2.STATUS_FAILURE)
    out = []
    for tag, data in ((metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
                      (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))):
        data.version = metadata.PLUGIN_DATA_VERSION
        plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
        out.append(Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))]))
    return out


def write_hparams(writer, cfg, progress: Progress):
    """The run's settings with its best metrics, for TensorBoard's HPARAMS tab, in the run's hparams/ folder.

    Every run logs the same columns and no experiment summary of its own: TensorBoard then builds the table from
    all runs under --logdir, marks the columns whose values differ between them and shows those first.
    """
    if not progress.best_metrics:
        return
    from torch.utils.tensorboard import SummaryWriter
    folder = Path(writer.log_dir) / "hparams"
    shutil.rmtree(folder, ignore_errors=True)  # NOTE: a resumed run replaces the session its first part wrote
    metrics = {f"hparam/{k}": float(v) for k, v in progress.best_metrics.items() if k != "epoch"}
    metrics["hparam/best_epoch"] = float(progress.best_epoch)
    start, end = hparams_summaries(hparams_of(cfg))
    with SummaryWriter(str(folder)) as hp_writer:
        events = hp_writer._get_file_writer()
        events.add_summary(start)
        for tag, value in metrics.items():
            hp_writer.add_scalar(tag, value, progress.step)
        events.add_summary(end)
