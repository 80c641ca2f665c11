"""data_tools.pseudo_label: confident tasks become labels (mostly right), the rest stay unknown, the table trains,
and bad input stops with one line before any forward pass and with nothing written."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_tools import pseudo_label
from mtl import checkpoint, data, labels
from mtl.cli import main_guard
from mtl.dataset import DataSpec, FaceDataset, load_fold
from tests.helpers import ROOT, run_command


def run_pl(*args, cache_dir=None) -> dict:
    return run_command(pseudo_label, *args, cache_dir=cache_dir)


def exit_code(argv) -> int:
    """The command line in-process, as `python -m data_tools.pseudo_label` runs it: its exit code."""
    try:
        main_guard(lambda: pseudo_label.main([*map(str, argv), "--workers", "0", "--no-progress"]))
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.fixture(scope="module")
def best(trained_run):
    return Path(trained_run["out"]) / "best.pt"


@pytest.fixture(scope="module")
def labelled(best, synthetic_data, cache_dir, tmp_path_factory):
    """best.pt on the whole synthetic eval set at --min-confidence 0.9, with the truth alongside."""
    out = tmp_path_factory.mktemp("pseudo") / "extra.csv"
    result = run_pl("--checkpoint", best, "--data", synthetic_data, "--min-confidence", 0.9, "--out", out,
                    cache_dir=cache_dir)
    truth = pd.read_csv(synthetic_data / "eval_truth.csv")
    assert truth["ImageID"].tolist() == result["image_ids"]
    return {**result, "truth": {"mask": truth["mask"].to_numpy(), "gender": truth["gender"].to_numpy(),
                                "age": result["schema"].group(truth["age"].to_numpy())}}


@pytest.fixture
def no_forward(monkeypatch):
    """Make any model forward fail the test: bad input must be refused before compute."""
    def refuse(*_, **__):
        raise AssertionError("a model ran on bad input")
    monkeypatch.setattr("mtl.members.predict_members", refuse)


def eval_subset(synthetic_data, dest, n=6) -> Path:
    """A data folder with the first n eval photos of the synthetic set and their info.csv rows."""
    table = pd.read_csv(synthetic_data / "eval" / "info.csv", dtype=str).head(n)
    (dest / "eval" / "images").mkdir(parents=True)
    for image_id in table["ImageID"]:
        shutil.copy(synthetic_data / "eval" / "images" / image_id, dest / "eval" / "images" / image_id)
    table.to_csv(dest / "eval" / "info.csv", index=False)
    return dest


# ---------------------------------------------------------------- the model's labels
def test_confident_labels_are_mostly_right(labelled):
    found, truth, probs = labelled["labels"], labelled["truth"], labelled["result"].probs
    correct = known = 0
    for task in labelled["truth"]:
        group = found["age_group" if task == "age" else task]
        kept = group >= 0
        overall = float((probs[task].argmax(1) == truth[task]).mean())
        accuracy = float((group[kept] == truth[task][kept]).mean())
        print(f"{task}: {int(kept.sum())}/{len(kept)} labelled at 0.9, accuracy {accuracy:.3f} (all photos "
              f"{overall:.3f})")
        # NOTE: measured with the 8-epoch fixture: mask 108/210 at 0.963 (all 0.781), gender 81 at 0.951 (0.790),
        # age 119 at 0.807 (0.757); the bars below leave room for a better or slightly different fixture model
        assert kept.sum() >= 0.2 * len(kept), task
        assert accuracy >= overall - 0.02, (task, accuracy, overall)
        correct, known = correct + int((group[kept] == truth[task][kept]).sum()), known + int(kept.sum())
        if task == "mask":
            assert accuracy >= 0.85
    assert correct / known >= 0.8, correct / known


def test_the_table_holds_the_confident_tasks_and_reads_back(labelled, synthetic_data):
    found, out = labelled["labels"], labelled["out"]
    table = data.read_extra(out)
    written = pd.read_csv(out, dtype=str)
    keep = (found["mask"] >= 0) | (found["gender"] >= 0) | (found["age_group"] >= 0)
    assert 0 < len(table) == int(keep.sum()) <= len(keep)
    ids = [i for i, k in zip(labelled["image_ids"], keep) if k]
    assert table["person_id"].tolist() == [f"pseudo:{i}" for i in ids]
    assert table["image_path"].tolist() == [str(synthetic_data.resolve() / "eval" / "images" / i) for i in ids]
    assert all(Path(p).is_absolute() for p in written["path"])  # the CSV lies outside the data folder
    for task in ("mask", "gender"):
        assert table[task].tolist() == found[task][keep].tolist()
    assert labelled["schema"].group(table["age"].to_numpy()).tolist() == found["age_group"][keep].tolist()
    assert not (table[["mask", "gender", "age"]] == labels.UNKNOWN).all(axis=1).any()  # no all-unknown rows
    reg = np.round(labelled["result"].probs["age_reg"]).astype(int)
    assert found["age_from_reg"].any()
    assert np.array_equal(found["age_years"][found["age_from_reg"]], reg[found["age_from_reg"]])
    log = labelled["log"]
    for task in labels.TASKS:
        values = found["age_group" if task == "age" else task]
        assert f"{int((values >= 0).sum())} labelled" in log and f"{int((values < 0).sum())} unknown" in log
    assert "only legitimate where the competition allows it" in log


def test_the_bar_decides_what_stays_unknown(labelled):
    probs, schema = labelled["result"].probs, labelled["schema"]
    unknown = {}
    for bar in (0.0, 0.5, 0.9, 0.99, 1.0):
        found = pseudo_label.pseudo_labels(probs, pseudo_label.check_bars(bar), schema)
        unknown[bar] = {task: int((found["age_group" if task == "age" else task] < 0).sum()) for task in labels.TASKS}
    print(unknown)
    n = len(probs["mask"])
    assert unknown[0.0] == {task: 0 for task in labels.TASKS}
    for task in labels.TASKS:
        counts = [unknown[bar][task] for bar in sorted(unknown)]
        assert counts == sorted(counts), task  # a higher bar never labels more
    assert sum(unknown[0.99].values()) > sum(unknown[0.9].values()) > sum(unknown[0.5].values())
    # NOTE: float32 probabilities can round to exactly 1 for a very sure model, so "nearly", not "all"
    assert sum(unknown[1.0].values()) >= 0.95 * 3 * n
    # a task's own bar overrides --min-confidence for that task only
    bars = pseudo_label.check_bars(0.9, {"gender": 1.0, "mask": None})
    assert bars == {"mask": 0.9, "gender": 1.0, "age": 0.9}
    found = pseudo_label.pseudo_labels(probs, bars, schema)
    assert (found["gender"] < 0).sum() >= 0.95 * n and (found["mask"] < 0).sum() == unknown[0.9]["mask"]


def test_pseudo_labels_join_the_training_photos(labelled, best, synthetic_data, cache_dir):
    member = checkpoint.load(best)
    load_size = tuple(member["preprocess"]["load_size"])
    fold = load_fold(DataSpec(synthetic_data, extra=(labelled["out"],)), load_size, cache_dir=cache_dir, workers=0,
                     progress=False, log=lambda *_: None)
    extra = fold.train_samples[fold.train_samples["source"] == "extra:extra.csv"]
    table = data.read_extra(labelled["out"])
    assert extra["image_path"].tolist() == table["image_path"].tolist()
    assert not fold.val_samples["person_id"].str.startswith("pseudo:").any()
    rows = np.flatnonzero((fold.train_samples["source"] == "extra:extra.csv").to_numpy())
    targets = FaceDataset(extra.reset_index(drop=True), fold.train_images.take(rows), None,
                          labelled["schema"]).targets()
    found = labelled["labels"]
    keep = (found["mask"] >= 0) | (found["gender"] >= 0) | (found["age_group"] >= 0)
    for key in ("mask", "gender", "age_group"):
        assert targets[key].tolist() == found[key][keep].tolist(), key  # -1 where unknown: masked out of the loss


# ---------------------------------------------------------------- known probabilities, no model
def fake_members(probs):
    """A stand-in for members.predict_members that answers the given per-task probabilities."""
    def answer(members, samples, *_, **__):
        assert len(samples) == len(probs["mask"])
        return [{k: np.asarray(v, dtype=np.float32) for k, v in probs.items()} for _ in members]
    return answer


KNOWN = {  # six photos: what the model says, and what the table must hold at bar 0.9 (threshold 60)
    "mask": [[0.95, 0.03, 0.02], [0.02, 0.97, 0.01], [0.5, 0.3, 0.2], [0.01, 0.01, 0.98], [0.4, 0.3, 0.3],
             [0.1, 0.05, 0.85]],
    "gender": [[0.05, 0.95], [0.6, 0.4], [0.5, 0.5], [0.92, 0.08], [0.5, 0.5], [0.5, 0.5]],
    "age": [[0.96, 0.02, 0.02], [0.3, 0.4, 0.3], [0.4, 0.3, 0.3], [0.01, 0.04, 0.95], [0.02, 0.93, 0.05],
            [0.05, 0.91, 0.04]],
    "age_reg": [22.4, 40.0, 20.0, 63.4, 25.0, 50.6],
}


def test_known_probabilities_give_the_expected_table(best, synthetic_data, cache_dir, tmp_path, monkeypatch):
    root = eval_subset(synthetic_data, tmp_path / "data")
    monkeypatch.setattr("mtl.members.predict_members", fake_members(KNOWN))
    result = run_pl("--checkpoint", best, "--data", root, "--out", root / "extra.csv", cache_dir=cache_dir)
    written = pd.read_csv(root / "extra.csv", dtype=str)
    ids = result["image_ids"]
    # photo 2 has no task at 0.9: left out; photo 4's regressed 25 is not 30-59: the stand-in 45 instead
    assert written["path"].tolist() == [f"eval/images/{ids[i]}" for i in (0, 1, 3, 4, 5)]  # inside: relative
    assert written["person_id"].tolist() == [f"pseudo:{ids[i]}" for i in (0, 1, 3, 4, 5)]
    assert written["mask"].tolist() == ["0", "1", "2", "-1", "-1"]
    assert written["gender"].tolist() == ["1", "-1", "0", "-1", "-1"]
    assert written["age"].tolist() == ["22", "-1", "63", "45", "51"]
    assert "5 of 6 eval photos" in result["log"] and "1 with none left out" in result["log"]
    assert "mask:   3 labelled (wear 1, incorrect 1, not wear 1), 3 unknown (bar 0.9)" in result["log"]
    assert data.read_extra(root / "extra.csv")["image_path"].tolist() == [
        str(root.resolve() / "eval" / "images" / ids[i]) for i in (0, 1, 3, 4, 5)]

    # best.pt and last.pt through a glob: a soft ensemble of two members that agree
    result = run_pl("--checkpoint", best.parent / "*.pt", "--data", root, "--out", root / "extra.csv", "--overwrite",
                    "--no-age-reg", "--min-confidence-mask", 0.8, "--min-confidence-age", 0.99, cache_dir=cache_dir)
    assert [Path(m.path).name for m in result["members"]] == ["best.pt", "last.pt"]
    written = pd.read_csv(root / "extra.csv", dtype=str)
    assert written["path"].tolist() == [f"eval/images/{ids[i]}" for i in (0, 1, 3, 5)]
    assert written["mask"].tolist() == ["0", "1", "2", "2"]
    assert written["age"].tolist() == ["-1", "-1", "-1", "-1"]
    assert not result["labels"]["age_from_reg"].any()
    assert labels.LabelSchema(60).stand_in_years([0, 1, 2]).tolist() == [25, 45, 65]


def test_pseudo_labels_come_from_the_calibrated_answers_unless_told_not_to(best, synthetic_data, cache_dir, tmp_path,
                                                                           monkeypatch):
    from tests.tiny_checkpoints import with_calibration
    root = eval_subset(synthetic_data, tmp_path / "data")
    aged = with_calibration(best, tmp_path / "aged.pt")  # its age offsets make every photo 60+, surely
    monkeypatch.setattr("mtl.members.predict_members", fake_members(KNOWN))
    result = run_pl("--checkpoint", aged, "--data", root, "--out", root / "extra.csv", cache_dir=cache_dir)
    assert result["labels"]["age_group"].tolist() == [2] * 6 and "calibrated (1 of 1" in result["log"]
    assert pd.read_csv(root / "extra.csv", dtype=str)["mask"].tolist() == ["0", "1", "-1", "2", "-1", "-1"]
    raw = run_pl("--checkpoint", aged, "--data", root, "--out", root / "extra.csv", "--overwrite", "--no-calibration",
                 cache_dir=cache_dir)
    assert raw["labels"]["age_group"].tolist() == [0, -1, -1, 2, 1, 1]  # KNOWN's own, as the first test reads them


def test_nothing_confident_writes_nothing(best, synthetic_data, cache_dir, tmp_path, monkeypatch, capsys):
    root = eval_subset(synthetic_data, tmp_path / "data")
    flat = {"mask": np.full((6, 3), 1 / 3), "gender": np.full((6, 2), 0.5), "age": np.full((6, 3), 1 / 3)}
    monkeypatch.setattr("mtl.members.predict_members", fake_members(flat))
    out = tmp_path / "extra.csv"
    assert exit_code(["--checkpoint", best, "--data", root, "--out", out, "--cache-dir", cache_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no eval photo reaches the bar on any task") and "nothing written" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("case, message", [
    ("missing checkpoint", "checkpoint not found: {tmp}/none.pt"),
    ("no info.csv", "eval info.csv not found: {tmp}/data/eval/info.csv"),
    ("missing photo", "1 problem with the eval photos found:\n  {tmp}/data/eval/images/{gone}: listed in info.csv "
                      "but not found"),
    ("out folder missing", "cannot write {tmp}/no/extra.csv: folder {tmp}/no does not exist"),
    ("out exists", "{tmp}/old.csv exists; pass --overwrite to replace it"),
    ("bar above 1", "--min-confidence-age must be a probability from 0 to 1, got 1.5"),
])
def test_bad_input_exits_2_with_one_message(case, message, best, synthetic_data, tmp_path, capsys, no_forward):
    root = eval_subset(synthetic_data, tmp_path / "data", n=3)
    gone = pd.read_csv(root / "eval" / "info.csv")["ImageID"].iloc[1]
    (tmp_path / "old.csv").write_text("keep me\n")
    args = {"--checkpoint": best, "--data": root, "--out": tmp_path / "extra.csv"}
    extra = []
    if case == "missing checkpoint":
        args["--checkpoint"] = tmp_path / "none.pt"
    elif case == "no info.csv":
        (root / "eval" / "info.csv").unlink()
    elif case == "missing photo":
        (root / "eval" / "images" / gone).unlink()
    elif case == "out folder missing":
        args["--out"] = tmp_path / "no" / "extra.csv"
    elif case == "out exists":
        args["--out"] = tmp_path / "old.csv"
    else:
        extra = ["--min-confidence-age", "1.5"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert exit_code([x for k, v in args.items() for x in (k, v)] + extra) == 2, case
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert message.format(tmp=tmp_path, gone=gone) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "old.csv").read_text() == "keep me\n"


def test_help_says_when_pseudo_labels_are_legitimate():
    done = subprocess.run([sys.executable, "-m", "data_tools.pseudo_label", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "only legitimate where the competition allows it" in text and "--min-confidence" in text
    assert "stand-in" in text and "partial-label table" in text
