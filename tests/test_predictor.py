"""mtl.Predictor: the README example and the docstring run; raw photos cropped at prediction time get the answers
of the crop_faces route, through --images and --data alike; --refuse-uncropped keeps the old refusal."""
import contextlib
import doctest
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data_tools import crop_faces
from mtl import face_crop, predict
from mtl.errors import ConfigError
from mtl.predictor import Predictor
from tests.helpers import ROOT, SHARED, run_command

UTKFACE = SHARED / "data" / "utkface-dev"
CROP = face_crop.crop_settings(0.2, (60, 80))  # NOTE: cut at 60x80, then resized to the model's 48x64 load size


@contextlib.contextmanager
def working_dir(path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def best(trained_run):
    return Path(trained_run["out"]) / "best.pt"


@pytest.fixture
def demo(best, synthetic_data, tmp_path):
    """A folder laid out as after the README's quick start: runs/demo/best.pt, demo_data/eval/images, photo.jpg."""
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    shutil.copy(best, tmp_path / "runs" / "demo" / "best.pt")
    images = tmp_path / "demo_data" / "eval" / "images"
    images.mkdir(parents=True)
    for photo in sorted((synthetic_data / "eval" / "images").iterdir())[:4]:
        shutil.copy(photo, images / photo.name)
    shutil.copy(photo, tmp_path / "photo.jpg")
    with working_dir(tmp_path):
        yield tmp_path


def test_the_readme_example_runs(demo):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) == 5, code
    printed = io.StringIO()
    namespace = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the documented example, as a user runs it
    table = namespace["table"]
    assert len(table) == 4 and set(table["mask"]) <= {"wear", "incorrect", "not wear"}
    first = namespace["answers"][0]
    assert printed.getvalue().split()[:2] == [first["path"], first["mask"].split()[0]]


def test_the_docstring_example_runs(demo):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = doctest.DocTestFinder().find(Predictor, "Predictor", globs={})
    assert tests and tests[0].examples
    for test in tests:
        runner.run(test, out=lambda text: print(text, end=""))
    assert runner.failures == 0 and runner.tries >= 5


def test_the_predictor_applies_each_checkpoints_calibration_unless_told_not_to(best, synthetic_data, tmp_path):
    from tests.tiny_checkpoints import with_calibration
    aged = with_calibration(best, tmp_path / "aged.pt")
    photos = sorted(str(p) for p in (synthetic_data / "eval" / "images").iterdir())[:40]
    plain = Predictor(best).predict_frame(photos)
    raw = Predictor(aged, calibration=False).predict_frame(photos)
    calibrated = Predictor(aged).prediction(photos)
    assert (plain["age"] != "60+").mean() > 0.5  # the trained model calls most people younger than 60
    assert raw.equals(plain)  # calibration=False: the network's own answers
    assert calibrated.calibrated and (Predictor(aged).answers(calibrated)["age"] == "60+").all()
    assert np.array_equal(calibrated.raw_probs[0]["age"], raw[["p_age_<30", "p_age_30-59", "p_age_60+"]].to_numpy(
        np.float32))


# ---------------------------------------------------------------- face crop at prediction time
@pytest.fixture(scope="module")
def raw_photos(tmp_path_factory):
    """An eval-only data set of uncropped PNG photos: real faces pasted on backgrounds (when at hand), one blank."""
    root = tmp_path_factory.mktemp("raw") / "data"
    (root / "eval" / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    faces = sorted(UTKFACE.glob("*.jpg"))[::900][:4] if UTKFACE.is_dir() else []
    ids = []
    for k in range(5):
        canvas = Image.fromarray(rng.integers(40, 200, (1, 1, 3), dtype=np.uint8).repeat(200, 0).repeat(160, 1))
        if k < len(faces):
            with Image.open(faces[k]) as face:
                canvas.paste(face.convert("RGB").resize((90, 90)), (20 + 8 * k, 30 + 10 * k))
        else:  # NOTE: without real faces at hand, synthetic noise: MTCNN finds nothing and every photo falls back
            canvas = Image.fromarray(rng.integers(0, 255, (200, 160, 3), dtype=np.uint8)) if k < 4 else canvas
        ids.append(f"raw{k}.png")
        canvas.save(root / "eval" / "images" / ids[-1])
    pd.DataFrame({"ImageID": ids, "ans": 0}).to_csv(root / "eval" / "info.csv", index=False)
    return root


@pytest.fixture(scope="module")
def crop_checkpoint(best, tmp_path_factory):
    """best.pt as if it had been trained on crop_faces output made with CROP."""
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    ckpt["preprocess"]["face_crop"] = CROP
    path = tmp_path_factory.mktemp("cropped") / "cropped.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def crop_faces_route(raw_photos, tmp_path_factory):
    """raw_photos through data_tools.crop_faces with CROP: (the cropped data folder, {photo: whether it fell back})."""
    cropped = tmp_path_factory.mktemp("route") / "cropped"
    crop_faces.crop_dataset(raw_photos, cropped, margin=CROP["margin"], size=CROP["size"], device="cpu",
                            progress=False, workers=1, log=lambda *_: None)
    boxes = pd.read_csv(cropped / crop_faces.BOXES_FILE)
    return cropped, dict(zip(boxes["path"].map(lambda p: Path(p).name), boxes["fallback"].astype(bool)))


@pytest.mark.skipif(not UTKFACE.is_dir(), reason=f"needs the shared UTKFace photos in {UTKFACE}")
def test_real_faces_on_raw_photos_are_found(crop_faces_route):
    fell_back = crop_faces_route[1]
    assert sum(not v for v in fell_back.values()) >= 3, fell_back


def test_raw_photos_cropped_at_prediction_equal_the_crop_faces_route(raw_photos, crop_checkpoint, crop_faces_route,
                                                                     cache_dir, tmp_path):
    cropped, fell_back = crop_faces_route
    assert fell_back["raw4.png"]  # the blank one falls back

    route = run_command(predict, "--checkpoint", crop_checkpoint, "--data", cropped, "--out", tmp_path / "a.csv",
                        cache_dir=cache_dir)
    built_in = run_command(predict, "--checkpoint", crop_checkpoint, "--data", raw_photos, "--out",
                           tmp_path / "b.csv", cache_dir=cache_dir)
    images = run_command(predict, "--checkpoint", crop_checkpoint, "--images", raw_photos / "eval" / "images",
                         "--out", tmp_path / "c.csv", cache_dir=cache_dir)
    assert "cropping" in built_in["log"]
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    for task in ("mask", "gender", "age", "age_reg"):
        assert np.array_equal(route["member_probs"][0][task], built_in["member_probs"][0][task]), task
    table = pd.read_csv(tmp_path / "c.csv")
    assert table["path"].tolist() == images["image_ids"]
    order = [route["image_ids"].index(Path(p).name) for p in table["path"]]
    assert np.array_equal(table["class"].to_numpy(), route["ensemble"].pred[order])
    assert np.abs(table["p_mask_wear"].to_numpy() - route["ensemble"].probs["mask"][order, 0]).max() < 2e-6
    assert table["face_found"].tolist() == [not fell_back[Path(p).name] for p in table["path"]]
    # the API on pixels already in memory crops them the same way
    pixels = [np.asarray(Image.open(p)) for p in table["path"]]
    again = Predictor(crop_checkpoint, device="cpu").predict(pixels)
    assert [a["class"] for a in again] == table["class"].tolist()
    assert [a["face_found"] for a in again] == table["face_found"].tolist()


def test_a_broken_raw_photo_is_named_before_any_crop_or_model(raw_photos, crop_checkpoint, tmp_path, monkeypatch):
    from mtl.errors import DataError
    monkeypatch.setattr(face_crop, "FaceDetector", None)  # NOTE: nothing may be cropped, or detected, here
    monkeypatch.setattr("mtl.members.predict_members", None)  # nor any model run
    data = shutil.copytree(raw_photos, tmp_path / "data")
    (data / "eval" / "images" / "raw1.png").write_bytes(b"not a photo")
    with pytest.raises(DataError, match="raw1.png: unreadable image"):
        run_command(predict, "--checkpoint", crop_checkpoint, "--data", data, "--out", tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()


def test_refuse_uncropped_keeps_the_old_check(raw_photos, crop_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(face_crop, "FaceDetector", None)  # NOTE: nothing may be cropped, or detected, here
    with pytest.raises(ConfigError, match="holds uncropped photos.*crop_faces"):
        run_command(predict, "--checkpoint", crop_checkpoint, "--data", raw_photos, "--refuse-uncropped", "--out",
                    tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()


def test_a_crop_this_version_cannot_reproduce_is_refused(best, raw_photos, tmp_path):
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    ckpt["preprocess"]["face_crop"] = {**CROP, "detector": "retinaface"}
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"cannot reproduce \(detector differ"):
        Predictor(tmp_path / "other.pt", device="cpu")
    with pytest.raises(ConfigError, match="cannot reproduce"):
        run_command(predict, "--checkpoint", tmp_path / "other.pt", "--data", raw_photos, "--out", tmp_path / "s.csv")
    assert json.loads(json.dumps(face_crop.check_settings(CROP, "x"))) == CROP
