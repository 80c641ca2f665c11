"""A training run's files, kept consistent epoch by epoch (as timm's CheckpointSaver keeps its checkpoints).

`runs/NAME/` holds last.pt (everything needed to resume), best.pt (the weights of the best epoch),
metrics.json (that epoch's metrics and calibration), config.yaml (the resolved config) and hparams/ (the run's
row in TensorBoard's HPARAMS tab); the training loop's curves and figures lie beside them (mtl.train).

`Progress` is where a run stands (last.pt's train_state: steps, the best epoch, early stopping).
`prepare_out` picks and checks the folder (`check_out` refuses one that holds another run's files). Each
epoch `RunFiles.save_epoch` writes last.pt first (it commits the epoch and its record of the best), then
best.pt and metrics.json when the epoch is the best so far: a kill can only leave those two behind
last.pt, and `RunFiles.reconcile` brings them up to date on --resume. `RunFiles.write_hparams` writes the
HPARAMS row with TensorBoard's own summary functions. Every checkpoint holds the calibration fitted on its
epoch's validation people and the probabilities it was fitted on (mtl.checkpoint), so best.pt's calibration is
always that of its weights, after a kill and --resume too; `calibrate_folds` fits --all-folds' one calibration on
the out-of-fold predictions and writes it into every fold's best.pt.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
from pathlib import Path

from mtl import labels
from mtl.config import TrainConfig, dump, value_text
from mtl.errors import ConfigError
from mtl.io import atomic_copy, atomic_write_text, prepare_folder, remove_stale_temps

RUN_FILES = ("last.pt", "best.pt", "metrics.json", "config.yaml", "hparams")
HPARAMS_LEFT_OUT = ("out", "resume", "progress", "cache", "cache_dir", "workers", "device", "log_images", "all_folds")


# ---------------------------------------------------------------- the record of the best
@dataclasses.dataclass
class Progress:
    """Where a run stands: optimizer steps, the best epoch so far, early stopping; last.pt's `train_state`."""
    step: int = 0
    best: float = -1.0  # the best validation 18-class F1 so far
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    best_metrics: dict = dataclasses.field(default_factory=dict)  # the best epoch's metrics, with its "epoch"
    best_calibration: dict | None = None  # the record of the calibration fitted on the best epoch (None: none)

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def load_state_dict(self, state: dict):
        """Restore from a state_dict (last.pt's train_state: the same keys since the first format, plus
        best_calibration since runs are calibrated; a last.pt written before has none)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, state.get(f.name) if f.name == "best_calibration" else state[f.name])

    def record(self, epoch: int, metrics: dict, calibration=None) -> bool:
        """Count one validated epoch (and the calibration fitted on it, if any); True when its F1 is the best yet."""
        if metrics["f1"] > self.best:
            self.best, self.best_epoch, self.bad_epochs = metrics["f1"], epoch, 0
            self.best_metrics = {**metrics, "epoch": epoch}
            self.best_calibration = calibration.to_dict() if calibration is not None else None
            return True
        self.bad_epochs += 1
        return False

    def stopped(self, patience: int) -> bool:
        """Whether early stopping has ended the run (patience 0: never)."""
        return bool(patience) and self.bad_epochs >= patience



# ---------------------------------------------------------------- the folder
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


def prepare_out(cfg: TrainConfig, rank: int = 0, log=print) -> tuple[Path, bool]:
    """(the run's folder, whether this call made it): --out, or next to the last.pt resumed, or a fresh one; rank 0
    checks it holds no other run, proves it writable and removes killed writes' temporary files, before any model,
    data or compute."""
    out = Path(cfg.out) if cfg.out else (Path(cfg.resume).parent if cfg.resume else out_dir_for(cfg))
    created = False
    if rank == 0:
        check_out(out, cfg.resume)
        created = prepare_folder(out)
        stale = remove_stale_temps(out)
        if stale:
            log(f"removed {len(stale)} temporary file(s) that killed writes left in {out}")
    return out, created


def files_held(folder: Path) -> list[str]:
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
    held = ", ".join(files_held(out))
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


def checkpoint_epoch(path: Path):
    """The epoch a checkpoint or metrics.json records, or None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text()).get("epoch")
        import torch
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:  # noqa: BLE001 - a file that cannot be read holds no epoch
        return None


# ---------------------------------------------------------------- the files of one run
class RunFiles:
    """The files of one run in `out`, and which checkpoints are on disk: {'last.pt': (path, epoch), 'best.pt': ...}.

    A checkpoint is one dict (torchvision's references): best.pt holds the weights validated (the EMA ones with
    --ema), last.pt adds the optimizer, schedule, scaler, EMA, learned loss weights and the run's Progress.
    """

    def __init__(self, out: Path, resumed: dict | None = None):
        self.out = Path(out)
        self.saved = {"last.pt": (resumed["path"], resumed["epoch"])} if resumed is not None else {}

    def kept(self) -> str:
        """The checkpoints a stopped run leaves: 'runs/x/last.pt (epoch 3) and runs/x/best.pt (epoch 2)'."""
        return " and ".join(f"{path} (epoch {epoch})" for path, epoch in self.saved.values()) or "no checkpoint yet"

    def checkpoint(self, run, epoch, metrics, full: bool, *, calibration=None, validation=None) -> dict:
        """The checkpoint dict of a run (train.Run) at an epoch: best.pt's, or with full last.pt's; calibration: the
        record fitted on that epoch's validation (or None), validation: what it was fitted on
        (checkpoint.validation_record)."""
        weights = run.ema.module.state_dict() if (run.ema is not None and not full) else run.raw_model.state_dict()
        out = {"model": weights, "config": {**run.cfg.to_dict(), "resume": None}, "schema": run.schema.to_dict(),
               "preprocess": run.preprocess, "epoch": epoch, "metrics": metrics, "calibration": calibration,
               "validation": validation}
        if full:
            out.update(optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                       scaler=run.scaler.state_dict(), loss=run.loss_fn.state_dict(),
                       ema=run.ema.module.state_dict() if run.ema is not None else None,
                       train_state=run.progress.state_dict())
        return out

    def save(self, name: str, record: dict):
        """Write a checkpoint atomically (checkpoint.save) and note it as kept."""
        from mtl import checkpoint as ckpt_io
        ckpt_io.save(record, self.out / name)
        self.saved[name] = (self.out / name, record["epoch"])

    def write_metrics(self, metrics: dict):
        """metrics.json: the best epoch's metrics (with its epoch), or the summary of every fold."""
        atomic_write_text(json.dumps(metrics, indent=2), self.out / "metrics.json")

    def write_best_metrics(self, progress: Progress):
        """metrics.json of the best epoch: its metrics (f1_calibrated among them) and its calibration record."""
        self.write_metrics({**progress.best_metrics, "calibration": progress.best_calibration})

    def write_config(self, cfg: TrainConfig):
        atomic_write_text(dump(cfg), self.out / "config.yaml")

    def save_epoch(self, run, epoch: int, metrics: dict, improved: bool, *, calibration=None, validation=None):
        """last.pt, then (on a better F1) best.pt and metrics.json: last.pt commits the epoch and its record of the
        best, so a kill before it redoes the epoch and a kill after it leaves the other two for `reconcile`. Both
        checkpoints hold the epoch's calibration (a Calibration or None) and the validation it was fitted on."""
        record = calibration.to_dict() if calibration is not None else None
        extra = {"calibration": record, "validation": validation}
        self.save("last.pt", self.checkpoint(run, epoch, metrics, full=True, **extra))
        if improved:
            self.save("best.pt", self.checkpoint(run, epoch, metrics, full=False, **extra))
            self.write_best_metrics(run.progress)

    def reconcile(self, run, resume: dict, log=print):
        """After --resume: best.pt and metrics.json hold the best epoch last.pt records, whatever a kill interrupted.

        A kill can only leave these two behind last.pt at an improving epoch, whose weights last.pt holds: they are
        rewritten from it, with that epoch's calibration and validation, which last.pt holds too. Resuming into a new
        --out copies them from the resumed run's folder.
        """
        out, source, best_epoch = self.out, Path(resume["path"]).parent, run.progress.best_epoch
        if not best_epoch:
            return
        if checkpoint_epoch(out / "best.pt") != best_epoch:
            if best_epoch == resume["epoch"]:
                self.save("best.pt", self.checkpoint(run, best_epoch, resume["metrics"], full=False,
                                                     calibration=resume.get("calibration"),
                                                     validation=resume.get("validation")))
            elif source.resolve() != out.resolve() and checkpoint_epoch(source / "best.pt") == best_epoch:
                atomic_copy(source / "best.pt", out / "best.pt")
            else:
                raise ConfigError(f"{out / 'best.pt'} does not hold epoch {best_epoch}, the best epoch "
                                  f"{resume['path']} records, and that epoch's weights are gone; resume from a copy "
                                  f"of the run's folder as it was written")
            log(f"wrote {out / 'best.pt'}: epoch {best_epoch}, the best epoch {resume['path']} records")
        self.saved["best.pt"] = (out / "best.pt", best_epoch)
        if checkpoint_epoch(out / "metrics.json") != best_epoch:
            self.write_best_metrics(run.progress)

    def write_hparams(self, cfg: TrainConfig, progress):
        """The run's settings with its best metrics (Progress), for TensorBoard's HPARAMS tab, in hparams/.

        Every run logs the same columns and no experiment summary of its own: TensorBoard then builds the table from
        all runs under --logdir, marks the columns whose values differ between them and shows those first.
        """
        if not progress.best_metrics:
            return
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        folder = self.out / "hparams"
        shutil.rmtree(folder, ignore_errors=True)  # NOTE: a resumed run replaces the session its first part wrote
        metrics = {f"hparam/{k}": float(v) for k, v in progress.best_metrics.items() if k != "epoch"}
        metrics["hparam/best_epoch"] = float(progress.best_epoch)
        # NOTE: TensorBoard's own session summary keeps booleans boolean (torch's `hparams` makes them numbers);
        # trial_id "" names no session group, so each run is a row of its own; torch's gives the session's end
        start = hparams_pb(hparams_of(cfg), trial_id="")
        _, _, end = hparams({}, {})
        with SummaryWriter(str(folder)) as writer:
            writer.file_writer.add_summary(start)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, progress.step)
            writer.file_writer.add_summary(end)


# ---------------------------------------------------------------- --all-folds: one calibration, out of fold
def calibrate_folds(out: Path, cfg: TrainConfig, log=print) -> dict:
    """Fit one calibration on every fold's best-epoch validation predictions (out of fold: each person answered by the
    fold that did not train on them), write it into every fold's best.pt, and return the summary's entries: oof_f1
    and oof_f1_calibrated (the 18-class F1 of those predictions before and after) and the calibration record."""
    import numpy as np

    from mtl import calibration
    from mtl import checkpoint as ckpt_io
    paths = [out / f"fold{k}" / "best.pt" for k in range(cfg.folds)]
    parts = [ckpt_io.read_validation(ckpt_io.load(path)) for path in paths]
    missing = [str(path) for path, part in zip(paths, parts) if part is None]
    if missing:
        log(f"no out-of-fold calibration: {', '.join(missing)} hold(s) no validation probabilities (written before "
            f"calibration); each fold keeps its own")
        return {}
    probs = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    truth = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    groups = np.concatenate([p[2] for p in parts])
    fitted = calibration.fit(probs, truth, labels.LabelSchema(cfg.age_threshold), groups=groups, tasks=cfg.calibrate)
    record = fitted.to_dict()
    for path in paths:  # NOTE: each rewrite is atomic; a kill part-way is mended by resuming, which fits again
        saved = ckpt_io.load(path)
        saved.pop("path")
        saved["calibration"] = record
        ckpt_io.save(saved, path)
    log(f"out-of-fold calibration, written into every fold's best.pt: {calibration.summary(fitted)}")
    return {"oof_f1": fitted.f1_before, "oof_f1_calibrated": fitted.f1_after, "calibration": record}


def hparams_of(cfg: TrainConfig) -> dict:
    """A run's settings as HPARAMS columns (numbers, booleans, text); loss weights as three numbers."""
    columns = {}
    for key, value in cfg.to_dict().items():
        if key in HPARAMS_LEFT_OUT:
            continue
        if key == "loss_weights":
            columns.update({f"loss_weight_{task}": float(w) for task, w in zip(labels.TASKS, value)})
        elif key == "losses":
            columns.update({f"loss_{task}": value_text(key, spec) for task, spec in value.items()})
        elif value is None:
            columns[key] = "none"
        elif isinstance(value, (list, tuple, dict)):
            columns[key] = value_text(key, value)
        else:
            columns[key] = value
    return columns
