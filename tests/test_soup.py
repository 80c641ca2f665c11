"""mtl.soup: the greedy soup never scores below its best ingredient, loads in predict.py, refuses mixed ingredients."""
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from mtl import checkpoint, predict, soup
from mtl.errors import ConfigError
from mtl.members import load_members, predict_members
from mtl.metrics import score
from mtl.reports import truth_of, validation_fold


def quiet(*args):
    return [str(a) for a in args] + ["--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def ingredients(trained_run):
    out = Path(trained_run["out"])
    return [out / "best.pt", out / "last.pt"]


@pytest.fixture(scope="module")
def made(ingredients, synthetic_data, cache_dir, tmp_path_factory):
    """A soup of best.pt and last.pt (given as a glob) on fold 0."""
    out = tmp_path_factory.mktemp("soup") / "soup.pt"
    logs = []
    args = soup.get_args_parser().parse_args(quiet("--checkpoints", str(ingredients[0].parent / "*.pt"), "--data",
                                                   synthetic_data, "--fold", 0, "--out", out, "--cache-dir",
                                                   cache_dir))
    return {"soup": soup.make_soup(args, log=logs.append), "out": out, "log": logs}


def test_soup_never_scores_below_its_best_ingredient(made, ingredients, synthetic_data, cache_dir):
    members = load_members([str(p) for p in [made["out"], *ingredients]])
    split = validation_fold(members, synthetic_data, fold=0, cache_dir=cache_dir, workers=0, progress=False,
                            log=lambda *_: None)
    probs = predict_members(members, split.samples, split.sources, workers=0, progress=False)
    schema = members[0].schema
    truth = truth_of(split.samples, schema)
    f1 = [score(p, truth, schema)["f1"] for p in probs]
    assert f1[0] >= max(f1[1:]) - 1e-9, f1
    assert f1[0] == pytest.approx(made["soup"].metrics["f1"], abs=1e-9)
    assert [row["f1"] for row in made["soup"].table] == pytest.approx(sorted(f1[1:], reverse=True), abs=1e-9)
    assert any("decision" in line and "soup F1" in line for line in made["log"])


def test_soup_is_a_checkpoint_predict_loads(made, ingredients, synthetic_data, cache_dir, tmp_path):
    saved = checkpoint.load(made["out"])
    best = checkpoint.load(ingredients[0])
    for key in ("model", "config", "schema", "preprocess", "epoch", "metrics", "soup"):
        assert key in saved, key
    assert saved["schema"] == best["schema"] and saved["preprocess"] == best["preprocess"]
    table = made["soup"].table
    assert saved["soup"] == [table[0]["path"]] + [r["path"] for r in table[1:] if r["kept"]]
    assert saved["soup_validation"]["fold"] == 0 and saved["metrics"]["f1"] == pytest.approx(
        made["soup"].metrics["f1"])
    logs = []
    args = predict.get_args_parser().parse_args(quiet("--checkpoint", made["out"], "--data", synthetic_data, "--out",
                                                      tmp_path / "sub.csv", "--cache-dir", cache_dir))
    predict.run(args, log=logs.append)
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert sub["ImageID"].tolist() == pd.read_csv(synthetic_data / "eval" / "info.csv")["ImageID"].tolist()


def test_the_soup_is_calibrated_on_its_own_probabilities_not_an_ingredients(made, ingredients, synthetic_data,
                                                                             cache_dir, tmp_path):
    from mtl.calibration import Calibration
    from tests.tiny_checkpoints import with_calibration
    saved = checkpoint.load(made["out"])
    photos = len(checkpoint.load(ingredients[0])["validation"]["person_id"])
    assert saved["calibration"]["fitted_on"] == photos and made["soup"].calibration.to_dict() == saved["calibration"]
    assert saved["soup_validation"]["data"] == str(synthetic_data)
    # an ingredient holding constructed offsets: the soup refits on fold 0 instead of keeping them
    aged = with_calibration(ingredients[0], tmp_path / "aged.pt")
    argv = quiet("--checkpoints", aged, "--data", synthetic_data, "--fold", 0, "--cache-dir", cache_dir)
    made_again = soup.make_soup(soup.get_args_parser().parse_args(argv + ["--out", str(tmp_path / "soup.pt")]),
                                log=lambda *_: None)
    refit = Calibration.from_dict(checkpoint.load(tmp_path / "soup.pt")["calibration"])
    assert refit == made_again.calibration != Calibration.from_dict(checkpoint.load(aged)["calibration"])
    assert refit.fitted_on == photos and refit.is_identity and "(< 200)" in refit.notes[0]  # too few photos to move
    soup.make_soup(soup.get_args_parser().parse_args(argv + ["--out", str(tmp_path / "raw.pt"), "--no-calibration"]),
                   log=lambda *_: None)
    assert checkpoint.load(tmp_path / "raw.pt")["calibration"] is None


def test_average_states_keeps_integer_buffers_of_the_first():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.float16), "n": torch.tensor(9)}
    mean = soup.average_states([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and mean["h"].dtype == torch.float16
    assert float(mean["h"]) == 1.5 and int(mean["n"]) == 3 and mean["n"].dtype == a["n"].dtype


def test_greedy_keeps_only_what_does_not_hurt():
    # F1 peaks where the averaged weight is 1.0: own F1 a 0.4, b 0.6, c -1.0, d 0.8 -> tried in the order d, b, a, c
    members = [SimpleNamespace(path=p, checkpoint={"model": {"w": torch.tensor(w)}}) for p, w in
               (("a", 0.4), ("b", 1.4), ("c", 3.0), ("d", 0.8))]

    def fake_score(state, desc=""):
        return {"f1": 1.0 - abs(float(state["w"]) - 1.0)}

    result = soup.greedy_soup(members, fake_score, log=lambda *_: None)
    decisions = [(row["path"], row["kept"]) for row in result.table]
    assert decisions == [("d", True), ("b", True), ("a", False), ("c", False)]  # d+b: 1.1; +a: 0.87; +c: 1.73
    assert float(result.state["w"]) == pytest.approx(1.1) and result.metrics["f1"] == pytest.approx(0.9)
    assert result.kept == [3, 1]


def test_ingredients_must_share_the_architecture(ingredients, synthetic_data, tmp_path):
    other = torch.load(ingredients[1], map_location="cpu", weights_only=True)
    other["config"]["arch"] = "joint18"
    other["calibration"] = None  # NOTE: a joint18 model's calibration has other offsets (refused when it is read)
    torch.save(other, tmp_path / "joint18.pt")
    args = soup.get_args_parser().parse_args(quiet("--checkpoints", ingredients[0], tmp_path / "joint18.pt",
                                                   "--data", synthetic_data, "--out", tmp_path / "soup.pt"))
    with pytest.raises(ConfigError, match="--arch joint18"):
        soup.make_soup(args, log=lambda *_: None)
    other = torch.load(ingredients[1], map_location="cpu", weights_only=True)
    other["preprocess"]["img_size"] = [56, 72]
    torch.save(other, tmp_path / "bigger.pt")
    args.checkpoints = [str(ingredients[0]), str(tmp_path / "bigger.pt")]
    with pytest.raises(ConfigError, match="preprocessing"):
        soup.make_soup(args, log=lambda *_: None)
    assert not (tmp_path / "soup.pt").exists()


def test_a_glob_matching_nothing_is_named(synthetic_data, tmp_path):
    args = soup.get_args_parser().parse_args(quiet("--checkpoints", str(tmp_path / "runs*" / "best.pt"), "--data",
                                                   synthetic_data, "--out", tmp_path / "soup.pt"))
    with pytest.raises(ConfigError, match="matches no file"):
        soup.make_soup(args, log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_fold_and_tta_flags_read_as_predict_and_pseudo_label_read_them():
    from data_tools import pseudo_label
    common = ["--checkpoint", "a.pt", "--tta", "hflip", "--fold", "2", "--folds", "4", "--seed", "7", "--relabel",
              "none", "--skip-bad"]
    keys = ("tta", "fold", "folds", "seed", "relabel", "skip_bad")
    read = [vars(p.get_args_parser().parse_args(common)) for p in (predict, soup)]
    assert [{k: r[k] for k in keys} for r in read] == [dict(zip(keys, (["hflip"], 2, 4, 7, "none", True)))] * 2
    ours = vars(pseudo_label.get_args_parser().parse_args(["--checkpoint", "a.pt", "--out", "x.csv", "--tta", "hflip",
                                                            "--weights", "1", "2"]))
    assert (ours["tta"], ours["weights"]) == (["hflip"], [1.0, 2.0])
    assert vars(predict.get_args_parser().parse_args(["--checkpoint", "a.pt"]))["tta"] == ["none"]
