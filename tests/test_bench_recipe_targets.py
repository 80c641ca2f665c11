"""bench/recipe_targets.py on constructed bench.recipe results: the three verdicts of issue 22, paired by seed."""
import json

import pytest

from bench import recipe, recipe_targets

FIGURES = ("cross", "eval_f1", "fm_real_mask_acc", "fm_bare_not_wear", "chips_gender_acc", "chips_age_f1")


def row(name, seed, raw, cal=None):
    values = {"variant": name, "seed": seed, **raw}
    values.update({k + "_cal": v for k, v in (cal or raw).items()})
    return values


def keep(work, name, rows_by_seed):
    for seed, values in rows_by_seed.items():
        recipe.result_path(work, name, seed).write_text(json.dumps(values))


def figures(**changes):
    base = {"cross": 0.70, "eval_f1": 0.46, "fm_real_mask_acc": 0.86, "fm_bare_not_wear": 0.79,
            "chips_gender_acc": 0.78, "chips_age_f1": 0.60}
    return {**base, **changes}


@pytest.fixture
def work(tmp_path):
    work = tmp_path / "work"
    jitter = {0: -0.01, 1: 0.0, 2: 0.01}  # the reference's seed spread: sd 0.01 on every figure
    keep(work, "baseline", {s: row("baseline", s, {k: v + d for k, v in figures().items()},
                                   cal={k: v + d + 0.2 for k, v in figures().items()})  # cal must not be read
                            for s, d in jitter.items()})
    return work


def test_a_candidate_that_lifts_f1_and_bare_faces_meets_every_target(work):
    jitter = {0: -0.01, 1: 0.0, 2: 0.01}
    raw_only = figures(eval_f1=0.40)  # its raw answers would fail: the candidate is judged on its calibrated ones
    keep(work, "age_reg_0", {s: row("age_reg_0", s, raw_only, cal={k: v + d for k, v in figures(
        eval_f1=0.50, fm_bare_not_wear=0.87, cross=0.72).items()}) for s, d in jitter.items()})
    result = recipe_targets.verdicts(recipe_targets.kept_results(work, "baseline"),
                                     recipe_targets.kept_results(work, "age_reg_0"))
    assert result["seeds"] == [0, 1, 2]
    assert result["figures"]["eval_f1"]["difference"] == pytest.approx(0.04)
    assert result["figures"]["fm_bare_not_wear"]["candidate"] == pytest.approx(0.87)
    assert result["f1_gain_met"] and result["bare_share_met"] and result["nothing_worse_met"]


def test_a_small_gain_a_short_bare_share_and_a_loss_beyond_the_spread_are_each_not_met(work):
    keep(work, "age_reg_0+lr_1e-3", {s: row("age_reg_0+lr_1e-3", s, figures(
        eval_f1=0.47 + 0.01 * s, fm_bare_not_wear=0.84, fm_real_mask_acc=0.80, chips_age_f1=0.595))
        for s in (0, 1, 2)})
    result = recipe_targets.verdicts(recipe_targets.kept_results(work, "baseline"),
                                     recipe_targets.kept_results(work, "age_reg_0+lr_1e-3"), candidate_answers="raw")
    assert result["figures"]["eval_f1"]["difference"] == pytest.approx(0.02)
    assert not result["f1_gain_met"] and not result["bare_share_met"]
    # real masks fell 0.06 against a spread of 0.01; chips age F1 fell 0.005, within it
    assert result["worse_beyond_noise"] == ["fm_real_mask_acc"] and not result["nothing_worse_met"]
    text = recipe_targets.report({**result, "answers": ["raw", "raw"], "candidate_trained_on_facemask": False},
                                 "baseline", "age_reg_0+lr_1e-3")
    assert "worse: real masks, mask acc" in text and text.count("**not met**") == 3


def test_the_command_prints_the_verdicts_writes_json_and_names_what_is_missing(work, tmp_path, capsys):
    keep(work, "age_reg_0+real_masks", {s: row("age_reg_0+real_masks", s, figures(
        eval_f1=0.50 + 0.01 * s, fm_bare_not_wear=0.88, fm_real_mask_acc=0.95)) for s in (0, 1)})
    out = tmp_path / "targets.json"
    recipe_targets.main(["--work", str(work), "--candidate", "age_reg_0+real_masks", "--out", str(out)])
    text = capsys.readouterr().out
    assert "seeds 0, 1" in text and "collection it has seen" in text  # trained on the other facemask-dev half
    saved = json.loads(out.read_text())
    assert saved["seeds"] == [0, 1] and saved["f1_gain_met"] and saved["candidate_trained_on_facemask"]
    with pytest.raises(SystemExit, match=r"seeds \[2\] are not kept for both"):
        recipe_targets.main(["--work", str(work), "--candidate", "age_reg_0+real_masks", "--seeds", "0", "2"])
    with pytest.raises(SystemExit) as exit_info:
        recipe_targets.main(["--work", str(work), "--candidate", "age_reg_0+ema"])
    assert exit_info.value.code == 2
    assert "no kept run of age_reg_0+ema" in capsys.readouterr().err
