"""predict.py --images: any photo files, folders and globs get the competition path's answers as named rows;
unreadable photos and bad flags stop before any forward pass with nothing written."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mtl import labels, predict
from mtl.cli import main_guard
from mtl.errors import ConfigError, DataError, MTLError
from mtl.photos import find_photos
from mtl.predictor import Predictor
from tests.helpers import run_predict
from tests.tiny_checkpoints import untrained_checkpoint

PROBS = ["p_mask_wear", "p_mask_incorrect", "p_mask_not_wear", "p_gender_male", "p_gender_female", "p_age_<30",
         "p_age_30-59", "p_age_60+"]


@pytest.fixture
def no_forward(monkeypatch):
    """Make any model forward fail the test: bad input must be refused before compute."""
    def refuse(*_, **__):
        raise AssertionError("a model ran on bad input")
    monkeypatch.setattr("mtl.members.predict_members", refuse)


@pytest.fixture(scope="module")
def photos(synthetic_data, tmp_path_factory):
    """12 eval photos of the synthetic set as a user's folder: nested, one PNG, plus files that are no photos."""
    root = tmp_path_factory.mktemp("mine") / "photos"
    ids = pd.read_csv(synthetic_data / "eval" / "info.csv", dtype=str)["ImageID"].head(12).tolist()
    (root / "trip" / "day2").mkdir(parents=True)
    places = {}
    for k, image_id in enumerate(ids):
        folder = root / ("trip" if k < 4 else "trip/day2" if k < 8 else "")
        dest = folder / (f"photo{k:02d}" + (".PNG" if k == 5 else ".jpg"))
        if k == 5:
            Image.open(synthetic_data / "eval" / "images" / image_id).save(dest, format="PNG")
        else:
            shutil.copy(synthetic_data / "eval" / "images" / image_id, dest)
        places[str(dest)] = None if k == 5 else image_id  # NOTE: not the same pixels: JPEG decodes at half scale
    (root / "notes.txt").write_text("not a photo")
    (root / "._photo00.jpg").write_bytes(b"resource fork")
    (root / ".hidden").mkdir()
    shutil.copy(next(iter(places)), root / ".hidden" / "secret.jpg")
    return root, places


def test_finding_photos_in_folders_and_globs(photos, tmp_path):
    root, places = photos
    found = find_photos([root])
    assert sorted(found) == sorted(places) and len(found) == 12  # recursive, .PNG too; no ._*, hidden or .txt
    assert find_photos([str(root / "trip" / "*.jpg"), str(root / "trip")]) == sorted(
        p for p in places if Path(p).parent == root / "trip") + sorted(
        p for p in places if Path(p).parent == root / "trip" / "day2")  # each photo once, in the order given
    with pytest.raises(ConfigError, match="no such file or folder"):
        find_photos([tmp_path / "nowhere"])
    with pytest.raises(ConfigError, match="matches no photo"):
        find_photos([str(root / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no photos"):
        find_photos([tmp_path / "empty"])


def test_folder_prediction_equals_the_competition_path(photos, ckpts, synthetic_data, cache_dir, tmp_path):
    root, places = photos
    flags = ["--checkpoint", *ckpts, "--tta", "hflip", "--batch-size", "5"]
    competition = run_predict(*flags, "--data", synthetic_data, "--out", tmp_path / "sub.csv", cache_dir=cache_dir)
    mine = run_predict(*flags, "--images", root, "--out", tmp_path / "pred.csv", cache_dir=cache_dir)
    table = pd.read_csv(tmp_path / "pred.csv")
    assert list(table.columns) == ["path", "mask", "gender", "age", "class", *PROBS, "age_years"]
    assert sorted(table["path"]) == sorted(places) and len(table) == 12
    position = {image_id: i for i, image_id in enumerate(competition["image_ids"])}
    assert table["path"].tolist() == mine["image_ids"]
    same = [places[p] is not None for p in table["path"]]  # the photos copied as they are
    rows = [position[places[p]] for p in table["path"][same]]
    exact = table[same]
    assert np.array_equal(exact["class"].to_numpy(), competition["ensemble"].pred[rows])
    soft = competition["ensemble"].probs
    for task in labels.TASKS:  # NOTE: the CSV holds 6 decimals
        got = exact[[c for c in PROBS if c.startswith(f"p_{task}_")]].to_numpy()
        assert np.abs(got - soft[task][rows]).max() < 2e-6, (task, np.abs(got - soft[task][rows]).max())
    assert np.abs(exact["age_years"] - soft["age_reg"][rows]).max() < 1e-4
    names = [labels.LabelSchema().class_name(c).split("/") for c in table["class"]]  # names and class agree
    assert table[["mask", "gender", "age"]].values.tolist() == names
    assert "wrote" in mine["log"] and not list(tmp_path.glob(".*.tmp"))


def test_python_api_takes_paths_pil_images_and_arrays_alike(photos, ckpts):
    root, places = photos
    png = next(p for p in places if p.endswith(".PNG"))
    predictor = Predictor(ckpts[0], device="cpu")
    by_path = predictor.predict(png)
    pixels = np.asarray(Image.open(png).convert("RGB"))
    by_image, by_array = predictor.predict([Image.open(png), pixels])
    assert isinstance(by_path, dict) and by_path["path"] == png
    assert by_image["path"] == png and by_array["path"] is None
    for answer in (by_image, by_array):
        assert {k: v for k, v in answer.items() if k != "path"} == pytest.approx(
            {k: v for k, v in by_path.items() if k != "path"}, rel=1e-6, abs=1e-6)
    assert all(type(v) in (str, int, float) for k, v in by_path.items()), by_path  # plain data
    assert by_path["mask"] in labels.MASK_NAMES and 0 <= by_path["class"] < 18
    frame = predictor.predict_frame(pixels[None].repeat(3, axis=0))  # an (N, H, W, 3) batch
    assert len(frame) == 3 and frame["class"].nunique() == 1
    record = predictor.prediction([png, pixels])  # the typed record behind the rows
    assert record.image_ids == [png, None] and record.skipped == [] and record.face_found is None
    assert [m.path for m in record.members] == [str(ckpts[0])] and len(record.member_probs) == 1
    assert predictor.answers(record)["class"].tolist() == [by_path["class"]] * 2
    with pytest.raises(ConfigError, match=r"image 0: expected a uint8 RGB array of shape \(H, W, 3\)"):
        predictor.predict(pixels.astype(np.float32))


def test_age_groups_are_named_at_the_checkpoints_threshold(tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "t59.pt", age_threshold=59)
    photo = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(photo)
    answer = Predictor(ckpt, device="cpu").predict(photo)
    assert [k for k in answer if k.startswith("p_age")] == ["p_age_<30", "p_age_30-58", "p_age_59+"]
    assert answer["age"] in ("<30", "30-58", "59+") and labels.LabelSchema(59).age_names == ("<30", "30-58", "59+")
    assert "age_years" not in answer and "face_found" not in answer


def test_a_broken_photo_is_named_in_one_line_before_compute(photos, ckpts, cache_dir, tmp_path, capsys, no_forward):
    root = shutil.copytree(photos[0], tmp_path / "photos")
    broken = root / "trip" / "photo02.jpg"
    broken.write_bytes(broken.read_bytes()[:300])
    argv = ["--checkpoint", str(ckpts[0]), "--images", str(root), "--out", str(tmp_path / "pred.csv"),
            "--cache-dir", str(cache_dir), "--workers", "0", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: predict.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: ") and "photo02.jpg: unreadable image" in err and "--skip-bad" in err
    assert not (tmp_path / "pred.csv").exists()


def test_skip_bad_leaves_broken_photos_out_and_lists_them(photos, ckpts, cache_dir, tmp_path):
    root = shutil.copytree(photos[0], tmp_path / "photos")
    broken = [root / "trip" / "photo02.jpg", root / "photo09.jpg"]
    for path in broken:
        path.write_bytes(b"no photo")
    done = run_predict("--checkpoint", ckpts[0], "--images", root, "--skip-bad", "--out", tmp_path / "pred.csv",
                       cache_dir=cache_dir)
    table = pd.read_csv(tmp_path / "pred.csv")
    assert len(table) == 10 and not set(map(str, broken)) & set(table["path"])
    assert "2 unreadable photos" in done["log"] and all(p.name in done["log"] for p in broken)
    assert "2 unreadable photo(s) left out" in done["log"]


def test_outputs_are_checked_before_compute(photos, ckpts, tmp_path, no_forward):
    root = photos[0]
    with pytest.raises(MTLError, match="does not exist"):
        run_predict("--checkpoint", ckpts[0], "--images", root, "--out", tmp_path / "nope" / "pred.csv")
    with pytest.raises(ConfigError, match="is a folder"):
        run_predict("--checkpoint", ckpts[0], "--images", root, "--out", tmp_path)
    with pytest.raises(ConfigError, match="no such file or folder"):
        run_predict("--checkpoint", ckpts[0], "--images", tmp_path / "missing.jpg", "--out", tmp_path / "p.csv")
    with pytest.raises(ConfigError, match="cannot go with --from-probs or --validate"):
        run_predict("--checkpoint", ckpts[0], "--images", root, "--validate", "--out", tmp_path / "p.csv")
    gpu = torch.cuda.is_available()
    with pytest.raises(ConfigError, match="is not a device" if gpu else "--device cuda: this machine has no CUDA GPU"):
        run_predict("--checkpoint", ckpts[0], "--images", root, "--device", "tpu" if gpu else "cuda", "--out",
                    tmp_path / "p.csv")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_selection_after_skipping_says_so(ckpts, tmp_path, no_forward):
    (tmp_path / "bad.jpg").write_bytes(b"nothing")
    with pytest.raises(DataError, match="no readable photo left"):
        Predictor(ckpts[0], device="cpu").predict(tmp_path / "bad.jpg", skip_bad=True)
