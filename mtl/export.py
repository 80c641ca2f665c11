"""Export a checkpoint as one deployable model file, ONNX or TorchScript, with a JSON of everything it needs.

    python -m mtl.export --checkpoint runs/NAME/best.pt --format onnx --out model.onnx
    python -m mtl.export --checkpoint runs/NAME/best.pt --format torchscript --out model.ts

The exported model is the whole model: its input is a batch of photos as uint8 RGB pixels in NHWC
layout, `image` of shape (batch, H, W, 3) at the size the checkpoint was trained with (any batch
size), so a deployment only resizes its photos and stacks them; the trunk's normalization is inside.
Its outputs are probabilities: `mask` (batch, 3), `gender` (batch, 2), `age` (batch, 3),
`classes` (batch, 18: the 18-class recombination, class = argmax) and `age_years` (batch,) when the
model regresses age. The checkpoint's calibration (offsets fitted after training for macro F1) is inside:
the probabilities are calibrated as predict.py calibrates them, and `classes` recombines those;
--no-calibration exports the raw heads. Beside it, `model.json` (the model's name with .json) holds
`labels` (each task's class names, the age groups named at the checkpoint's threshold, and the 18 class
names), `age_threshold`, `input_size` ([width, height]), `face_crop` (the crop_faces settings the model
was trained on, or null), `calibration` (the record applied inside, or null), the rest of the
preprocessing and the input and output layout.

The command checks its own output before it keeps it: it runs the exported file (onnxruntime for
ONNX, torch.jit.load for TorchScript) on sample photos at two batch sizes, neither the one it was
traced with, and fails unless every output matches PyTorch within 1e-4 (the regressed age within
1e-4 of its size in years). A part that cannot be exported (a trunk or a head) is named in the error;
nothing is written then. Both files are written atomically. TorchScript is deprecated by PyTorch
2.14 (torch.jit.trace warns so); ONNX is the format to deploy.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtl.cli import ArgumentParser, add_calibration_flag
from mtl.errors import ConfigError
from mtl.names import EXPORT_FORMATS


# ---------------------------------------------------------------- the record beside the model
def record_for(member, fmt, model_file, outputs, calibration=None) -> dict:
    """model.json: labels, age_threshold, input_size [W, H], face_crop, calibration (the Calibration inside, or None),
    preprocessing, input and output layout."""
    from mtl.deploy import INPUT_NAME, OUTPUTS
    schema = member.schema
    names = schema.class_names
    preprocess = member.preprocess
    width, height = (int(v) for v in preprocess["img_size"])
    return {"format": fmt, "model_file": Path(model_file).name,
            "labels": {**{t: list(n) for t, n in names.items()}, "classes": list(schema.joint_names)},
            "age_threshold": schema.age_threshold, "input_size": [width, height],
            "face_crop": preprocess.get("face_crop"),
            "calibration": calibration.to_dict() if calibration is not None else None,
            "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                      "shape": ["batch", height, width, 3],
                      "normalization": "inside the model (mean and std below, applied to pixels / 255)"},
            "preprocess": {"load_size": preprocess["load_size"], "center_crop": preprocess.get("center_crop"),
                           "resize": "decode (EXIF rotation applied), resize to load_size (area when shrinking, "
                                     "linear when enlarging), center_crop when set, resize to input_size (area)",
                           "mean": preprocess["mean"], "std": preprocess["std"]},
            "outputs": {name: OUTPUTS[name] for name in outputs},
            "class_formula": "class = mask * 6 + gender * 3 + age",
            "checkpoint": {"path": member.path, "arch": member.config.get("arch"),
                           "model": member.config.get("model"), "head": member.config.get("head"),
                           "epoch": member.checkpoint.get("epoch"), "metrics": member.checkpoint.get("metrics")}}


def json_path(out) -> Path:
    """model.onnx -> model.json (the record's place)."""
    return Path(out).with_suffix(".json")


# ---------------------------------------------------------------- the command
def export_checkpoint(checkpoint, fmt="onnx", out="model.onnx", *, opset=None, tolerance=None, calibration=True,
                      log=print) -> dict:
    """Export, check and write a checkpoint (a path, a loaded dict or a members.Member) and its JSON record; returns the
    record. calibration: apply the checkpoint's calibration inside the model (false: the raw heads)."""
    import torch

    from mtl.deploy import (
        CHECK_BATCHES,
        EXAMPLE_BATCH,
        EXPORTERS,
        TOLERANCE,
        DeployModel,
        ExportError,
        check_file,
        diagnose,
        first_line,
        sample_photos,
    )
    from mtl.io import atomic_path, atomic_write_text
    from mtl.members import as_members
    from mtl.outputs import check_output
    tolerance = TOLERANCE if tolerance is None else tolerance
    if fmt not in EXPORTERS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out = check_output(out)
    record_file = json_path(out)
    if record_file == out:
        raise ConfigError(f"--out {out}: give the model file a name not ending in .json (the record goes there)")
    member = as_members([checkpoint])[0]
    model = member.build_model().eval()
    applied = member.calibration if calibration else None
    module = DeployModel(model, applied).eval().requires_grad_(False)  # NOTE: a deployment's outputs need no .detach()
    width, height = (int(v) for v in member.preprocess["img_size"])
    example = sample_photos(width, height, EXAMPLE_BATCH)
    with torch.inference_mode():
        names = list(module(example))
    checks = [(sample_photos(width, height, n, seed=1 + n),) for n in CHECK_BATCHES]
    with atomic_path(out) as tmp:
        try:
            EXPORTERS[fmt](module, (example,), tmp, opset)
            worst = check_file(fmt, tmp, module, checks, tolerance=tolerance)
        except Exception as exc:  # noqa: BLE001 - name the part that fails, or say what failed
            part = diagnose(fmt, model, example, tmp.parent / f".{tmp.name}.parts")
            where = f"{part}" if part else first_line(exc)
            raise ExportError(f"cannot export {member.path} to {fmt}: {where}") from None
        finally:
            cleanup(tmp.parent / f".{tmp.name}.parts")
        record = record_for(member, fmt, out, names, applied)
        record["check"] = {"batches": list(CHECK_BATCHES), "tolerance": tolerance,
                           "max_error": {k: float(f"{v:.3g}") for k, v in worst.items()}}
        atomic_write_text(json.dumps(record, indent=2), record_file)
    state = "calibrated" if applied is not None else "no calibration" if calibration else "calibration off"
    log(f"wrote {out} ({fmt}, input uint8 (batch, {height}, {width}, 3) RGB, outputs {', '.join(names)}, {state}) "
        f"and {record_file}; checked against PyTorch at batch sizes {', '.join(map(str, CHECK_BATCHES))}: largest "
        f"difference {max(worst.values()):.2g}")
    return record


def cleanup(folder: Path):
    import shutil
    shutil.rmtree(folder, ignore_errors=True)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m mtl.export", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint to export (e.g. runs/NAME/best.pt)")
    parser.add_argument("--format", default="onnx", choices=EXPORT_FORMATS, help="onnx (default) or torchscript")
    parser.add_argument("--out", required=True, help="model file to write; the JSON record goes beside it (.json)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    add_calibration_flag(parser)
    return parser


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    return export_checkpoint(args.checkpoint, args.format, args.out, opset=args.opset, calibration=args.calibration)


if __name__ == "__main__":
    from mtl.cli import main_guard
    main_guard(main)
