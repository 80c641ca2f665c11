"""predict.py: the submission follows info.csv and beats chance, ensembles, TTA, probability files, the validation
report, and every bad input stops with a clear error before any forward pass and with nothing written."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score

from mtl import checkpoint, labels, predict
from mtl.cli import main_guard
from mtl.ensemble import combine
from mtl.errors import ConfigError, DataError, MTLError
from mtl.inference import predict_probs
from mtl.members import check_face_crop, load_members
from mtl.metrics import predict_classes, recombine
from tests.helpers import ROOT, run_command, run_predict
from tests.tiny_checkpoints import with_calibration


@pytest.fixture(scope="module")
def single(ckpts, synthetic_data, cache_dir, tmp_path_factory):
    """One checkpoint on the synthetic eval set, with its probabilities saved."""
    out = tmp_path_factory.mktemp("single")
    result = run_predict("--checkpoint", ckpts[0], "--data", synthetic_data, "--out", out / "sub.csv",
                         "--save-probs", out / "probs.csv", cache_dir=cache_dir)
    return {**result, "dir": out, "data": synthetic_data, "cache_dir": cache_dir}


@pytest.fixture(scope="module")
def pair(ckpts, tmp_path_factory):
    """Two members that disagree by construction: a.pt is best.pt; b.pt is best.pt with its mask head's 'wear' and
    'incorrect' rows swapped and halved, so it answers every photo a.pt calls worn or incorrectly worn the other way
    round, less sure than a.pt (no exact ties in the soft mean), and agrees on bare faces. (A trained run's last.pt
    may equal its best.pt: it cannot be the second member.)"""
    folder = tmp_path_factory.mktemp("pair")
    shutil.copy(ckpts[0], folder / "a.pt")
    swapped = checkpoint.load(ckpts[0])
    swapped.pop("path", None)
    for name in ("heads.mask.fc.weight", "heads.mask.fc.bias"):
        swapped["model"][name] = swapped["model"][name][[1, 0, 2]] * 0.5
    checkpoint.save(swapped, folder / "b.pt")
    return folder / "a.pt", folder / "b.pt"


@pytest.fixture(scope="module")
def ensemble(pair, synthetic_data, cache_dir, tmp_path_factory):
    """The two members of `pair` through a glob, soft, probabilities saved."""
    out = tmp_path_factory.mktemp("ensemble")
    result = run_predict("--checkpoint", str(pair[0].parent / "*.pt"), "--data", synthetic_data, "--out",
                         out / "soft.csv", "--save-probs", out / "probs.csv", cache_dir=cache_dir)
    return {**result, "dir": out}


@pytest.fixture
def no_forward(monkeypatch):
    """Make any model forward fail the test: bad input must be refused before compute."""
    def refuse(*_, **__):
        raise AssertionError("a model ran on bad input")
    monkeypatch.setattr("mtl.members.predict_members", refuse)


def eval_subset(synthetic_data, dest, n=6, info=True) -> Path:
    """A data folder with the first n eval photos of the synthetic set (and their info.csv rows)."""
    table = pd.read_csv(synthetic_data / "eval" / "info.csv", dtype=str).head(n)
    (dest / "eval" / "images").mkdir(parents=True)
    for image_id in table["ImageID"]:
        shutil.copy(synthetic_data / "eval" / "images" / image_id, dest / "eval" / "images" / image_id)
    if info:
        table.to_csv(dest / "eval" / "info.csv", index=False)
    return dest


def only_files(folder) -> list:
    return sorted(p.name for p in Path(folder).iterdir())


# ---------------------------------------------------------------- the submission
def test_submission_follows_info_csv_and_beats_chance(single, synthetic_data):
    sub = pd.read_csv(single["dir"] / "sub.csv")
    info = pd.read_csv(synthetic_data / "eval" / "info.csv")
    assert list(sub.columns) == ["ImageID", "ans"]
    assert sub["ImageID"].tolist() == info["ImageID"].tolist()
    assert sub["ans"].between(0, 17).all() and sub["ans"].dtype.kind == "i"
    truth = pd.read_csv(synthetic_data / "eval_truth.csv")
    assert truth["ImageID"].tolist() == sub["ImageID"].tolist()
    acc = float((sub["ans"] == truth["ans"]).mean())
    majority = float(truth["ans"].value_counts(normalize=True).max())
    f1 = f1_score(truth["ans"], sub["ans"], average="macro")
    mask_f1 = f1_score(truth["mask"], sub["ans"] // 6, average="macro")
    # chance: 1/18 = 0.056 at random, `majority` (~0.26) always answering the commonest class; mask F1 ~0.28
    assert acc > max(0.25, majority + 0.05), (acc, majority)
    assert f1 > 2 / 18 and mask_f1 > 0.4, (f1, mask_f1)


def test_probabilities_are_saved_and_redo_the_submission(single, tmp_path):
    probs = pd.read_csv(single["dir"] / "probs.csv")
    heads = [f"mask_{i}" for i in range(3)] + ["gender_0", "gender_1"] + [f"age_{i}" for i in range(3)]
    assert list(probs.columns) == ["ImageID", "checkpoint", "age_threshold", *heads, "age_reg"]
    assert probs["ImageID"].tolist() == single["image_ids"] and (probs["age_threshold"] == 60).all()
    for head in ("mask", "gender", "age"):
        assert np.allclose(probs.filter(regex=rf"^{head}_\d+$").sum(1), 1, atol=1e-5), head
    redo = run_predict("--from-probs", single["dir"] / "probs.csv", "--out", tmp_path / "redo.csv")
    assert (tmp_path / "redo.csv").read_bytes() == (single["dir"] / "sub.csv").read_bytes()
    assert np.array_equal(redo["ensemble"].pred, single["ensemble"].pred)
    # a file written by hand, without the checkpoint and age_threshold columns, is read the same way
    probs.drop(columns=["checkpoint", "age_threshold"]).to_csv(tmp_path / "by_hand.csv", index=False)
    run_predict("--from-probs", tmp_path / "by_hand.csv", "--out", tmp_path / "by_hand_sub.csv")
    assert (tmp_path / "by_hand_sub.csv").read_bytes() == (single["dir"] / "sub.csv").read_bytes()


# ---------------------------------------------------------------- ensembles
def test_soft_ensemble_averages_each_head(ensemble, single, pair):
    members = ensemble["member_probs"]
    assert [m.path for m in ensemble["members"]] == [str(pair[0]), str(pair[1])]  # the glob, sorted
    assert np.allclose(members[0]["mask"], single["member_probs"][0]["mask"], atol=1e-6)
    mean = {k: (members[0][k] + members[1][k]) / 2 for k in ("mask", "gender", "age")}
    expected = np.asarray(recombine(mean)).argmax(1)
    assert np.array_equal(ensemble["ensemble"].pred, expected)
    sub = pd.read_csv(ensemble["dir"] / "soft.csv")
    assert np.array_equal(sub["ans"].to_numpy(), expected)
    saved = pd.read_csv(ensemble["dir"] / "probs.csv")
    assert len(saved) == 2 * len(sub) and saved["checkpoint"].unique().tolist() == [str(c) for c in pair]


def test_hard_ensemble_votes_and_ties_go_to_soft(ensemble, pair, synthetic_data, cache_dir, tmp_path):
    probs = ensemble["dir"] / "probs.csv"
    a, b = (predict_classes(p) for p in ensemble["member_probs"])
    hard = run_predict("--from-probs", probs, "--ensemble", "hard", "--out", tmp_path / "hard.csv")["ensemble"].pred
    soft = np.asarray(recombine(ensemble["ensemble"].probs))
    rows = np.arange(len(a))
    assert np.array_equal(hard[a == b], a[a == b])
    # two equal votes: a tie between the two answers, won by the one the soft ensemble finds likelier
    assert np.array_equal(hard, np.where(soft[rows, a] >= soft[rows, b], a, b))
    assert (a != b).any() and (a == b).any(), "the pair agrees on bare faces and disagrees on masked ones"
    voted = combine(ensemble["member_probs"], method="hard")
    assert np.array_equal(voted.pred, hard)
    run_predict("--checkpoint", *pair, "--data", synthetic_data, "--ensemble", "hard", "--out",
                tmp_path / "direct.csv", cache_dir=cache_dir)
    assert (tmp_path / "direct.csv").read_bytes() == (tmp_path / "hard.csv").read_bytes()
    weighted = run_predict("--from-probs", probs, "--ensemble", "hard", "--weights", "1", "3", "--out",
                           tmp_path / "w.csv")["ensemble"].pred
    assert np.array_equal(weighted, b)
    only_first = run_predict("--from-probs", probs, "--weights", "1", "0", "--out", tmp_path / "w0.csv")
    assert np.array_equal(only_first["ensemble"].pred, a)


def test_weights_must_fit_the_members(ensemble, tmp_path):
    with pytest.raises(ConfigError, match="2 ensemble member"):
        run_predict("--from-probs", ensemble["dir"] / "probs.csv", "--weights", "1", "--out", tmp_path / "x.csv")
    with pytest.raises(ConfigError, match="non-negative"):
        run_predict("--from-probs", ensemble["dir"] / "probs.csv", "--weights", "1", "-1", "--out",
                    tmp_path / "x.csv")
    assert only_files(tmp_path) == []


# ---------------------------------------------------------------- TTA
class _Tensors(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


def test_hflip_tta_is_the_mean_of_the_photo_and_its_mirror(ckpts):
    model = checkpoint.build_model(checkpoint.load(ckpts[0]))
    images = torch.randn(6, 3, 52, 40, generator=torch.Generator().manual_seed(0))
    loader = lambda x: torch.utils.data.DataLoader(_Tensors(x), batch_size=4)  # noqa: E731
    plain = predict_probs(model, loader(images), torch.device("cpu"))
    mirrored = predict_probs(model, loader(torch.flip(images, dims=[3])), torch.device("cpu"))
    tta = predict_probs(model, loader(images), torch.device("cpu"), tta=("hflip",))
    for key in plain:
        assert np.allclose(tta[key], (plain[key] + mirrored[key]) / 2, atol=1e-5), key


def test_tta_changes_nothing_for_symmetric_photos(ckpts, synthetic_data, cache_dir, tmp_path):
    data = eval_subset(synthetic_data, tmp_path / "data", n=8, info=False)
    ids = []
    for path in sorted((data / "eval" / "images").iterdir()):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        half = pixels[:, : pixels.shape[1] // 2]
        Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(path.with_suffix(".png"))
        path.unlink()
        ids.append(path.with_suffix(".png").name)
    pd.DataFrame({"ImageID": ids, "ans": 0}).to_csv(data / "eval" / "info.csv", index=False)
    runs = [run_predict("--checkpoint", ckpts[0], "--data", data, "--out", tmp_path / f"{tta}.csv", "--tta", tta,
                        cache_dir=cache_dir) for tta in ("none", "hflip")]
    plain, flipped = (r["member_probs"][0] for r in runs)
    for key in plain:
        assert np.allclose(plain[key], flipped[key], atol=1e-5), key
    assert (tmp_path / "none.csv").read_bytes() == (tmp_path / "hflip.csv").read_bytes()


# ---------------------------------------------------------------- validation report
def test_validation_report_agrees_with_training(ckpts, trained_run, synthetic_data, cache_dir, tmp_path):
    report = tmp_path / "report"
    result = run_predict("--checkpoint", ckpts[0], "--data", synthetic_data, "--validate", "--fold", "0",
                         "--report", report, "--mistakes", "12", cache_dir=cache_dir)
    for name in ("metrics.json", "per_class.csv", "confusion_18.png", "confusion_mask.png", "confusion_gender.png",
                 "confusion_age.png", "mistakes.png", "mistakes.csv", "predictions.csv", "people.csv", "report.md"):
        assert (report / name).is_file(), name
    saved = json.loads((report / "metrics.json").read_text())
    # the same people, preprocessing and recombination as training's validation: the same F1
    assert saved["metrics"]["f1"] == pytest.approx(checkpoint.load(ckpts[0])["metrics"]["f1"], abs=1e-6)
    assert saved["fold"] == 0 and saved["photos"] == len(result["image_ids"])
    per_class = pd.read_csv(report / "per_class.csv")
    assert per_class.groupby("task").size().to_dict() == {"18": 18, "mask": 3, "gender": 2, "age": 3}
    mistakes = pd.read_csv(report / "mistakes.csv", dtype={"person_id": str})
    assert len(mistakes) and (mistakes["true"] != mistakes["pred"]).all()
    assert mistakes["confidence"].is_monotonic_decreasing
    people = pd.read_csv(report / "predictions.csv", dtype={"person_id": str})["person_id"]
    assert set(mistakes["person_id"]) <= set(people) and result["metrics"] == saved["metrics"]
    assert "18-class F1" in result["log"]
    text = (report / "report.md").read_text()
    assert "mistakes.png" in text and "confusion_18.png" in text


def test_the_report_names_age_groups_at_the_checkpoints_threshold(synthetic_data, cache_dir, tmp_path):
    from tests.tiny_checkpoints import untrained_checkpoint
    at59 = untrained_checkpoint(tmp_path / "at59.pt", age_threshold=59)
    report = tmp_path / "report"
    run_predict("--checkpoint", at59, "--data", synthetic_data, "--validate", "--report", report, "--workers", "0",
                cache_dir=cache_dir)
    per_class = pd.read_csv(report / "per_class.csv")
    assert per_class[per_class["task"] == "age"]["name"].tolist() == ["<30", "30-58", "59+"]
    assert per_class[per_class["task"] == "18"]["name"].tolist()[:3] == ["wear/male/<30", "wear/male/30-58",
                                                                        "wear/male/59+"]
    people = pd.read_csv(report / "people.csv")
    assert set(people["age_group"]) <= {"<30", "30-58", "59+"} and json.loads(
        (report / "metrics.json").read_text())["age_threshold"] == 59


# ---------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def aged(ckpts, tmp_path_factory):
    """best.pt holding a constructed calibration whose age offset turns every answer to 60+."""
    return with_calibration(ckpts[0], tmp_path_factory.mktemp("aged") / "aged.pt")


def test_a_checkpoints_calibration_changes_its_answers_and_no_calibration_gives_the_raw_ones(aged, single, tmp_path):
    from mtl.calibration import Calibration, apply
    raw_answers = pd.read_csv(single["dir"] / "sub.csv")["ans"]
    assert (raw_answers % 3 != 2).mean() > 0.5  # the trained model calls most people younger than 60
    result = run_predict("--checkpoint", aged, "--data", single["data"], "--out", tmp_path / "sub.csv",
                         "--save-probs", tmp_path / "probs.csv", cache_dir=single["cache_dir"])
    assert (pd.read_csv(tmp_path / "sub.csv")["ans"] % 3 == 2).all()  # every answer 60+
    assert "calibrated (1 of 1 checkpoint(s) hold offsets)" in result["log"]
    cal = Calibration.from_dict(checkpoint.load(aged)["calibration"])
    expected = apply(single["member_probs"][0], cal)  # the same network, its offsets applied
    for task in ("mask", "gender", "age"):
        assert np.allclose(result["member_probs"][0][task], expected[task], atol=1e-6), task
        assert np.allclose(result["raw_probs"][0][task], single["member_probs"][0][task], atol=1e-6), task
    # the probability file holds what the member answered: --from-probs redoes the calibrated submission
    saved = pd.read_csv(tmp_path / "probs.csv")
    assert np.allclose(saved[["age_0", "age_1", "age_2"]].to_numpy(), expected["age"], atol=1e-6)
    run_predict("--from-probs", tmp_path / "probs.csv", "--out", tmp_path / "redo.csv")
    assert (tmp_path / "redo.csv").read_bytes() == (tmp_path / "sub.csv").read_bytes()
    plain = run_predict("--checkpoint", aged, "--data", single["data"], "--out", tmp_path / "plain.csv",
                        "--no-calibration", cache_dir=single["cache_dir"])
    assert (tmp_path / "plain.csv").read_bytes() == (single["dir"] / "sub.csv").read_bytes()
    assert "calibration off" in plain["log"]
    with pytest.raises(ConfigError, match="--no-calibration applies where checkpoints run"):
        run_predict("--from-probs", tmp_path / "probs.csv", "--out", tmp_path / "x.csv", "--no-calibration")


def test_an_ensemble_applies_each_members_own_calibration_before_it_votes(aged, ckpts, single, tmp_path):
    from mtl.calibration import Calibration, apply
    plain = tmp_path / "plain.pt"
    shutil.copy(ckpts[0], plain)
    result = run_predict("--checkpoint", aged, plain, "--data", single["data"], "--out", tmp_path / "hard.csv",
                         "--ensemble", "hard", "--weights", "2", "1", cache_dir=single["cache_dir"])
    aged_probs, plain_probs = result["member_probs"]
    cal = Calibration.from_dict(checkpoint.load(aged)["calibration"])
    assert np.allclose(aged_probs["age"], apply(single["member_probs"][0], cal)["age"], atol=1e-6)
    assert np.allclose(plain_probs["age"], single["member_probs"][0]["age"], atol=1e-6)  # its own: offsets of 0
    # the vote counts the calibrated answers: the member of weight 2, always 60+, outvotes the other
    assert np.array_equal(result["ensemble"].pred, predict_classes(aged_probs))
    assert (pd.read_csv(tmp_path / "hard.csv")["ans"] % 3 == 2).all()
    soft = combine(result["member_probs"], [2, 1], "soft")
    assert np.allclose(soft.probs["age"], result["ensemble"].probs["age"], atol=1e-6)


def test_the_validation_report_shows_raw_and_calibrated_f1_and_when_it_is_optimistic(aged, ckpts, single, tmp_path):
    report = tmp_path / "report"
    result = run_predict("--checkpoint", aged, "--data", single["data"], "--validate", "--report", report,
                         "--mistakes", "0", cache_dir=single["cache_dir"])
    saved = json.loads((report / "metrics.json").read_text())
    trained = checkpoint.load(ckpts[0])["metrics"]
    assert saved["metrics"]["f1_raw"] == pytest.approx(trained["f1"], abs=1e-6)  # the network as training saw it
    assert saved["metrics"]["f1_calibrated"] == saved["metrics"]["f1"] < saved["metrics"]["f1_raw"]  # all 60+: worse
    assert saved["calibration"] == {"applied": True, "checkpoints": [str(aged)], "fitted_here": [str(aged)]}
    text = (report / "report.md").read_text()
    assert f"{saved['metrics']['f1_raw']:.4f} raw, {saved['metrics']['f1']:.4f} calibrated" in text
    assert "calibrated F1 is optimistic" in text and "calibrated F1 is optimistic" in result["log"]
    off = run_predict("--checkpoint", aged, "--data", single["data"], "--validate", "--report", tmp_path / "off",
                      "--mistakes", "0", "--no-calibration", cache_dir=single["cache_dir"])
    saved = json.loads((tmp_path / "off" / "metrics.json").read_text())
    assert saved["metrics"]["f1"] == saved["metrics"]["f1_raw"] == pytest.approx(trained["f1"], abs=1e-6)
    assert "f1_calibrated" not in saved["metrics"] and not saved["calibration"]["applied"]
    assert "Calibration off" in (tmp_path / "off" / "report.md").read_text() and "optimistic" not in off["log"]


def test_the_calibrated_figure_is_optimistic_only_on_the_people_it_was_fitted_on(tmp_path):
    from types import SimpleNamespace

    from mtl.reports import ValidationFold, calibration_info
    config = {"data": str(tmp_path / "data"), "fold": 1, "folds": 5, "seed": 42}
    trained = SimpleNamespace(path="a.pt", config=config, checkpoint={}, calibration="offsets")
    soup = SimpleNamespace(path="soup.pt", config=config, calibration="offsets",
                           checkpoint={"soup_validation": {"fold": 2, "folds": 5, "seed": 42}})
    bare = SimpleNamespace(path="b.pt", config=config, checkpoint={}, calibration=None)
    members = [trained, soup, bare]

    def here(fold, data=tmp_path / "data", folds=5, seed=42):
        return calibration_info(members, ValidationFold(None, {}, fold, folds, seed), data, applied=True)["fitted_here"]
    assert here(1) == ["a.pt"] and here(2) == ["soup.pt"] and here(3) == []
    assert here(1, data=tmp_path / "data" / ".." / "data") == ["a.pt"]  # the same folder, written another way
    assert here(1, data=tmp_path / "other") == here(1, folds=4) == here(1, seed=7) == []
    info = calibration_info(members, ValidationFold(None, {}, 1, 5, 42), tmp_path / "data", applied=True)
    assert info["checkpoints"] == ["a.pt", "soup.pt"] and info["applied"]
    assert not calibration_info([bare], ValidationFold(None, {}, 1, 5, 42), tmp_path, applied=True)["applied"]


@pytest.mark.parametrize("record, message", [
    ({"version": 7}, "calibration record version 7 is not one this mtl reads"),
    ({"version": 1, "offsets": {"joint": [0.0] * 18}, "f1_before": 0.5, "f1_after": 0.5, "fitted_on": 300},
     "its calibration was fitted for a joint18 model, but the model is per-task heads"),
])
def test_a_bad_calibration_record_is_one_line_naming_the_checkpoint(record, message, tmp_path, capsys, no_forward):
    from tests.tiny_checkpoints import untrained_checkpoint
    bad = untrained_checkpoint(tmp_path / "bad.pt", calibration=record)
    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: predict.main(["--checkpoint", str(bad), "--data", str(tmp_path), "--out",
                                         str(tmp_path / "sub.csv")]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"error: {bad}: {message}"), err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sub.csv").exists()


# ---------------------------------------------------------------- bad input
def test_missing_info_csv(ckpts, synthetic_data, tmp_path, no_forward):
    data = eval_subset(synthetic_data, tmp_path / "data", info=False)
    with pytest.raises(DataError, match="info.csv not found"):
        run_predict("--checkpoint", ckpts[0], "--data", data, "--out", tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()


def test_info_csv_without_imageid(ckpts, synthetic_data, tmp_path, no_forward):
    data = eval_subset(synthetic_data, tmp_path / "data")
    (data / "eval" / "info.csv").write_text("image,ans\na.jpg,0\n")
    with pytest.raises(DataError, match="missing column.*ImageID"):
        run_predict("--checkpoint", ckpts[0], "--data", data, "--out", tmp_path / "sub.csv")
    assert only_files(tmp_path) == ["data"]


def test_missing_images_are_all_named_before_any_compute(ckpts, synthetic_data, cache_dir, tmp_path, no_forward):
    data = eval_subset(synthetic_data, tmp_path / "data")
    gone = sorted((data / "eval" / "images").iterdir())[:2]
    for path in gone:
        path.unlink()
    with pytest.raises(DataError) as error:
        run_predict("--checkpoint", ckpts[0], "--data", data, "--out", tmp_path / "sub.csv", cache_dir=cache_dir)
    assert str(error.value).count("not found") == 2 and all(path.name in str(error.value) for path in gone)
    assert only_files(tmp_path) == ["data"]


def test_unreadable_image_is_named(ckpts, synthetic_data, cache_dir, tmp_path, no_forward):
    data = eval_subset(synthetic_data, tmp_path / "data")
    broken = sorted((data / "eval" / "images").iterdir())[3]
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(DataError, match="unreadable image") as error:
        run_predict("--checkpoint", ckpts[0], "--data", data, "--out", tmp_path / "sub.csv", "--save-probs",
                    tmp_path / "probs.csv", cache_dir=cache_dir)
    assert broken.name in str(error.value)
    assert only_files(tmp_path) == ["data"]


def test_checkpoints_of_different_schemas_are_refused(ckpts, synthetic_data, tmp_path, no_forward):
    other = torch.load(ckpts[1], map_location="cpu", weights_only=True)
    other["schema"] = labels.LabelSchema(59).to_dict()
    torch.save(other, tmp_path / "threshold59.pt")
    with pytest.raises(ConfigError, match="different schemas"):
        run_predict("--checkpoint", ckpts[0], tmp_path / "threshold59.pt", "--data", synthetic_data, "--out",
                    tmp_path / "sub.csv")
    assert only_files(tmp_path) == ["threshold59.pt"]


def test_output_folder_must_exist(ckpts, synthetic_data, tmp_path, no_forward):
    with pytest.raises(MTLError, match="does not exist"):
        run_predict("--checkpoint", ckpts[0], "--data", synthetic_data, "--out", tmp_path / "nope" / "sub.csv")
    with pytest.raises(MTLError, match="does not exist"):
        run_predict("--checkpoint", ckpts[0], "--data", synthetic_data, "--out", tmp_path / "sub.csv",
                    "--save-probs", tmp_path / "nope" / "probs.csv")
    assert only_files(tmp_path) == []


def test_bad_checkpoint_arguments(ckpts, synthetic_data, tmp_path, no_forward, capsys):
    out = ["--data", synthetic_data, "--out", tmp_path / "sub.csv"]
    with pytest.raises(ConfigError, match="matches no file"):
        run_predict("--checkpoint", str(tmp_path / "runs" / "*" / "best.pt"), *out)
    with pytest.raises(ConfigError, match="checkpoint not found"):
        run_predict("--checkpoint", tmp_path / "missing.pt", *out)
    with pytest.raises(ConfigError, match="2 checkpoint"):
        run_predict("--checkpoint", *ckpts, "--weights", "1", "2", "3", *out)
    with pytest.raises(SystemExit):
        run_predict("--checkpoint", ckpts[0], "--tta", "vflip", *out)
    assert "argument --tta: invalid choice: 'vflip' (choose from 'none', 'hflip')" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="only applies to --validate"):
        run_predict("--checkpoint", ckpts[0], "--skip-bad", *out)
    with pytest.raises(ConfigError, match="exactly one"):
        run_predict("--checkpoint", ckpts[0], "--from-probs", tmp_path / "probs.csv", *out)
    assert only_files(tmp_path) == []


def test_face_crop_settings_must_agree(ckpts, synthetic_data, tmp_path, no_forward):
    cropped = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    cropped["preprocess"]["face_crop"] = {"margin": 0.3, "size": [96, 128]}
    torch.save(cropped, tmp_path / "cropped.pt")
    data = eval_subset(synthetic_data, tmp_path / "data")
    with pytest.raises(ConfigError, match="crop_faces") as error:
        run_predict("--checkpoint", tmp_path / "cropped.pt", "--data", data, "--out", tmp_path / "sub.csv",
                    "--refuse-uncropped")
    assert "uncropped" in str(error.value)
    (data / "face_crop.json").write_text(json.dumps({"margin": 0.5, "size": [96, 128]}))
    with pytest.raises(ConfigError, match="other settings"):
        run_predict("--checkpoint", tmp_path / "cropped.pt", "--data", data, "--out", tmp_path / "sub.csv")
    warnings = []
    check_face_crop(load_members([str(ckpts[0])]), data, log=warnings.append)
    assert len(warnings) == 1 and "uncropped" in warnings[0]
    assert not (tmp_path / "sub.csv").exists()


def test_errors_exit_2_with_one_message(ckpts, synthetic_data, tmp_path, capsys, no_forward):
    argv = ["--checkpoint", str(ckpts[0]), "--data", str(tmp_path), "--out", str(tmp_path / "sub.csv")]
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: predict.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "info.csv not found" in err and "Traceback" not in err


def test_command_line(ckpts, synthetic_data, cache_dir, tmp_path):
    data = eval_subset(synthetic_data, tmp_path / "data", n=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(ckpts[0]), "--data", str(data), "--out",
                           str(tmp_path / "sub.csv"), "--tta", "hflip", "--cache-dir", str(cache_dir), "--workers",
                           "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert len(sub) == 5 and "wrote" in done.stdout


# ---------------------------------------------------------------- photos: 16-bit, tiny, outside eval/images
def test_a_16_bit_png_is_predicted_as_its_8_bit_photo(ckpts, synthetic_data, cache_dir, tmp_path):
    data = eval_subset(synthetic_data, tmp_path / "data", n=4, info=False)
    source = sorted((data / "eval" / "images").iterdir())[0]
    grey = np.asarray(Image.open(source).convert("L"))
    cv2.imwrite(str(data / "eval" / "images" / "deep.png"), grey.astype(np.uint16) * 257)  # 16 bits, same photo
    Image.fromarray(grey).save(data / "eval" / "images" / "plain.png")
    pd.DataFrame({"ImageID": ["deep.png", "plain.png"], "ans": 0}).to_csv(data / "eval" / "info.csv", index=False)
    probs = run_predict("--checkpoint", ckpts[0], "--data", data, "--out", tmp_path / "sub.csv",
                        cache_dir=cache_dir)["member_probs"][0]
    for key in probs:
        assert np.array_equal(probs[key][0], probs[key][1]), key


def test_a_tiny_eval_photo_is_named_before_any_compute(ckpts, synthetic_data, cache_dir, tmp_path, no_forward):
    data = eval_subset(synthetic_data, tmp_path / "data")
    tiny = sorted((data / "eval" / "images").iterdir())[2]
    Image.new("RGB", (1, 1)).save(tiny, format="JPEG")
    with pytest.raises(DataError, match=f"{tiny}: photo is 1x1 px, below the minimum side of 16 px"):
        run_predict("--checkpoint", ckpts[0], "--data", data, "--out", tmp_path / "sub.csv", cache_dir=cache_dir)
    assert only_files(tmp_path) == ["data"]


def test_image_ids_outside_eval_images_are_refused_and_never_cached(ckpts, synthetic_data, tmp_path, no_forward):
    data = eval_subset(synthetic_data, tmp_path / "data")
    info = pd.read_csv(data / "eval" / "info.csv", dtype=str)
    secret = tmp_path / "secret.jpg"
    shutil.copy(data / "eval" / "images" / info["ImageID"][0], secret)
    (data / "eval" / "images" / "link.jpg").symlink_to(secret)
    bad = ["../../secret.jpg", str(secret), "link.jpg"]
    pd.concat([info, pd.DataFrame({"ImageID": bad, "ans": 0})]).to_csv(data / "eval" / "info.csv", index=False)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as error:
        run_predict("--checkpoint", ckpts[0], "--data", data, "--out", tmp_path / "sub.csv", cache_dir=cache)
    for row, image_id in enumerate(bad, start=len(info) + 2):
        assert f"info.csv row {row}: ImageID {image_id!r} does not name a file inside" in str(error.value)
    assert not (tmp_path / "sub.csv").exists()
    assert not cache.exists() or "secret" not in "".join(p.read_text() for p in cache.rglob("index.json"))


# ---------------------------------------------------------------- outputs that cannot be written
@contextlib.contextmanager
def tmpfs(path, size="8k", read_only=False):
    """A real small (or read-only) file system at path: root cannot write past either, unlike a chmod."""
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs",
                               str(path)], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        done = None
    if done is None or done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() if done else 'no mount command'}): needs root "
                    f"or CAP_SYS_ADMIN to make a full or read-only disk")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=30)


def test_unwritable_outputs_are_refused_before_any_compute(ckpts, synthetic_data, tmp_path, no_forward):
    args = ["--checkpoint", ckpts[0], "--data", synthetic_data]
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(ConfigError, match=rf"--out {ro}: cannot write there \(Read-only file system\)"):
            run_predict(*args, "--out", ro / "sub.csv")
        with pytest.raises(ConfigError, match=rf"--save-probs {ro}: cannot write there \(Read-only file system\)"):
            run_predict(*args, "--out", tmp_path / "sub.csv", "--save-probs", ro / "probs.csv")
        with pytest.raises(ConfigError, match=rf"--report {ro}: cannot write there"):
            run_predict(*args, "--validate", "--report", ro / "report")
    with tmpfs(tmp_path / "full", size="4k") as full:
        (full / "filler").write_bytes(bytes(4096))  # the disk is full before the run starts
        with pytest.raises(ConfigError, match=rf"--out {full}: cannot write there \(No space left on device\)"):
            run_predict(*args, "--out", full / "sub.csv")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="is not a regular file"):
        run_predict(*args, "--out", tmp_path / "fifo")
    assert only_files(tmp_path) == ["fifo", "full", "ro"]


@pytest.mark.parametrize("fills", ["--out", "--save-probs"])
def test_a_disk_that_fills_up_loses_only_the_output_that_did_not_fit(single, ckpts, synthetic_data, cache_dir,
                                                                     tmp_path, capsys, fills):
    # an 8 KiB disk takes the write check (4 KiB) but not the submission (~10 KB) nor the probabilities (~60 KB)
    with tmpfs(tmp_path / "small", size="8k") as small:
        paths = {"--out": tmp_path / "sub.csv", "--save-probs": tmp_path / "probs.csv"}
        paths[fills] = small / Path(paths[fills]).name
        argv = ["--checkpoint", str(ckpts[0]), "--data", str(synthetic_data), "--out", str(paths["--out"]),
                "--save-probs", str(paths["--save-probs"]), "--cache-dir", str(cache_dir), "--workers", "0",
                "--no-progress"]
        with pytest.raises(SystemExit) as exit_info:
            main_guard(lambda: predict.main(argv))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err == (f"error: could not write {paths[fills]} (No space left on device); the other outputs were "
                       f"written\n")
        assert only_files(small) == []  # no half-written file left behind
        kept = "--save-probs" if fills == "--out" else "--out"
        assert paths[kept].read_bytes() == (single["dir"] / paths[kept].name).read_bytes()


# ---------------------------------------------------------------- figures a person reads
def text_boxes(fig, texts):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts if t.get_text()]


@pytest.mark.parametrize("n", [3, 12, 48])
@pytest.mark.slow
def test_the_mistakes_title_sits_above_every_caption_and_nothing_is_cut(n):
    from mtl.plots import photo_grid, plt
    names = [labels.LabelSchema().class_name(c) for c in range(labels.NUM_JOINT)]
    captions = [f"{i:06d} incorrect_mask (age 59)\ntrue {names[i % 18]}\npred {names[17 - i % 18]} (0.93)"
                for i in range(n)]
    fig = photo_grid([np.zeros((256, 192, 3), np.uint8)] * n, captions, f"{n} most confident of 97 mistakes", 6)
    title, = text_boxes(fig, [fig._suptitle])
    shown = text_boxes(fig, [ax.title for ax in fig.axes])
    assert len(shown) == n
    page = fig.bbox
    for box in shown + [title]:
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
    assert all(title.y0 >= box.y1 for box in shown)  # display y grows upwards: the title is above each caption
    plt.close(fig)


def test_confusion_matrices_show_every_class_name_whole():
    from mtl.plots import confusion_figure, plt
    for names in ([labels.LabelSchema().class_name(c) for c in range(labels.NUM_JOINT)], labels.MASK_NAMES):
        cm = np.arange(len(names) ** 2).reshape(len(names), -1)
        fig = confusion_figure(cm, names, "18 classes (F1 0.712)")
        ax = fig.axes[0]
        boxes = text_boxes(fig, ax.get_xticklabels() + ax.get_yticklabels() + [ax.title, ax.xaxis.label,
                                                                               ax.yaxis.label])
        assert len(boxes) == 2 * len(names) + 3
        page = fig.bbox
        for box in boxes:
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
        plt.close(fig)


def test_pseudo_label_on_a_disk_that_fills_up_is_one_line_and_leaves_no_file(ckpts, synthetic_data, cache_dir,
                                                                             tmp_path):
    from data_tools import pseudo_label
    with tmpfs(tmp_path / "small", size="8k") as small:
        with pytest.raises(MTLError, match=rf"^could not write {small / 'extra.csv'} \(No space left on device\)$"):
            run_command(pseudo_label, "--checkpoint", ckpts[0], "--data", synthetic_data, "--min-confidence", 0.1,
                        "--out", small / "extra.csv", cache_dir=cache_dir)
        assert only_files(small) == []


def test_a_cache_folder_that_cannot_be_written_is_one_line_naming_it(ckpts, synthetic_data, tmp_path, no_forward):
    data = eval_subset(synthetic_data, tmp_path / "data")
    args = ["--checkpoint", ckpts[0], "--data", data, "--out", tmp_path / "sub.csv"]
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(DataError, match=rf"^cannot use the image cache in {ro}/\d+x\d+ \(Read-only file system\)"):
            run_predict(*args, cache_dir=ro)
    with tmpfs(tmp_path / "full", size="16k") as full:  # room for the index, not for six photos' rows
        with pytest.raises(DataError, match=rf"^cannot use the image cache in {full}/\d+x\d+ \(No space left on dev"):
            run_predict(*args, cache_dir=full)
    assert not (tmp_path / "sub.csv").exists()
