"""Checkpoints: one dict holding everything needed to resume training or to rebuild the model for inference.

Keys: format, model (plain state dict: no '_orig_mod.' or 'module.' prefixes), config (the
resolved TrainConfig), schema (the run's labels.LabelSchema.to_dict()), preprocess (the record
transforms.eval_transform rebuilds the input pipeline from), epoch (last finished, counting from
1), metrics (validation metrics of that epoch); last.pt adds optimizer, scheduler, scaler, ema,
loss (learned loss weights) and train_state (run_files.Progress: steps, the best epoch, early stopping).
`label_schema` reads the schema back (every version written so far): it is what inference uses; the
config's age_threshold is the setting that made it, kept so the run can be repeated.

Answers tuned for macro F1 (mtl.calibration): `calibration` is the record (Calibration.to_dict) of the offsets
fitted on that epoch's validation probabilities (with --all-folds best.pt's is the one fitted out of fold; a soup's
is refitted on its fold), or None (--calibrate none, or a checkpoint written before; `calibration_of` reads it);
`validation` holds those probabilities with the truth and person ids they were fitted on (`validation_record`,
`read_validation`), so --all-folds fits its out-of-fold calibration without another forward pass.
"""
from __future__ import annotations

from pathlib import Path

from mtl import labels
from mtl.errors import ConfigError
from mtl.io import atomic_torch_save

CHECKPOINT_FORMAT = 1


def save(checkpoint: dict, path) -> Path:
    """Write a checkpoint atomically (temp file + rename): a kill never leaves a broken one."""
    return atomic_torch_save({"format": CHECKPOINT_FORMAT, **checkpoint}, path)


def load(path) -> dict:
    """Read a checkpoint on the CPU, or raise a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: empty file (0 bytes), not a checkpoint")
    import torch  # NOTE: here, not at the top: reading a checkpoint's records (schema, config) needs no torch
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        text = str(exc).strip()
        why = text.splitlines()[0][:160] if text else type(exc).__name__
        raise ConfigError(f"{path}: not a readable checkpoint ({why})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise ConfigError(f"{path}: not a checkpoint written by train_multitask.py")
    checkpoint["path"] = str(path)
    if "schema" in checkpoint:
        label_schema(checkpoint)  # NOTE: a schema this code cannot read stops here, before any compute
    return checkpoint


def build_model(checkpoint: dict):
    """The model a checkpoint describes, with its weights loaded (no pretrained download)."""
    from mtl.model import clean_state_dict, model_from_config
    model = model_from_config(checkpoint["config"], pretrained=False)
    model.load_state_dict(clean_state_dict(checkpoint["model"]))
    return model


def label_schema(checkpoint: dict) -> labels.LabelSchema:
    """The LabelSchema a checkpoint was trained with, or a one-line ConfigError naming the file."""
    where = checkpoint.get("path", "checkpoint")
    if "schema" not in checkpoint:
        raise ConfigError(f"{where}: no label schema stored; it was not written by train_multitask.py")
    try:
        return labels.LabelSchema.from_dict(checkpoint["schema"])
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def calibration_of(checkpoint: dict):
    """The checkpoint's mtl.calibration.Calibration, None without one, or a one-line ConfigError naming the file."""
    record = checkpoint.get("calibration")
    if record is None:
        return None
    from mtl.calibration import Calibration, CalibrationError
    where = checkpoint.get("path", "checkpoint")
    try:
        calibration = Calibration.from_dict(record)
    except CalibrationError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    joint = checkpoint.get("config", {}).get("arch") == "joint18"
    if calibration.joint != joint:
        fitted, model = ("joint18", "per-task heads") if calibration.joint else ("per-task heads", "joint18")
        raise ConfigError(f"{where}: its calibration was fitted for a {fitted} model, but the model is {model}")
    return calibration


def validation_record(probs: dict, truth: dict, person_ids) -> dict:
    """An epoch's validation probabilities, truth (mask, gender, age_group, age_years) and person ids, as a checkpoint
    stores them (tensors and text: torch.load(weights_only=True) reads them)."""
    import numpy as np
    import torch
    return {"probs": {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in probs.items()},
            "truth": {k: torch.from_numpy(np.asarray(truth[k], dtype=np.int64))
                      for k in ("mask", "gender", "age_group", "age_years")},
            "person_id": [str(p) for p in person_ids]}


def read_validation(checkpoint: dict):
    """(probabilities, truth, person ids) as numpy arrays from a checkpoint's `validation`, or None without one."""
    import numpy as np
    record = checkpoint.get("validation")
    if not record:
        return None
    return ({k: v.numpy() for k, v in record["probs"].items()}, {k: v.numpy() for k, v in record["truth"].items()},
            np.asarray(record["person_id"], dtype=object))


def check_resumable(checkpoint: dict, cfg) -> None:
    """Raise if --resume points at a checkpoint of another architecture, trunk or head than the config's."""
    saved = checkpoint["config"]
    for key in ("arch", "model", "head"):
        if saved.get(key) != getattr(cfg, key):
            raise ConfigError(f"--resume {checkpoint['path']}: the checkpoint was trained with --{key} "
                              f"{saved.get(key)}, not {getattr(cfg, key)}")
    if (saved.get("age_reg_weight", 0) > 0) != (cfg.age_reg_weight > 0):
        raise ConfigError(f"--resume {checkpoint['path']}: the checkpoint was trained "
                          f"{'with' if saved.get('age_reg_weight', 0) > 0 else 'without'} --age-reg-weight")
    for key, before in (("freeze_blocks", 0), ("layer_decay", 1.0)):  # NOTE: they shape the model and optimizer
        if saved.get(key, before) != getattr(cfg, key):
            flag = f"--{key.replace('_', '-')}"
            raise ConfigError(f"--resume {checkpoint['path']}: the checkpoint was trained with {flag} "
                              f"{saved.get(key, before)}, not {getattr(cfg, key)}")
    if "optimizer" not in checkpoint:
        raise ConfigError(f"--resume {checkpoint['path']}: holds no optimizer state (resume from last.pt)")


def schema_for(cfg) -> dict:
    """The schema record of a config's runs (LabelSchema(cfg.age_threshold).to_dict())."""
    return labels.LabelSchema(cfg.age_threshold).to_dict()
