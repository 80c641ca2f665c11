"""mtl.export: ONNX (run by onnxruntime) and TorchScript files compute what PyTorch computes for every architecture
and head at any batch size; the JSON beside them is all a deployment needs; failures name the part, write nothing."""
import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from mtl import deploy, export, labels, model, names
from mtl.calibration import Calibration
from mtl.cli import main_guard
from mtl.predictor import Predictor
from tests.helpers import ROOT
from tests.tiny_checkpoints import untrained_checkpoint

# constructed calibrations (offsets that change answers of an untrained model), for the 18 joint classes and the heads
JOINT_OFFSETS = Calibration({"joint": tuple(np.linspace(-1.0, 1.0, 18))}, 0.5, 0.6, 300).to_dict()
HEAD_OFFSETS = Calibration({"mask": (0.0, 0.3, -0.2), "gender": (0.0, 0.2), "age": (0.0, -0.3, 0.4)}, 0.5, 0.6,
                           300).to_dict()
# every architecture and every head: linear, ML-decoder, ArcFace's cosine head (from an arcface loss); calibrated
CASES = {"multihead-linear-trained": None,
         "joint18-ml_decoder": {"arch": "joint18", "head": "ml_decoder", "calibration": JOINT_OFFSETS},
         "separate-arcface": {"arch": "separate", "age_reg_weight": 0.1, "calibration": HEAD_OFFSETS,
                              "losses": {"mask": {"name": "arcface", "scale": 16.0}, "age": {"name": "arcface"}}}}


@pytest.fixture(scope="module")
def checkpoints(trained_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export_ckpts")
    return {name: Path(trained_run["out"]) / "best.pt" if spec is None else
            untrained_checkpoint(folder / f"{name}.pt", **spec) for name, spec in CASES.items()}


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """Every case exported in both formats: {(case, format): (model file, record)}."""
    folder = tmp_path_factory.mktemp("exported")
    out = {}
    for name, ckpt in checkpoints.items():
        for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".ts")):
            path = folder / f"{name}-{fmt}{suffix}"
            out[name, fmt] = path, export.export_checkpoint(ckpt, fmt, path, log=lambda *_: None)
    return out


def reference(ckpt, photos, calibration=True) -> dict:
    """PyTorch's outputs for uint8 NHWC photos: the checkpoint's model, probabilities as predict.py makes them (with
    the checkpoint's own calibration unless calibration is false)."""
    from mtl import checkpoint
    saved = checkpoint.load(ckpt)
    module = deploy.DeployModel(checkpoint.build_model(saved).eval(),
                                checkpoint.calibration_of(saved) if calibration else None)
    with torch.inference_mode():
        return {k: v.numpy() for k, v in module(torch.from_numpy(photos)).items()}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", names.EXPORT_FORMATS)
def test_exported_model_matches_pytorch_at_any_batch_size(exported, checkpoints, case, fmt):
    path, record = exported[case, fmt]
    width, height = record["input_size"]
    photos = deploy.sample_photos(width, height, 5, seed=11).numpy()
    expected = reference(checkpoints[case], photos)
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        assert session.get_inputs()[0].type == "tensor(uint8)"
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": photos})))
        got4 = session.run(["classes"], {"image": photos[:4]})[0]
    else:
        module = torch.jit.load(str(path))
        got = {k: v.numpy() for k, v in module(torch.from_numpy(photos)).items()}
        got4 = module(torch.from_numpy(photos[:4]))["classes"].numpy()
    assert list(got) == list(expected) == list(record["outputs"])
    for name in expected:
        assert got[name].shape == expected[name].shape, name
        assert np.abs(got[name] - expected[name]).max() <= 1e-4 * (40 if name == "age_years" else 1), name
    assert np.abs(got4 - expected["classes"][:4]).max() <= 1e-4
    assert np.allclose(expected["classes"].sum(1), 1, atol=1e-5)
    has_age = CASES[case] is None or CASES[case].get("age_reg_weight", 0) > 0  # the trained run regresses age
    assert ("age_years" in got) == has_age


@pytest.mark.parametrize("case", ["joint18-ml_decoder", "separate-arcface"])
@pytest.mark.parametrize("fmt", names.EXPORT_FORMATS)
def test_the_exported_model_applies_the_checkpoints_calibration(exported, checkpoints, case, fmt):
    path, record = exported[case, fmt]
    assert json.loads(path.with_suffix(".json").read_text())["calibration"] == CASES[case]["calibration"]
    width, height = record["input_size"]
    photos = deploy.sample_photos(width, height, 64, seed=5).numpy()
    got = deploy.RUNNERS[fmt](path, (torch.from_numpy(photos),))
    calibrated, raw = reference(checkpoints[case], photos), reference(checkpoints[case], photos, calibration=False)
    for name in calibrated:  # the file computes the calibrated probabilities of PyTorch, not the raw ones
        assert np.abs(got[name] - calibrated[name]).max() <= 1e-4, name
    answers, raw_answers = got["classes"].argmax(1), raw["classes"].argmax(1)
    assert np.array_equal(answers, calibrated["classes"].argmax(1)) and (answers != raw_answers).any()


@pytest.mark.slow
def test_no_calibration_exports_the_raw_heads(checkpoints, tmp_path):
    out = tmp_path / "raw.onnx"
    export.main(["--checkpoint", str(checkpoints["separate-arcface"]), "--out", str(out), "--no-calibration"])
    assert json.loads(out.with_suffix(".json").read_text())["calibration"] is None
    photos = deploy.sample_photos(40, 52, 8, seed=3).numpy()
    got = deploy.RUNNERS["onnx"](out, (torch.from_numpy(photos),))
    raw = reference(checkpoints["separate-arcface"], photos, calibration=False)
    assert all(np.abs(got[name] - raw[name]).max() <= 1e-4 for name in raw)


def test_record_is_all_a_deployment_needs(exported, checkpoints, synthetic_data, tmp_path):
    """Only onnxruntime, OpenCV and the JSON: the answers and probabilities Predictor gives for the same photos."""
    path, record = exported["multihead-linear-trained", "onnx"]
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert {"labels", "age_threshold", "input_size", "face_crop"} <= set(saved)
    assert saved["age_threshold"] == 60 and saved["labels"]["age"] == ["<30", "30-59", "60+"]
    assert saved["input_size"] == [48, 64] and saved["face_crop"] is None and saved["input"]["layout"] == "NHWC"
    assert saved["labels"]["classes"][7] == labels.LabelSchema().class_name(7)
    photos = []
    for k, jpeg in enumerate(sorted((synthetic_data / "eval" / "images").iterdir())[:6]):
        photos.append(tmp_path / f"{k}.png")  # NOTE: PNG, so both sides decode the very same pixels
        Image.open(jpeg).save(photos[-1])
    width, height = saved["input_size"]
    batch = np.stack([cv2.resize(np.asarray(Image.open(p).convert("RGB")), (width, height),
                                 interpolation=cv2.INTER_AREA) for p in photos])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": batch})))
    answers = Predictor(checkpoints["multihead-linear-trained"], device="cpu").predict(photos)
    assert [saved["labels"]["classes"][k] for k in outputs["classes"].argmax(1)] == [
        f"{a['mask']}/{a['gender']}/{a['age']}" for a in answers]
    for task in ("mask", "gender", "age"):
        for j, name in enumerate(saved["labels"][task]):
            column = f"p_{task}_{name.replace(' ', '_')}"
            assert np.abs(outputs[task][:, j] - [a[column] for a in answers]).max() < 1e-4, column
    assert np.abs(outputs["age_years"] - [a["age_years"] for a in answers]).max() < 1e-3


def test_the_readme_deployment_example_runs(exported, synthetic_data, tmp_path):
    path, _ = exported["multihead-linear-trained", "onnx"]
    shutil.copy(path, tmp_path / "model.onnx")
    shutil.copy(path.with_suffix(".json"), tmp_path / "model.json")
    shutil.copy(sorted((synthetic_data / "eval" / "images").iterdir())[0], tmp_path / "me.jpg")
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme[readme.index("## Export"):], re.S).group(1)
    printed, before = io.StringIO(), os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the documented example
    finally:
        os.chdir(before)
    assert printed.getvalue().strip() in [labels.LabelSchema().class_name(c) for c in range(labels.NUM_JOINT)]


class UnexportableHead(model.LinearHead):
    """A head no exporter takes: an SVD (no ONNX operator) and the batch size as a Python int (a tracer's constant)."""

    def forward(self, feature_map, pooled):
        out = self.fc(self.drop(pooled))
        out = out + 0 * torch.linalg.svdvals(out.T @ out).sum()
        return out.reshape(int(pooled.shape[0]), -1)


@pytest.mark.parametrize("fmt", names.EXPORT_FORMATS)
@pytest.mark.slow
def test_a_part_that_cannot_be_exported_is_named_and_nothing_is_written(tmp_path, monkeypatch, capsys, fmt):
    monkeypatch.setitem(model.HEADS, "unexportable", UnexportableHead)
    ckpt = untrained_checkpoint(tmp_path / "fixed.pt")  # NOTE: the same weights as a linear head: only the name differs
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["config"]["head"] = "unexportable"
    torch.save(saved, ckpt)
    out = tmp_path / "model.out"
    out.write_bytes(b"the model exported before")
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: export.main(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(out)]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert f"cannot export {ckpt} to {fmt}: heads.mask (UnexportableHead)" in err
    why = ("No ONNX function found", "_linalg_svd") if fmt == "onnx" else ("is invalid for input",)
    assert all(text in err for text in why), err
    assert out.read_bytes() == b"the model exported before"  # the old file is kept whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.pt", "model.out"]


def test_bad_arguments_exit_2_before_any_export(tmp_path, capsys):
    ckpt = untrained_checkpoint(tmp_path / "a.pt")
    for argv, message in ((["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.onnx")],
                           "checkpoint not found"),
                          (["--checkpoint", str(ckpt), "--out", str(tmp_path / "m.json")], "not ending in .json"),
                          (["--checkpoint", str(ckpt), "--out", str(tmp_path / "no" / "m.onnx")], "does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            main_guard(lambda argv=argv: export.main(argv))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
