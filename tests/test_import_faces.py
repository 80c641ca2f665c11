"""data_tools.import_faces: missing labels become -1, and training on the mix masks their loss out."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data_tools import import_faces
from data_tools.make_synthetic import make_synthetic
from mtl import data, face_crop, labels
from mtl.dataset import DataSpec, FaceDataset, load_fold
from mtl.losses import build_loss, class_counts
from mtl.model import create_model
from mtl.transforms import eval_transform, make_preprocess
from tests.helpers import SHARED

UTKFACE = SHARED / "data" / "utkface-dev"
# (age, gender) of the UTKFace-named photos the tests import: every age group, both genders
WANTED = [(23, 0), (27, 1), (41, 0), (45, 1), (66, 0), (72, 1)]
SIZE = (40, 52)


def run(argv):
    """The command line in-process; returns its exit code."""
    try:
        code = import_faces.main_guard(lambda: import_faces.main([*map(str, argv), "--no-progress"]))
    except SystemExit as exc:
        code = exc.code
    return code


@pytest.fixture
def utk_src(tmp_path):
    """A few photos named like UTKFace (age_gender_race_date.jpg.chip.jpg): real ones when at hand."""
    src = tmp_path / "utk"
    src.mkdir()
    real = {}
    if UTKFACE.is_dir():
        for path in sorted(UTKFACE.glob("*.jpg")):
            age, gender = (int(v) for v in path.name.split("_")[:2])
            real.setdefault((age, gender), path)
    for k, (age, gender) in enumerate(WANTED):
        name = f"{age}_{gender}_2_2017010{k}000000000.jpg.chip.jpg"
        if (age, gender) in real:
            name = real[(age, gender)].name
            shutil.copyfile(real[(age, gender)], src / name)
        else:
            Image.new("RGB", (200, 200), (40 * k, 120, 200 - 30 * k)).save(src / name, format="JPEG")
    (src / "README.txt").write_text("not a photo: ignored")
    return src


@pytest.fixture
def folder_src(tmp_path):
    """A folder-per-mask-class set under the Kaggle names (and one 'Not wear' spelling)."""
    src = tmp_path / "masks"
    for k, folder in enumerate(("with_mask", "mask_weared_incorrect", "without_mask", "Not wear")):
        (src / folder).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (64, 64), (60 * k, 30 * j, 90)).save(src / folder / f"face{j}.png")
    return src


def test_utkface_keeps_age_and_gender_and_marks_mask_unknown(utk_src, tmp_path, capsys):
    out = tmp_path / "out"
    assert run([utk_src, out, "--format", "utkface"]) == 0
    table = data.read_extra(out / "extra.csv")
    assert len(table) == len(WANTED)
    assert (table["mask"] == labels.UNKNOWN).all()
    names = [Path(p).name.split("_") for p in table["image_path"]]
    assert table["age"].tolist() == [int(n[0]) for n in names]
    assert table["gender"].tolist() == [int(n[1]) for n in names]
    assert all(Path(p).parent == utk_src for p in table["image_path"])  # referenced in place
    printed = capsys.readouterr().out
    assert f"imported {len(WANTED)} photos" in printed and f"unknown {len(WANTED)}" in printed


def test_utkface_filters_limits_and_can_assume_a_mask_state(utk_src, tmp_path):
    out = tmp_path / "out"
    assert run([utk_src, out, "--format", "utkface", "--min-age", 60, "--assume-mask", "not_wear"]) == 0
    table = data.read_extra(out / "extra.csv")
    assert sorted(table["age"]) == sorted(a for a, _ in WANTED if a >= 60)
    assert (table["mask"] == 2).all()
    assert run([utk_src, out, "--format", "utkface", "--limit", 2, "--overwrite"]) == 0
    assert len(data.read_extra(out / "extra.csv")) == 2


def test_folder_format_marks_gender_and_age_unknown(folder_src, tmp_path):
    out = tmp_path / "out"
    assert run([folder_src, out, "--format", "folder", "--copy"]) == 0
    written = pd.read_csv(out / "extra.csv")
    assert written["path"].str.startswith("images/").all()  # copied, so relative to the CSV
    table = data.read_extra(out / "extra.csv")
    expected = {"with_mask": 0, "mask_weared_incorrect": 1, "without_mask": 2, "Not wear": 2}
    assert table["mask"].tolist() == [expected[Path(p).parent.name] for p in table["image_path"]]
    assert len(table) == 8 and (table["gender"] == -1).all() and (table["age"] == -1).all()


def test_link_points_at_the_source_photos(folder_src, tmp_path):
    out = tmp_path / "out"
    assert run([folder_src, out, "--format", "folder", "--link"]) == 0
    table = data.read_extra(out / "extra.csv")
    paths = [Path(p) for p in table["image_path"]]
    assert all(p.is_symlink() and p.is_relative_to(out / "images") for p in paths)
    assert {p.resolve().parent.parent for p in paths} == {folder_src.resolve()}


def test_crop_like_crops_every_photo_as_the_data_set_was_cropped(utk_src, tmp_path, capsys):
    faces = tmp_path / "data_faces"
    faces.mkdir()
    record = face_crop.crop_settings(margin=0.2, size=(30, 40))
    (faces / data.FACE_CROP_RECORD).write_text(json.dumps(record))
    out = tmp_path / "out"
    assert run([utk_src, out, "--format", "utkface", "--crop-like", faces, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    table = data.read_extra(out / "extra.csv")
    assert len(table) == len(WANTED) and sorted(zip(table["age"], table["gender"])) == WANTED  # labels kept
    for path in table["image_path"]:
        assert Path(path).is_relative_to(out / "images") and Path(path).name.endswith(".jpg.chip.jpg")
        with Image.open(path) as photo:
            assert photo.size == (30, 40)  # the record's size, not the 200x200 source
    assert json.loads((out / data.FACE_CROP_RECORD).read_text()) == record
    assert f"face-cropped {len(WANTED)} photos" in printed and "face-cropped under" in printed
    # real UTKFace chips are faces, found by MTCNN; plain colours (no ../shared) fall back to the usual place
    assert ("no face found in" in printed) == (not UTKFACE.is_dir())


def test_unknown_class_folder_is_named(folder_src, tmp_path, capsys):
    (folder_src / "sunglasses").mkdir()
    assert run([folder_src, tmp_path / "out", "--format", "folder"]) == 2
    err = capsys.readouterr().err
    assert "unknown mask-class folder(s) 'sunglasses'" in err and "with_mask" in err
    assert not (tmp_path / "out").exists()


def test_unreadable_photo_stops_the_import_unless_skip_bad(utk_src, tmp_path, capsys):
    bad = utk_src / "50_1_0_20170109000000000.jpg.chip.jpg"
    bad.write_bytes(b"\xff\xd8 cut short")
    assert run([utk_src, tmp_path / "out", "--format", "utkface"]) == 2
    assert str(bad) in capsys.readouterr().err and not (tmp_path / "out" / "extra.csv").exists()
    assert run([utk_src, tmp_path / "out", "--format", "utkface", "--skip-bad"]) == 0
    assert len(data.read_extra(tmp_path / "out" / "extra.csv")) == len(WANTED)


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere", "{tmp}/out", "--format", "utkface"], "SRC folder not found: {tmp}/nowhere"),
    (["{src}", "{tmp}/out", "--format", "voc"], "invalid choice: 'voc'"),
    (["{src}", "{tmp}/out", "--format", "folder", "--min-age", "60"], "--min-age, --max-age and --assume-mask"),
    (["{src}", "{src}/out", "--format", "utkface", "--copy"], "is inside SRC"),
    (["{src}", "{tmp}/out", "--format", "utkface", "--crop-like", "{tmp}"], "--crop-like {tmp}: no face_crop.json"),
    (["{src}", "{tmp}/out", "--format", "utkface", "--crop-like", "{tmp}", "--copy"], "not allowed with argument"),
])
def test_bad_input_exits_2_naming_it(utk_src, tmp_path, capsys, args, message):
    fill = {"tmp": tmp_path, "src": utk_src}
    assert run([a.format(**fill) for a in args]) == 2
    assert message.format(**fill) in capsys.readouterr().err


def test_training_on_the_mix_masks_the_loss_of_missing_labels(utk_src, folder_src, tmp_path):
    """A photo without a mask label gives the mask head exactly zero gradient; the other heads learn from it."""
    root = make_synthetic(tmp_path / "data", people=5, seed=2, eval_people=0, size=SIZE, progress=False)
    assert run([utk_src, tmp_path / "utk", "--format", "utkface"]) == 0
    assert run([folder_src, tmp_path / "masks", "--format", "folder"]) == 0
    spec = DataSpec(root, extra=(tmp_path / "utk" / "extra.csv", tmp_path / "masks" / "extra.csv"))
    fold = load_fold(spec, SIZE, use_cache=False, workers=1, progress=False, log=lambda *_: None)
    preprocess = make_preprocess(SIZE)
    dataset = FaceDataset(fold.train_samples, fold.train_images, eval_transform(preprocess))
    source = fold.train_samples["source"]
    competition = int(np.flatnonzero(source == "train")[0])
    no_mask = int(np.flatnonzero((fold.train_samples["mask"] == -1).to_numpy())[0])
    mask_only = int(np.flatnonzero((fold.train_samples["gender"] == -1).to_numpy())[0])

    torch.manual_seed(0)
    model = create_model("test_efficientnet", pretrained=False, head_dropout=0.0).eval()
    specs = {"mask": {"name": "ce"}, "gender": {"name": "bce"}, "age": {"name": "ce"}}
    loss_fn = build_loss(specs, "multihead", class_counts(dataset.targets()))

    def head_grads(indices):
        items = [dataset[i] for i in indices]
        images = torch.stack([item["image"] for item in items])
        targets = {k: torch.as_tensor(np.array([item[k] for item in items])) for k in ("mask", "gender", "age_group",
                                                                                       "age_years")}
        model.zero_grad(set_to_none=False)
        loss, _ = loss_fn(model(images), targets)
        loss.backward()
        return {task: model.heads[task].fc.weight.grad.clone() for task in labels.TASKS}

    grads = head_grads([no_mask])
    assert torch.count_nonzero(grads["mask"]) == 0
    assert torch.count_nonzero(grads["gender"]) > 0 and torch.count_nonzero(grads["age"]) > 0
    grads = head_grads([mask_only])
    assert torch.count_nonzero(grads["gender"]) == 0 and torch.count_nonzero(grads["age"]) == 0
    assert torch.count_nonzero(grads["mask"]) > 0
    alone, mixed = head_grads([competition]), head_grads([competition, no_mask])
    torch.testing.assert_close(mixed["mask"], alone["mask"], rtol=1e-4, atol=1e-7)  # nothing from the unlabelled one
    assert not torch.equal(alone["gender"], mixed["gender"])
