"""The deployable model and its exporters: what `python -m mtl.export` writes (ONNX, TorchScript) and checks.

`DeployModel` is the whole model for deployment: uint8 RGB photos (batch, H, W, 3) in, per-task probabilities
(calibrated by the checkpoint's offsets, mtl.calibration.CalibrationLayer, when it is given one) and the
18-class recombination of those out. EXPORTERS write a module to a file, RUNNERS run the written file back
(onnxruntime, torch.jit.load), and `check_file` fails unless the file computes what PyTorch computes;
`diagnose` names the part (a trunk or a head) that cannot be exported.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtl.calibration import CalibrationLayer
from mtl.errors import MTLError
from mtl.metrics import head_probs, recombine

INPUT_NAME = "image"
TOLERANCE = 1e-4
EXAMPLE_BATCH = 2         # the batch the model is traced with
CHECK_BATCHES = (1, 3)    # NOTE: neither is EXAMPLE_BATCH, so a batch size frozen into the graph fails the check
OUTPUTS = {"mask": "probabilities of wear, incorrect, not wear (batch, 3)",
           "gender": "probabilities of male, female (batch, 2)",
           "age": "probabilities of the three age groups (batch, 3)",
           "classes": "probabilities of the 18 classes, class = mask*6 + gender*3 + age = argmax (batch, 18); all "
                      "of them calibrated when the record's calibration is set",
           "age_years": "regressed age in years (batch,); only when the model was trained with --age-reg-weight"}


class ExportError(MTLError):
    """A model that cannot be exported, or whose export does not compute what PyTorch computes."""


class DeployModel(nn.Module):
    """The whole model for deployment: uint8 RGB photos (B, H, W, 3) in, per-task probabilities out, calibrated when
    given a calibration (as predict.py applies it: each head's, or the joint distribution's, then the 18 classes)."""

    def __init__(self, model: nn.Module, calibration=None):
        super().__init__()
        self.model = model
        self.calibrate = CalibrationLayer(calibration)

    def forward(self, image):
        probs = self.calibrate(head_probs(self.model(image.permute(0, 3, 1, 2))))
        out = {"mask": probs["mask"], "gender": probs["gender"], "age": probs["age"], "classes": recombine(probs)}
        if "age_reg" in probs:
            out["age_years"] = probs["age_reg"]
        return out


# ---------------------------------------------------------------- exporters and runners
@contextlib.contextmanager
def quiet():
    """Silence the exporters' progress lines, optimizer chatter and deprecation warnings (shown again on failure)."""
    logger = logging.getLogger("onnxscript")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def dynamic_batch(args) -> tuple:
    """torch.export dynamic shapes: dimension 0 (the batch) of every input is dynamic."""
    return tuple({0: torch.export.Dim.DYNAMIC} for _ in args)


def export_onnx(module, args, path, opset=None):
    """torch.onnx.export (the torch.export-based exporter) to one file, batch size dynamic, outputs named."""
    deploy = isinstance(module, DeployModel)
    if deploy:
        with torch.inference_mode():
            output_names = list(module(*args))
    with quiet():
        torch.onnx.export(module, tuple(args), str(path), dynamo=True, input_names=[INPUT_NAME] if deploy else None,
                          output_names=output_names if deploy else None, dynamic_shapes=dynamic_batch(args),
                          opset_version=opset, external_data=False, verbose=False)


def export_torchscript(module, args, path, opset=None):
    """torch.jit.trace (outputs as traced, dicts kept) and torch.jit.save."""
    with quiet():
        traced = torch.jit.trace(module, tuple(args), strict=False, check_trace=False)
        torch.jit.save(traced, str(path))


def run_onnx(path, args) -> dict:
    """The exported ONNX file run by onnxruntime on the CPU: {output name: array}, in the file's order."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def run_torchscript(path, args) -> dict:
    """The saved TorchScript file loaded with torch.jit.load and run: {output name: array}."""
    with quiet():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.inference_mode():
        return named(module(*args))


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}  # the --format choices (names.EXPORT_FORMATS)
RUNNERS = {"onnx": run_onnx, "torchscript": run_torchscript}


def named(out) -> dict:
    """A module's outputs (dict, tuple or tensor) as {name: numpy array}; unnamed ones are numbered."""
    if isinstance(out, torch.Tensor):
        out = [out]
    items = out.items() if isinstance(out, dict) else ((str(i), o) for i, o in enumerate(out))
    return {k: np.asarray(o.detach().cpu().numpy(), dtype=np.float32) for k, o in items}


# ---------------------------------------------------------------- the check
def sample_photos(width, height, batch, seed=0) -> torch.Tensor:
    """Reproducible sample photos: uint8 (batch, H, W, 3), smooth colour fields plus noise (not only flat noise)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, width).view(1, 1, width, 1) * torch.linspace(0, 1, height).view(1, height, 1, 1)
    colours = torch.rand(batch, 1, 1, 3, generator=g)
    photos = 255 * (0.6 * ramp * colours + 0.4 * torch.rand(batch, height, width, 3, generator=g))
    return photos.round().clamp(0, 255).to(torch.uint8)


def max_errors(got: dict, expected: dict, by_name=True) -> dict:
    """{output name: max abs difference (relative to the values' size for ages in years)}, matched by name or order."""
    if by_name and list(got) != list(expected):
        raise ExportError(f"the exported model's outputs are {', '.join(got)}, not {', '.join(expected)}")
    if len(got) != len(expected):
        raise ExportError(f"the exported model gives {len(got)} outputs, PyTorch {len(expected)}")
    errors = {}
    for name, a, b in zip(expected, got.values(), expected.values()):
        if a.shape != b.shape:
            errors[name] = float("inf")
            continue
        scale = max(1.0, float(np.abs(b).max())) if name == "age_years" else 1.0
        errors[name] = float(np.abs(a.astype(np.float64) - b).max()) / scale
    return errors


def check_file(fmt, path, module, inputs_by_batch, *, tolerance=TOLERANCE, by_name=True) -> dict:
    """Run the exported file at every check batch; ExportError unless every output matches PyTorch within tolerance."""
    worst = {}
    for args in inputs_by_batch:
        with torch.inference_mode():
            expected = named(module(*args))
        for name, error in max_errors(RUNNERS[fmt](path, args), expected, by_name).items():
            worst[name] = max(worst.get(name, 0.0), error)
    bad = {k: v for k, v in worst.items() if not v <= tolerance}
    if bad:
        raise ExportError("the exported model does not match PyTorch: " + ", ".join(
            f"output {k} differs by {v:.2g} (> {tolerance:g})" for k, v in bad.items()))
    return worst


def parts_of(model) -> dict:
    """{name: submodule} of the parts an export can fail in: each head, then each trunk (heads export in a blink)."""
    parts = {f"heads.{name}": head for name, head in model.heads.items()}
    parts.update({f"trunks.{i}": trunk for i, trunk in enumerate(model.trunks)})
    return parts


def diagnose(fmt, model, example, folder) -> str | None:
    """The first part (trunk or head) that fails to export or to match PyTorch at another batch size, described."""
    parts, seen = parts_of(model), {}
    hooks = [part.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args))
             for name, part in parts.items()]
    try:
        with torch.inference_mode():
            model(example.permute(0, 3, 1, 2))
    finally:
        for hook in hooks:
            hook.remove()
    Path(folder).mkdir(exist_ok=True)
    for name, part in parts.items():
        args = tuple(a.clone() for a in seen[name])
        wider = tuple(torch.cat([a, a[:1]]) for a in args)
        path = Path(folder) / f"part.{fmt}"
        try:
            EXPORTERS[fmt](part, args, path)
            check_file(fmt, path, part, [wider], by_name=False)
        except Exception as exc:  # noqa: BLE001 - any failure names the part
            return f"{name} ({type(part).__name__}): {first_line(exc)}"
    return None


def first_line(exc) -> str:
    """An exception's message in one line: the exporter's root cause when it gives one, colour codes removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    if "## Exception summary" in text:  # NOTE: torch.onnx's report: the first line of its summary is the cause
        cause = [line.strip() for line in text.split("## Exception summary", 1)[1].splitlines() if line.strip()]
        text = re.sub(r"^<class '[\w.]+'>: ", "", cause[0]) if cause else text
    elif text.startswith("The following operation failed in the TorchScript interpreter"):
        text = text.splitlines()[-1].strip()  # NOTE: a TorchScript traceback ends with the error itself
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
