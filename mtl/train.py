"""The training loop: every architecture, fold, tuning trial and DDP rank runs through `train`.

Reads top to bottom: setup() builds a `Run` (device, seed, model, data, loss, optimizer, schedule, its
`Progress` and its `RunFiles`) -> per epoch train_one_epoch(run, loader, epoch, writer) then evaluate(run)
then fit_calibration(run, probs) (offsets tuned for macro F1 on the validation people, mtl.calibration; well
under a second) -> log, checkpoint, early stop; `train` returns a `TrainResult`, for one fold or for every fold
(--all-folds then fits one calibration on the out-of-fold predictions, run_files.calibrate_folds). The optimizer and
its learning-rate schedule are mtl.optim's. What the run leaves on disk (checkpoints, metrics.json, config.yaml, the
HPARAMS row, and keeping them consistent across kills and --resume) is mtl.run_files's; the epoch's curves and
figures are logged here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from mtl import calibration, labels
from mtl import checkpoint as ckpt_io
from mtl.config import TrainConfig
from mtl.data import read_face_crop_record
from mtl.dataset import DataSpec, FaceDataset, load_fold
from mtl.errors import ConfigError, MTLError
from mtl.inference import amp_dtype, autocast, predict_probs, resolve_device, to_device, use_channels_last
from mtl.io import WriteError, os_error
from mtl.loader import balanced_sampler, make_loader
from mtl.losses import build_loss, class_counts
from mtl.metrics import score
from mtl.model import check_trunk, clean_state_dict, model_from_config, normalization, unwrap
from mtl.names import SAMPLERS
from mtl.optim import make_optimizer
from mtl.run_files import Progress, RunFiles, calibrate_folds, out_dir_for, prepare_out
from mtl.transforms import eval_transform, make_preprocess, mix_batch, train_transform

TARGET_KEYS = ("mask", "gender", "age_group", "age_years")
LOG_EVERY = 10  # optimizer steps between points of the train/* curves (and one at each epoch's end)


class TrainingError(MTLError):
    """Training cannot go on (e.g. the loss became NaN); the message says where and what was kept."""


# ---------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """One fold's training as setup() builds it: settings, where it runs, data, modules, progress and outputs."""
    cfg: TrainConfig
    files: RunFiles  # its folder, and the checkpoints written so far
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
    resumed: dict | None = None  # NOTE: the whole last.pt of --resume, until RunFiles.reconcile has used it

    @property
    def ddp(self) -> bool:
        return self.world > 1


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
                                    f"(batch {i}); stopped, {run.files.kept()} kept; try a lower --lr or --grad-clip")
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
    probs = predict_probs(model, run.val_loader, run.device, dtype=run.dtype, channels_last=run.channels_last)
    parts = gather((run.val_indices, probs), run.world)
    order = np.concatenate([p[0] for p in parts])
    joined = {k: np.concatenate([p[1][k] for p in parts]) for k in probs}
    inverse = np.argsort(order)
    joined = {k: v[inverse] for k, v in joined.items()}
    return score(joined, run.val_set.truth(), run.schema), joined


def fit_calibration(run: Run, probs: dict):
    """The per-class offsets that maximise 18-class macro F1 on this epoch's validation people (mtl.calibration.fit,
    cross-validated by person, only the heads --calibrate names), or None with --calibrate none."""
    if not run.cfg.calibrate:
        return None
    return calibration.fit(probs, run.val_set.truth(), run.schema, groups=run.val_set.samples["person_id"].to_numpy(),
                           tasks=run.cfg.calibrate)


# ---------------------------------------------------------------- logging
def log_epoch(writer, run: Run, epoch, stats, metrics, probs):
    """Rank 0's TensorBoard points of an epoch, at the global step: validation metrics, throughput, loss weights,
    confusion matrices and the most confident mistakes."""
    from mtl.plots import epoch_figures
    step = run.progress.step
    for k, v in metrics.items():
        writer.add_scalar(f"val/{k}", v, step)
    writer.add_scalar("train/img_per_s", stats["img_per_s"], step)
    writer.add_scalar("train/epoch", epoch, step)
    for k, v in run.loss_fn.weights().items():
        writer.add_scalar(f"loss_weight/{k}", v, step)
    for tag, figure in epoch_figures(run.val_set, probs, epoch, run.cfg.log_images).items():
        writer.add_figure(tag, figure, step)


def summary_line(epoch, cfg, stats, metrics, seconds, best):
    reg = f" age_reg {metrics['age_reg_f1']:.3f}" if "age_reg_f1" in metrics else ""
    calibrated = f" (calibrated {metrics['f1_calibrated']:.4f})" if "f1_calibrated" in metrics else ""
    return (f"epoch {epoch}/{cfg.epochs}  loss {stats['loss']:.4f}  val f1 {metrics['f1']:.4f}{calibrated} "
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


@dataclasses.dataclass
class TrainResult:
    """What `train` returns, for one fold and for every fold (--all-folds) alike."""
    out: str
    best_f1: float  # the best epoch's validation 18-class macro F1; every fold: their mean
    best_epoch: int | None  # every fold: None
    metrics: dict  # the best epoch's validation metrics; every fold: metrics.json's {folds, f1_mean, f1_std}
    epochs_run: int  # epochs trained by this call (a resumed run counts only its own); every fold: their sum
    folds: list = dataclasses.field(default_factory=list)  # every fold: each fold's TrainResult


def train(cfg: TrainConfig, on_epoch=None, log=print, log_hparams: bool = True) -> TrainResult:
    """Train one fold (or every fold with cfg.all_folds, each into out/fold<k>); returns the best metrics."""
    if not cfg.all_folds:
        return train_fold(cfg, on_epoch, log, log_hparams)
    out = all_folds_out(cfg)
    folds = []
    for k in range(cfg.folds):
        last = out / f"fold{k}" / "last.pt"  # NOTE: resumed, every fold that has a last.pt continues (or is done)
        resume = str(last) if cfg.resume and last.is_file() else None
        fold_cfg = TrainConfig(**{**cfg.to_dict(), "fold": k, "all_folds": False, "out": str(last.parent),
                                  "resume": resume})
        log(f"=== fold {k + 1}/{cfg.folds} -> {fold_cfg.out}")
        folds.append(train_fold(fold_cfg, on_epoch, log, log_hparams))
    f1 = [r.best_f1 for r in folds]
    summary = {"folds": [r.metrics for r in folds], "f1_mean": float(np.mean(f1)), "f1_std": float(np.std(f1))}
    if distributed()[0] == 0:
        if cfg.calibrate:
            summary.update(calibrate_folds(out, cfg, log))
        RunFiles(out).write_metrics(summary)
    log(f"all folds: 18-class macro F1 {summary['f1_mean']:.4f} +- {summary['f1_std']:.4f}; ensemble them with "
        f"predict.py --checkpoint '{out}/fold*/best.pt'")
    return TrainResult(str(out), summary["f1_mean"], None, summary, sum(r.epochs_run for r in folds), folds)


def all_folds_out(cfg: TrainConfig) -> Path:
    """The folder of an --all-folds run: --out, a fresh one, or, resumed, the run whose fold<k>/last.pt is given."""
    if not cfg.resume:
        return out_dir_for(cfg)
    resumed = Path(cfg.resume)
    if not re.fullmatch(r"fold\d+", resumed.parent.name):
        raise ConfigError(f"--resume {cfg.resume} with --all-folds: give a fold's last.pt, runs/NAME/fold<k>/last.pt")
    out = resumed.parent.parent
    if cfg.out and Path(cfg.out).resolve() != out.resolve():
        raise ConfigError(f"--resume {cfg.resume} with --all-folds continues every fold in {out}; leave --out out")
    return out


def setup(cfg: TrainConfig, log=print) -> Run:
    """Everything a run needs, checked before any training step: model, data, loss, optimizer, schedule, outputs."""
    rank, world = distributed()
    device = resolve_device(cfg.device)
    check_trunk(cfg.model, cfg.pretrained_file)  # NOTE: before any output folder is made
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    seed_everything(cfg.seed)
    resume = ckpt_io.load(cfg.resume) if cfg.resume else None
    if resume is not None:
        ckpt_io.check_resumable(resume, cfg)
    out, created = prepare_out(cfg, rank, log)
    cfg.out = str(out)
    try:
        return build_run(cfg, resume, out=out, rank=rank, world=world, device=device, log=log)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # NOTE: only an empty folder this call made: nothing of a run is lost
        raise


def build_run(cfg: TrainConfig, resume, *, out: Path, rank: int, world: int, device, log=print) -> Run:
    """The model, data, loss, optimizer and schedule of a run (restored from `resume`, a last.pt, when given)."""
    model = model_from_config(cfg)
    mean, std = normalization(model)
    preprocess = make_preprocess(cfg.img_size, cfg.load_size, cfg.center_crop, mean, std,
                                 face_crop=read_face_crop_record(cfg.data))
    fold = load_fold(DataSpec.of(cfg), preprocess["load_size"], cache_dir=cfg.cache_dir, use_cache=cfg.cache,
                     workers=cfg.workers, progress=cfg.progress and rank == 0,
                     log=log if rank == 0 else (lambda *_: None))
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
    batches = math.ceil(len(train_set) / (cfg.batch_size * world))
    optimizer, scheduler = make_optimizer(model, loss_fn, cfg, steps_per_epoch=math.ceil(batches / cfg.accumulate))
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
    return Run(cfg=cfg, files=RunFiles(out, resume), rank=rank, world=world, device=device, dtype=dtype,
               channels_last=channels_last, schema=schema, preprocess=preprocess, train_set=train_set,
               val_set=val_set, val_indices=val_indices, val_loader=val_loader, raw_model=model, model=trained,
               loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema, progress=progress,
               start_epoch=start_epoch, resumed=resume)


def restore(resume, model, optimizer, scheduler, scaler, loss_fn, ema) -> Progress:
    """Load model, optimizer, schedule, scaler, EMA and learned loss weights from last.pt; its Progress."""
    model.load_state_dict(clean_state_dict(resume["model"]))
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    scaler.load_state_dict(resume["scaler"])
    loss_fn.load_state_dict(resume["loss"])
    if ema is not None and resume.get("ema") is not None:
        ema.module.load_state_dict(resume["ema"])
    progress = Progress()
    progress.load_state_dict(resume["train_state"])
    return progress


def train_loader_for(run: Run, epoch: int):
    """The training loader of one epoch, seeded by (seed, epoch) so a resumed run replays the same batches."""
    cfg, world, rank, train_set = run.cfg, run.world, run.rank, run.train_set
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 7919 * rank)
    if cfg.sampler not in SAMPLERS:
        raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {cfg.sampler!r}")
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


def train_fold(cfg: TrainConfig, on_epoch=None, log=print, log_hparams: bool = True) -> TrainResult:
    """Train one person-level fold; writes best.pt, last.pt, config.yaml, metrics.json and TensorBoard logs."""
    run = setup(cfg, log)
    progress, files = run.progress, run.files
    writer, epochs_run, where = None, 0, f"before epoch {run.start_epoch}"
    try:
        if run.rank == 0:
            if run.resumed is not None:
                files.reconcile(run, run.resumed, log)
            files.write_config(cfg)
        run.resumed = None  # NOTE: the whole last.pt: dropped once reconciled
        if run.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(files.out))
            log(f"run {files.out}: {cfg.arch} {cfg.model}, fold {cfg.fold}/{cfg.folds}, {len(run.train_set)} train / "
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
            fitted = fit_calibration(run, probs) if run.rank == 0 else None
            if fitted is not None:
                metrics["f1_calibrated"] = fitted.f1_after  # NOTE: F1 on the people it was fitted on
            improved = progress.record(epoch, metrics, fitted)
            if run.rank == 0:
                log_epoch(writer, run, epoch, stats, metrics, probs)
                validation = ckpt_io.validation_record(probs, run.val_set.truth(), run.val_set.samples["person_id"])
                files.save_epoch(run, epoch, metrics, improved, calibration=fitted, validation=validation)
                writer.flush()
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
                files.write_hparams(cfg, progress)
            writer.close()
            writer = None
        if run.rank == 0 and progress.best_calibration is not None:
            log(f"calibration of epoch {progress.best_epoch} (in best.pt): "
                f"{calibration.summary(calibration.Calibration.from_dict(progress.best_calibration))}")
    except Exception as exc:
        cause = exc if isinstance(exc, WriteError) else (None if isinstance(exc, MTLError) else os_error(exc))
        if cause is None:
            raise
        why = str(cause) if isinstance(cause, WriteError) else (f"cannot write the TensorBoard logs in {files.out} "
                                                               f"({cause.strerror or cause})")
        last = files.saved.get("last.pt")
        hint = f"; free space and continue with --resume {last[0]}" if last else ""
        raise TrainingError(f"{why}; stopped {where}; kept {files.kept()}{hint}") from None
    finally:
        if writer is not None:  # stopped by an error or Ctrl-C: the HPARAMS row of the epochs done, if it can be had
            with contextlib.suppress(Exception):  # NOTE: the error already on its way says what went wrong
                if log_hparams:
                    files.write_hparams(cfg, progress)
            with contextlib.suppress(Exception):
                writer.close()
    return TrainResult(str(files.out), progress.best, progress.best_epoch, progress.best_metrics, epochs_run)
