"""data_tools.crop_faces: a face at a known place is cropped there, a blank photo falls back, reruns resume."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_tools import crop_faces
from data_tools.make_synthetic import make_synthetic
from mtl import data
from mtl.errors import DataError
from tests.helpers import SHARED

UTKFACE = SHARED / "data" / "utkface-dev"
FACE_AT = (48, 64, 144, 160)  # where the real face is pasted: x1, y1, x2, y2 on a 192x256 canvas
OUT_SIZE = ["60", "80"]


def person_photo(root, k, stem):
    folder = root / "train" / "images" / pd.read_csv(root / "train" / "train.csv", dtype=str)["path"][k]
    return next(p for p in folder.iterdir() if p.stem == stem)


def save_like(image: Image.Image, path: Path):
    image.save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=95)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """21 synthetic photos; person 1's mask1 is blank, person 0's normal a real face at FACE_AT (when at hand)."""
    root = make_synthetic(tmp_path_factory.mktemp("crop") / "data", people=2, seed=5, eval_people=1,
                          size=(96, 128), progress=False)
    save_like(Image.new("RGB", (96, 128), (128, 128, 128)), person_photo(root, 1, "mask1"))
    faces = sorted(UTKFACE.glob("*.jpg")) if UTKFACE.is_dir() else []
    if faces:
        canvas = Image.new("RGB", (192, 256), (70, 120, 170))
        with Image.open(faces[len(faces) // 2]) as face:
            canvas.paste(face.convert("RGB").resize((FACE_AT[2] - FACE_AT[0],) * 2), FACE_AT[:2])
        save_like(canvas, person_photo(root, 0, "normal"))
    return root


@pytest.fixture(scope="module")
def cropped(tiny_data, tmp_path_factory):
    """The tiny data set cropped once with the real MTCNN: (OUT, printed output)."""
    out = tmp_path_factory.mktemp("crop") / "out"
    lines = []
    crop_faces.crop_dataset(tiny_data, out, margin=0.2, size=(60, 80), device="cpu", batch_size=8, progress=False,
                            workers=2, log=lines.append)
    return out, "\n".join(lines)


def boxes(out) -> dict:
    with open(out / crop_faces.BOXES_FILE, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


class FixedDetector:
    """A stand-in detector: the same face box everywhere, counting photos; raises Ctrl-C on call `stop_at`."""

    device = "test"

    def __init__(self, stop_at=None):
        self.seen, self.calls, self.stop_at = 0, 0, stop_at

    def detect(self, images):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.seen += len(images)
        return [((20.0, 30.0, 60.0, 80.0), 0.99)] * len(images)


def test_face_at_known_place_is_found_there(tiny_data, cropped):
    if not UTKFACE.is_dir():
        pytest.skip(f"real faces not at hand ({UTKFACE})")
    out, _ = cropped
    row = boxes(out)[str(person_photo(tiny_data, 0, "normal").relative_to(tiny_data))]
    box = np.array([float(row[k]) for k in ("x1", "y1", "x2", "y2")])
    side = FACE_AT[2] - FACE_AT[0]
    assert row["fallback"] == "0" and float(row["prob"]) > 0.9
    centre, truth = (box[:2] + box[2:]) / 2, (np.array(FACE_AT[:2]) + np.array(FACE_AT[2:])) / 2
    assert np.abs(centre - truth).max() < 0.15 * side
    assert 0.5 * side < box[2] - box[0] < 1.1 * side
    assert (box[:2] >= np.array(FACE_AT[:2]) - 0.1 * side).all()
    assert (box[2:] <= np.array(FACE_AT[2:]) + 0.1 * side).all()


def test_blank_photo_falls_back_and_is_counted(tiny_data, cropped):
    out, printed = cropped
    blank = str(person_photo(tiny_data, 1, "mask1").relative_to(tiny_data))
    rows = boxes(out)
    assert rows[blank]["fallback"] == "1"
    run = json.loads((out / crop_faces.RUN_FILE).read_text())
    fallbacks = sum(r["fallback"] == "1" for r in rows.values())
    assert run["counts"]["fallback"] == fallbacks >= 1 and blank in run["fallbacks"]
    assert run["counts"]["photos"] == len(rows) == 21
    assert f"{fallbacks} fell back" in printed


def test_output_has_the_input_layout_and_records_the_settings(tiny_data, cropped):
    out, _ = cropped
    samples, problems = data.train_samples(out)
    assert problems == [] and len(samples) == 14
    _, eval_table = data.eval_samples(out)
    assert len(eval_table) == 7
    for path in list(samples["image_path"]) + list(eval_table["image_path"]):
        with Image.open(path) as im:
            assert im.size == (60, 80)
    assert (out / "eval_truth.csv").read_bytes() == (tiny_data / "eval_truth.csv").read_bytes()
    record = data.read_face_crop_record(out)
    assert record["detector"] == "mtcnn" and record["margin"] == 0.2 and record["size"] == [60, 80]
    assert record["fallback"] == "center" and record["facenet_pytorch"] == "2.5.3"
    assert record == crop_faces.crop_settings(0.2, (60, 80), crop_faces.DEFAULT_MIN_FACE)  # the settings alone
    assert not list(out.rglob("*.tmp"))


def test_rerun_skips_done_photos(tiny_data, cropped, tmp_path):
    out = shutil.copytree(cropped[0], tmp_path / "out")
    redo = person_photo(out, 0, "mask2")
    redo.unlink()
    detector = FixedDetector()
    crop_faces.crop_dataset(tiny_data, out, margin=0.2, size=(60, 80), progress=False, detector=detector,
                            log=lambda *_: None)
    assert detector.seen == 1 and redo.is_file()
    assert boxes(out)[str(redo.relative_to(out))]["x1"] == "20.0"


def test_interrupted_run_resumes_where_it_stopped(tiny_data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        crop_faces.crop_dataset(tiny_data, out, batch_size=2, progress=False, detector=FixedDetector(stop_at=2),
                                log=lambda *_: None)
    assert len(boxes(out)) == 8  # NOTE: one chunk of 4 batches was written before Ctrl-C
    assert not list(out.rglob("*.tmp")) and not (out / "train" / "train.csv").exists()
    assert json.loads((out / crop_faces.RUN_FILE).read_text())["complete"] is False
    assert data.read_face_crop_record(out) is None  # written last, once every photo is done
    detector = FixedDetector()
    record = crop_faces.crop_dataset(tiny_data, out, batch_size=2, progress=False, detector=detector,
                                     log=lambda *_: None)
    assert detector.seen == 21 - 8 and record["complete"] and record["counts"]["photos"] == 21
    assert data.train_samples(out)[1] == []


def test_geometry_margin_aspect_shift_and_padding():
    region = crop_faces.crop_region((100, 100, 200, 200), (400, 400), 0.25, (30, 40))
    assert region == pytest.approx((75, 50, 225, 250))  # 150 wide, then 200 high for 3:4
    region = crop_faces.crop_region((0, 0, 100, 100), (400, 400), 0.25, (30, 40))
    assert region[:2] == (0, 0)  # moved inside the photo, not padded
    pixels = np.full((100, 100, 3), 255, np.uint8)
    crop = crop_faces.cut(pixels, crop_faces.crop_region((0, 0, 100, 100), (100, 100), 0.5, (20, 20)), (20, 20))
    assert crop.shape == (20, 20, 3) and crop[10, 10].tolist() == [255] * 3 and crop[0, 0].tolist() == [0] * 3
    assert crop_faces.fallback_face((200, 400)) == pytest.approx((55, 135, 145, 225))


def test_unreadable_photo_stops_before_any_work_unless_skip_bad(tiny_data, tmp_path):
    root = shutil.copytree(tiny_data, tmp_path / "data")
    bad = person_photo(root, 1, "normal")
    bad.write_bytes(b"not a photo")
    with pytest.raises(DataError, match=str(bad.relative_to(tmp_path))):
        crop_faces.crop_dataset(root, tmp_path / "out", progress=False, detector=FixedDetector(), log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    record = crop_faces.crop_dataset(root, tmp_path / "out", skip_bad=True, progress=False,
                                     detector=FixedDetector(), log=lambda *_: None)
    assert record["counts"]["bad"] == 1 and record["counts"]["photos"] == 20


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere", "{tmp}/out"], "data folder not found: {tmp}/nowhere"),
    (["{data}", "{tmp}/out", "--margin", "-1"], "--margin must be from 0 to 2"),
    (["{data}", "{tmp}/out", "--size", "60"], "--size"),
    (["{data}", "{tmp}/out", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["{data}", "{out}", "--margin", "0.5"], "with other settings (margin 0.2"),
])
def test_bad_input_exits_2_naming_it(tiny_data, cropped, tmp_path, capsys, args, message):
    fill = {"tmp": tmp_path, "data": tiny_data, "out": cropped[0]}
    argv = [a.format(**fill) for a in args] + ["--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        crop_faces.main_guard(lambda: crop_faces.main(argv))
    assert exit_info.value.code == 2
    assert message.format(**fill) in capsys.readouterr().err
