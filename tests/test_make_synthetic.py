"""Tests for data_tools.make_synthetic: the layout, determinism, label mix, visible cues and command line."""
from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_tools import make_synthetic as ms
from mtl import labels
from tests.helpers import ROOT

SIZE = (48, 64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small data set: 12 train people, 4 eval people, tiny photos."""
    out = tmp_path_factory.mktemp("synthetic")
    return ms.make_synthetic(out, people=12, seed=3, eval_people=4, size=SIZE, progress=False)


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_train_layout(dataset):
    train = pd.read_csv(dataset / "train" / "train.csv", dtype={"id": str})
    assert list(train.columns) == ["id", "gender", "race", "age", "path"]
    assert len(train) == 12 and train["id"].is_unique
    assert all(re.fullmatch(r"\d{6}", i) for i in train["id"])
    assert set(train["gender"]) <= {"male", "female"}
    assert set(train["race"]) <= set(ms.RACES)
    assert train["age"].between(18, 60).all()
    assert (train["path"] == train["id"] + "_" + train["gender"] + "_" + train["race"] + "_"
            + train["age"].astype(str)).all()
    folders = sorted(p.name for p in (dataset / "train" / "images").iterdir())
    assert folders == sorted(train["path"])
    for folder in (dataset / "train" / "images").iterdir():
        photos = list(folder.iterdir())
        assert sorted(p.stem for p in photos) == sorted(labels.PHOTO_STEMS)
        assert len({p.suffix for p in photos}) == 1 and photos[0].suffix in labels.IMAGE_EXTENSIONS
        for photo in photos:
            with Image.open(photo) as img:
                assert img.size == SIZE and img.mode == "RGB"


def test_eval_layout_and_truth(dataset):
    info = pd.read_csv(dataset / "eval" / "info.csv")
    truth = pd.read_csv(dataset / "eval_truth.csv")
    assert list(info.columns) == ["ImageID", "ans"]
    assert list(truth.columns) == ["ImageID", "ans", "mask", "gender", "age"]
    assert len(info) == 4 * 7 and (info["ans"] == 0).all()
    assert list(info["ImageID"]) == list(truth["ImageID"]) and info["ImageID"].is_unique
    assert all(re.fullmatch(r"[0-9a-f]{40}\.jpg", i) for i in info["ImageID"])
    assert sorted(p.name for p in (dataset / "eval" / "images").iterdir()) == sorted(info["ImageID"])
    expected = labels.encode(truth["mask"].values, truth["gender"].values, labels.age_group(truth["age"].values))
    assert (truth["ans"].values == expected).all()
    assert np.bincount(truth["mask"], minlength=3).tolist() == [4 * 5, 4, 4]
    with Image.open(dataset / "eval" / "images" / info["ImageID"][0]) as img:
        assert img.size == SIZE


def test_eval_photos_are_not_train_photos(dataset):
    train = {_sha1(p) for p in (dataset / "train" / "images").rglob("*.*")}
    held_out = {_sha1(p) for p in (dataset / "eval" / "images").iterdir()}
    assert len(train) == 12 * 7 and len(held_out) == 4 * 7
    assert not train & held_out


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    runs = {name: ms.make_synthetic(tmp_path / name, people=3, seed=seed, eval_people=1, size=SIZE, progress=False,
                                    workers=workers)
            for name, seed, workers in (("a", 5, 1), ("b", 5, 2), ("c", 6, 1))}
    a, b, c = ((runs[n] / "train" / "train.csv").read_bytes() for n in "abc")
    assert a == b
    folder = pd.read_csv(runs["a"] / "train" / "train.csv")["path"][0]
    photo_a = next((runs["a"] / "train" / "images" / folder).glob("mask1.*"))
    photo_b = runs["b"] / photo_a.relative_to(runs["a"])
    assert photo_a.read_bytes() == photo_b.read_bytes()
    assert (runs["a"] / "eval_truth.csv").read_bytes() == (runs["b"] / "eval_truth.csv").read_bytes()
    assert a != c
    files_a = sorted(p.relative_to(runs["a"]) for p in runs["a"].rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(runs["b"]) for p in runs["b"].rglob("*") if p.is_file())
    assert all((runs["a"] / f).read_bytes() == (runs["b"] / f).read_bytes() for f in files_a)  # workers: same bytes


# NOTE: sha256 digests of what make_synthetic drew and wrote at commit 19f8528, before `_draw_person` was split into
# one function per part of the face; numpy and pillow are pinned (requirements.txt), so they move only if drawing does
DRAWN_SHA256 = "ebf48663b132b92dc62dfcc6762028a7a7f4b6a78083704e5cbd4c1e34f804a1"
WRITTEN_SHA256 = "91c313a10b3c2688dbe7ad7da39e84a3affc55c62126d71be74b23ebf68e5dd7"


def test_photos_and_files_are_byte_identical_to_the_reference(tmp_path):
    rng = np.random.default_rng(11)
    people = ms.sample_people(16, rng)  # NOTE: long and short hair, bangs, receding, stubble, glasses, ages 18..60
    assert {p.hair_style for p in people} == {"long", "short"} and all(any(getattr(p, k) for p in people) for k in
                                                                       ("bangs", "recedes", "stubble", "glasses"))
    drawn = hashlib.sha256()
    for person in people:
        for stem in labels.PHOTO_STEMS:
            drawn.update(np.asarray(ms.draw_photo(person, stem, ms.sample_view(rng), (72, 96))).tobytes())
    assert drawn.hexdigest() == DRAWN_SHA256
    out = ms.make_synthetic(tmp_path / "d", people=4, seed=5, eval_people=1, size=(64, 80), progress=False, workers=1)
    written = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        written.update(str(path.relative_to(out)).encode() + b"\0" + path.read_bytes())
    assert written.hexdigest() == WRITTEN_SHA256


def test_label_mix_is_skewed_like_the_real_data():
    ages = ms.sample_ages(4000, np.random.default_rng(0))
    assert ages.min() >= 18 and ages.max() == 60
    assert 0.03 <= np.mean(ages >= 60) <= 0.15
    assert 0.30 <= np.mean(ages < 30) <= 0.60
    people = ms.sample_people(400, np.random.default_rng(1))
    old = np.mean([p.age >= 60 for p in people])
    assert 0.03 <= old <= 0.15
    female = [p for p in people if p.gender == "female"]
    assert 0.5 <= len(female) / len(people) <= 0.7
    atypical = np.mean([(p.hair_style == "long") != (p.gender == "female") for p in people])
    assert 0.02 <= atypical <= 0.15


def _still_view(seed: int) -> ms.View:
    """A photo's nuisance without rotation, blur or contrast change, so pixel regions line up across stems."""
    view = ms.sample_view(np.random.default_rng(seed))
    return dataclasses.replace(view, angle=0.0, blur=0.0, contrast=1.0)


def _region(photo: Image.Image, box, fx0, fy0, fx1, fy1) -> np.ndarray:
    """Pixels of the part of a face box given as fractions of its width and height."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    arr = np.asarray(photo, np.float32)
    return arr[round(y0 + fy0 * h):round(y0 + fy1 * h), round(x0 + fx0 * w):round(x0 + fx1 * w)]


def test_mask_state_is_drawn_where_it_should_be():
    size = (192, 256)
    nose_hidden = []
    for i, person in enumerate(ms.sample_people(6, np.random.default_rng(2))):
        view = dataclasses.replace(_still_view(i), chin_only=False)
        photos = {stem: ms.draw_photo(person, stem, view, size) for stem in ("normal", "mask1", "incorrect_mask")}
        box = ms.face_box(person, view, size)

        def diff(stem, *region, photos=photos, box=box):
            return np.abs(_region(photos[stem], box, *region) - _region(photos["normal"], box, *region)).mean()
        mouth, nose, hair = (0.3, 0.76, 0.7, 0.84), (0.44, 0.56, 0.56, 0.63), (0.42, 0.01, 0.58, 0.06)
        assert diff("mask1", *mouth) > 20 and diff("incorrect_mask", *mouth) > 20   # both cover the mouth
        assert diff("mask1", *nose) > 5 and diff("incorrect_mask", *nose) < 1     # only a worn mask hides the nose
        nose_hidden.append(diff("mask1", *nose))
        assert diff("mask1", *hair) < 1 and diff("incorrect_mask", *hair) < 1       # the rest is the same photo
    assert np.mean(nose_hidden) > 20  # a mask can be close to skin colour, but not on average
    chin_only = dataclasses.replace(_still_view(0), chin_only=True)
    box = ms.face_box(person, chin_only, size)
    normal, low = (ms.draw_photo(person, stem, chin_only, size) for stem in ("normal", "incorrect_mask"))
    upper_mouth = (0.35, 0.76, 0.65, 0.8)
    assert np.abs(_region(low, box, *upper_mouth) - _region(normal, box, *upper_mouth)).mean() < 5


def test_hair_greys_with_age():
    size = (192, 256)
    young, old = [], []
    for i, person in enumerate(ms.sample_people(8, np.random.default_rng(4))):
        view = _still_view(100 + i)
        box = ms.face_box(person, view, size)
        for age, found in ((20, young), (60, old)):
            photo = ms.draw_photo(dataclasses.replace(person, age=age), "mask1", view, size)
            found.append(_region(photo, box, 0.42, 0.01, 0.58, 0.06).mean())
    assert np.mean(old) > np.mean(young) + 60
    assert np.mean(np.array(old) > np.array(young)) >= 0.75
    assert ms.grey_fraction(25) == 0 and ms.grey_fraction(45) < ms.grey_fraction(55) < ms.grey_fraction(60) == 1


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "data_tools.make_synthetic", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_rejects_bad_arguments(tmp_path):
    result = _cli("--out", tmp_path / "x", "--people", 0)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "error" in message and "--people" in message
    result = _cli("--out", tmp_path / "x", "--people", 2, "--size", 16, 64)
    assert result.returncode == 2 and "--size" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_non_empty_out_without_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    args = ("--out", tmp_path, "--people", 1, "--eval-people", 1, "--size", 32, 32, "--quiet", "--workers", 1)
    result = _cli(*args)
    assert result.returncode == 2 and "--overwrite" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "train").exists()
    result = _cli(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "train" / "train.csv")) == 1
    assert (tmp_path / "notes.txt").read_text() == "keep me"
