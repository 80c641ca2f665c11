"""data_tools.report: counts equal what was generated; planted problems are named and fail the run."""
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_tools import report
from data_tools.make_synthetic import make_synthetic
from mtl import labels

PEOPLE, EVAL_PEOPLE, SIZE = 12, 3, (48, 64)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A small synthetic data set of our own (read-only here: copy it before planting problems)."""
    out = tmp_path_factory.mktemp("report") / "data"
    return make_synthetic(out, people=PEOPLE, seed=3, eval_people=EVAL_PEOPLE, size=SIZE, progress=False)


def expected_photos(root):
    """Photos per 18-class label computed straight from train.csv (7 photos a person) and eval_truth.csv."""
    people = pd.read_csv(root / "train" / "train.csv")
    train = np.zeros(labels.NUM_JOINT, int)
    for person in people.itertuples():
        g, a = labels.GENDER_CODE[person.gender], labels.age_group(person.age)
        for mask in labels.PHOTO_MASK.values():
            train[labels.encode(mask, g, a)] += 1
    truth = pd.read_csv(root / "eval_truth.csv")
    return train, np.bincount(truth["ans"], minlength=labels.NUM_JOINT)


def test_counts_match_what_was_generated(small_data, tmp_path, capsys):
    assert report.main([str(small_data), "--out", str(tmp_path / "rep"), "--no-progress", "--workers", "1"]) == 0
    facts = report.collect(small_data, progress=False, workers=1)
    table = report.class_table(facts)
    train, evals = expected_photos(small_data)
    assert table["train photos"].tolist() == train.tolist()
    assert table["eval photos"].tolist() == evals.tolist()
    assert table["name"].tolist() == [labels.LabelSchema().class_name(c) for c in range(labels.NUM_JOINT)]
    people = pd.read_csv(small_data / "train" / "train.csv")
    tasks = report.task_tables(facts)
    assert tasks["gender"]["train people"].tolist() == [(people["gender"] == "male").sum(),
                                                          (people["gender"] == "female").sum()]
    assert tasks["mask"]["train photos"].tolist() == [5 * PEOPLE, PEOPLE, PEOPLE]
    assert report.gender_age_table(facts).to_numpy().sum() == PEOPLE
    assert facts["errors"] == [] and facts["duplicates"] == []
    for name in ("report.md", "class_counts.png", "age_histogram.png", "gender_age.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:4] in (b"# Da", b"\x89PNG")
    assert "0 error(s)" in capsys.readouterr().out


def test_planted_problems_are_named_and_exit_1(small_data, tmp_path, capsys):
    root = shutil.copytree(small_data, tmp_path / "data")
    folders = pd.read_csv(root / "train" / "train.csv", dtype=str)["path"]
    person = root / "train" / "images" / folders[0]
    truncated = next(p for p in sorted((root / "train" / "images").rglob("mask1.jp*g")))
    truncated.write_bytes(truncated.read_bytes()[:len(truncated.read_bytes()) // 2])
    missing = next(p for p in person.iterdir() if p.stem == "mask3")
    missing.unlink()
    other = root / "train" / "images" / folders[1]
    original, copy = (next(p for p in other.iterdir() if p.stem == s) for s in ("mask4", "mask5"))
    shutil.copyfile(original, copy)

    out = tmp_path / "rep"
    assert report.main([str(root), "--out", str(out), "--no-progress"]) == 1
    text = (out / "report.md").read_text()
    printed = capsys.readouterr().out
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    errors = text.split("## Errors")[1]
    assert rel(truncated) in errors and "truncated" in errors
    assert rel(person / "mask3") + "`: photo missing" in errors
    duplicates = text.split("## Duplicate photos")[1].split("##")[0]
    assert rel(original) in duplicates and rel(copy) in duplicates
    assert rel(truncated) in printed and "3 error" not in printed and "2 error(s)" in printed


def test_age_threshold_moves_the_groups(small_data, tmp_path):
    facts = report.collect(small_data, age_threshold=40, progress=False, workers=1)
    people = pd.read_csv(small_data / "train" / "train.csv")
    assert report.gender_age_table(facts)["40+"].sum() == (people["age"] >= 40).sum()


def test_missing_train_csv_exits_2_naming_it(small_data, tmp_path, capsys):
    root = shutil.copytree(small_data, tmp_path / "data")
    (root / "train" / "train.csv").unlink()
    with pytest.raises(SystemExit) as exit_info:
        report.main_guard(lambda: report.main([str(root), "--out", str(tmp_path / "rep"), "--no-progress"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "train.csv not found" in err and str(root) in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_implausible_data_is_named_as_the_loader_names_it(small_data, tmp_path, capsys):
    root = shutil.copytree(small_data, tmp_path / "data")
    csv = root / "train" / "train.csv"
    people = pd.read_csv(csv, dtype=str)
    people.loc[2, "age"] = "200"
    people.to_csv(csv, index=False)
    folder = root / "train" / "images" / people["path"][0]
    tiny = next(p for p in folder.iterdir() if p.stem == "mask2")
    Image.new("RGB", (1, 1)).save(tiny, format="PNG" if tiny.suffix == ".png" else "JPEG")
    deep = next(p for p in folder.iterdir() if p.stem == "normal")
    grey = np.asarray(Image.open(deep).convert("L"))
    deep.unlink()
    deep = deep.with_suffix(".png")
    cv2.imwrite(str(deep), grey.astype(np.uint16) * 257)
    info = root / "eval" / "info.csv"
    with info.open("a") as f:
        f.write("../../train/train.csv,0\n")

    assert report.main([str(root), "--out", str(tmp_path / "rep"), "--no-progress", "--workers", "1"]) == 1
    text = (tmp_path / "rep" / "report.md").read_text()
    errors, notes = text.split("## Errors")[1].split("## Worth a look")
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    assert "`train/train.csv row 4`: age 200 is outside the plausible range 0..120" in errors
    assert f"`{rel(tiny)}`: photo is 1x1 px, below the minimum side of 16 px" in errors
    assert f"row {len(pd.read_csv(info))+1}`: ImageID '../../train/train.csv' does not name a file inside" in errors
    assert f"`{rel(deep)}`: 16-bit PNG" in notes and rel(deep) not in errors
    assert "age 200 looks wrong" not in notes
    assert "3 error(s)" in capsys.readouterr().out
