"""predict.py: the submission follows info.csv and beats chance, ensembles, TTA, probability files, the validation
report, and every bad input stops with a clear error before any forward pass and with nothing written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score

from mtl import checkpoint, labels, predict
from mtl.cli import main_guard
from mtl.errors import ConfigError, DataError, MTLError
from mtl.inference import predict_probs
from mtl.metrics import predict_classes, recombine
from tests.helpers import run_command

ROOT = Path(__file__).resolve().parents[1]


def run_predict(*args, cache_dir=None) -> dict:
    return run_command(predict, *args, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def ckpts(trained_run):
    out = Path(trained_run["out"])
    return out / "best.pt", out / "last.pt"


@pytest.fixture(scope="module")
def single(ckpts, synthetic_data, cache_dir, tmp_path_factory):
    """One checkpoint on the synthetic eval set, with its probabilities saved."""
    out = tmp_path_factory.mktemp("single")
    result = run_predict("--checkpoint", ckpts[0], "--data", synthetic_data, "--out", out / "sub.csv",
                         "--save-probs", out / "probs.csv", cache_dir=cache_dir)
    return {**result, "dir": out}


@pytest.fixture(scope="module")
def ensemble(ckpts, synthetic_data, cache_dir, tmp_path_factory):
    """best.pt and last.pt through a glob, soft, probabilities saved."""
    out = tmp_path_factory.mktemp("ensemble")
    result = run_predict("--checkpoint", str(ckpts[0].parent / "*.pt"), "--data", synthetic_data, "--out",
                         out / "soft.csv", "--save-probs", out / "probs.csv", cache_dir=cache_dir)
    return {**result, "dir": out}


@pytest.fixture
def no_forward(monkeypatch):
    """Make any model forward fail the test: bad input must be refused before compute."""
    def refuse(*_, **__):
        raise AssertionError("a model ran on bad input")
    monkeypatch.setattr(predict, "predict_members", refuse)


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
    assert np.array_equal(redo["result"].pred, single["result"].pred)


# ---------------------------------------------------------------- ensembles
def test_soft_ensemble_averages_each_head(ensemble, single, ckpts):
    members = ensemble["member_probs"]
    assert [m["path"] for m in ensemble["members"]] == [str(ckpts[0]), str(ckpts[1])]  # the glob, sorted
    assert np.allclose(members[0]["mask"], single["member_probs"][0]["mask"], atol=1e-6)
    mean = {k: (members[0][k] + members[1][k]) / 2 for k in ("mask", "gender", "age")}
    expected = np.asarray(recombine(mean)).argmax(1)
    assert np.array_equal(ensemble["result"].pred, expected)
    sub = pd.read_csv(ensemble["dir"] / "soft.csv")
    assert np.array_equal(sub["ans"].to_numpy(), expected)
    saved = pd.read_csv(ensemble["dir"] / "probs.csv")
    assert len(saved) == 2 * len(sub) and saved["checkpoint"].unique().tolist() == [str(c) for c in ckpts]


def test_hard_ensemble_votes_and_ties_go_to_soft(ensemble, ckpts, synthetic_data, cache_dir, tmp_path):
    probs = ensemble["dir"] / "probs.csv"
    a, b = (predict_classes(p) for p in ensemble["member_probs"])
    hard = run_predict("--from-probs", probs, "--ensemble", "hard", "--out", tmp_path / "hard.csv")["result"].pred
    soft = np.asarray(recombine(ensemble["result"].probs))
    rows = np.arange(len(a))
    assert np.array_equal(hard[a == b], a[a == b])
    # two equal votes: a tie between the two answers, won by the one the soft ensemble finds likelier
    assert np.array_equal(hard, np.where(soft[rows, a] >= soft[rows, b], a, b))
    assert (a != b).any(), "best.pt and last.pt should disagree somewhere for this test to mean anything"
    voted = predict.combine(ensemble["member_probs"], method="hard")
    assert np.array_equal(voted.pred, hard)
    direct = run_predict("--checkpoint", *ckpts, "--data", synthetic_data, "--ensemble", "hard", "--out",
                         tmp_path / "direct.csv", cache_dir=cache_dir)
    assert (tmp_path / "direct.csv").read_bytes() == (tmp_path / "hard.csv").read_bytes()
    weighted = run_predict("--from-probs", probs, "--ensemble", "hard", "--weights", "1", "3", "--out",
                           tmp_path / "w.csv")["result"].pred
    assert np.array_equal(weighted, b)
    only_first = run_predict("--from-probs", probs, "--weights", "1", "0", "--out", tmp_path / "w0.csv")
    assert np.array_equal(only_first["result"].pred, a)


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
    symmetric = torch.cat([images[..., :20], torch.flip(images[..., :20], dims=[3])], dim=3)
    assert torch.equal(symmetric, torch.flip(symmetric, dims=[3]))
    plain, tta = (predict_probs(model, loader(symmetric), torch.device("cpu"), tta=t) for t in ((), ("hflip",)))
    for key in plain:
        assert np.allclose(tta[key], plain[key], atol=1e-6), key


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
    assert saved["fold"] == 0 and saved["photos"] == len(result["samples"])
    per_class = pd.read_csv(report / "per_class.csv")
    assert per_class.groupby("task").size().to_dict() == {"18": 18, "mask": 3, "gender": 2, "age": 3}
    mistakes = pd.read_csv(report / "mistakes.csv", dtype={"person_id": str})
    assert len(mistakes) and (mistakes["true"] != mistakes["pred"]).all()
    assert mistakes["confidence"].is_monotonic_decreasing
    assert set(mistakes["person_id"]) <= set(result["samples"]["person_id"])
    assert "18-class F1" in result["log"]
    text = (report / "report.md").read_text()
    assert "mistakes.png" in text and "confusion_18.png" in text


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
    other["schema"] = labels.schema(59)
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


def test_bad_checkpoint_arguments(ckpts, synthetic_data, tmp_path, no_forward):
    out = ["--data", synthetic_data, "--out", tmp_path / "sub.csv"]
    with pytest.raises(ConfigError, match="matches no file"):
        run_predict("--checkpoint", str(tmp_path / "runs" / "*" / "best.pt"), *out)
    with pytest.raises(ConfigError, match="checkpoint not found"):
        run_predict("--checkpoint", tmp_path / "missing.pt", *out)
    with pytest.raises(ConfigError, match="2 checkpoint"):
        run_predict("--checkpoint", *ckpts, "--weights", "1", "2", "3", *out)
    with pytest.raises(ConfigError, match="unknown --tta"):
        run_predict("--checkpoint", ckpts[0], "--tta", "vflip", *out)
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
    predict.check_face_crop([checkpoint.load(ckpts[0])], data, log=warnings.append)
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(ckpts[0]), "--data", str(data), "--out",
                           str(tmp_path / "sub.csv"), "--tta", "hflip", "--cache-dir", str(cache_dir), "--workers",
                           "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert len(sub) == 5 and "wrote" in done.stdout
