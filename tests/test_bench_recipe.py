"""bench/recipe.py without ../shared: each variant is one change from the pinned baseline, runs interleave by seed,
and the report's figures, paired differences and noise flag are what its docstring says."""
import argparse

import numpy as np
import pandas as pd
import pytest

from bench import recipe
from mtl import config


def budget(**changes):
    args = argparse.Namespace(full=False, people=None, eval_people=None, chips=None, img_size=None, epochs=None,
                              batch_size=None, workers=2, device=None)
    return recipe.budget_from_args(argparse.Namespace(**{**vars(args), **changes}))


def reference_of(name):
    """`a+b+c` changes one setting from `a+b`, `a+b` from `a`; a name with no variant before its `+` is on baseline."""
    head = name.rsplit("+", 1)[0] if "+" in name else ""
    return head if head in recipe.VARIANTS else "baseline"


def test_each_variant_is_one_valid_change_from_the_pinned_baseline_or_the_variant_its_name_extends():
    b = budget()
    assert set(recipe.BASELINE) <= set(config.FIELDS)  # pins are settings, nothing else
    assert reference_of("age_reg_0+real_masks+lr_1e-3") == "age_reg_0+real_masks"
    assert reference_of("age_reg_0+ema") == recipe.NEW_DEFAULTS and reference_of("+real_masks") == "baseline"
    for name in recipe.VARIANTS:
        reference = reference_of(name)
        base = recipe.variant_overrides(reference, b)
        values = recipe.variant_overrides(name, b)
        changed = {k for k in set(values) | set(base) if values.get(k) != base.get(k)}
        if name == "defaults":
            assert set(values) == {"img_size", "epochs"}  # the budget only: configs/default.yaml decides the rest
        elif name == "baseline":
            assert values["img_size"] == [112, 112] and values["epochs"] == 4
        elif name.split("+")[-1].startswith("size_"):
            assert changed == {"img_size", "epochs"}
        else:
            assert len(changed) == 1, (name, changed)
        assert set(recipe.VARIANTS[name] or {}) - {"img_scale", "epoch_scale", "extra_masks", "losses"} <= set(
            recipe.BASELINE), name  # every setting a variant changes is pinned in the baseline
        values.pop("extra_masks", None)
        config.build({**values, "data": "unused"})  # a valid config (nothing is read)
    assert recipe.variant_overrides("mask_ls_0", b)["losses"]["age"] == recipe.BASELINE["losses"]["age"]
    assert recipe.NOT_UNSEEN == {"+real_masks", "age_reg_0+real_masks", "age_reg_0+real_masks+lr_1e-3",
                                 "age_reg_0+real_masks+mask_sqrt_balanced"}  # every variant that imports the half
    new = recipe.variant_overrides("age_reg_0+mask_balanced", b)
    assert new["age_reg_weight"] == 0.0 and new["losses"]["mask"]["class_weights"] == "balanced"
    # the new defaults are configs/default.yaml: every pinned value of `age_reg_0` is what a plain run gets
    defaults = config.build({"data": "unused"})
    pinned = recipe.variant_overrides(recipe.NEW_DEFAULTS, b)
    assert {k: getattr(defaults, k) for k in recipe.BASELINE} == {k: pinned[k] for k in recipe.BASELINE}


def test_image_size_variants_keep_pixels_times_epochs_and_crops_fit_the_largest():
    for b in (budget(), budget(full=True)):
        w, h = b.img_size
        for name in ("size_small", "size_large"):
            v = recipe.variant_overrides(name, b)
            ratio = v["img_size"][0] * v["img_size"][1] * v["epochs"] / (w * h * b.epochs)
            assert 0.9 < ratio < 1.02, (name, v)
            assert all(c >= s for c, s in zip(b.crop_size, v["img_size"]))
    assert recipe.variant_overrides("size_small", budget())["img_size"] == [96, 96]
    assert recipe.variant_overrides("size_large", budget())["epochs"] == 3
    assert budget().crop_size == [128, 128]
    assert recipe.variant_overrides("ema", budget())["ema"] == 0.99
    assert recipe.variant_overrides("baseline", budget(batch_size=8))["batch_size"] == 8


def test_runs_interleave_every_variant_per_seed_in_a_seeded_order():
    names = list(recipe.VARIANTS)
    order = recipe.plan(names, [0, 1, 2])
    assert len(order) == 3 * len(names)
    for k, seed in enumerate((0, 1, 2)):
        block = order[k * len(names):(k + 1) * len(names)]
        assert {s for _, s in block} == {seed} and sorted(n for n, _ in block) == sorted(names)
    firsts = [[n for n, _ in order[k * len(names):(k + 1) * len(names)]] for k in range(3)]
    assert len({tuple(f) for f in firsts}) == 3  # shuffled differently per seed
    assert recipe.plan(names, [1]) == order[len(names):2 * len(names)]  # and the same on a rerun


def rows_for(name, values_by_seed):
    return [{"variant": name, "seed": s, **{k: v + 0.0 for k in recipe.DIFFERENCES}, "facemask_unseen": True}
            for s, v in values_by_seed.items()]


def test_paired_differences_and_the_noise_rule():
    rows = rows_for("baseline", {0: 0.50, 1: 0.60, 2: 0.55}) + rows_for("lr_1e-3", {0: 0.52, 1: 0.62, 2: 0.57})
    rows += rows_for("warmup_0", {0: 0.51, 1: 0.58, 2: 0.56})
    summary, differences = recipe.summarize(rows, ["baseline", "lr_1e-3", "warmup_0"])
    base = summary[0]
    assert base["eval_f1"] == pytest.approx(0.55) and base["eval_f1_sd"] == pytest.approx(0.05)
    lr, warmup = differences
    # the same +0.02 on every seed: sd of the differences 0; within noise, since the baseline's seed sd is 0.05
    assert lr["eval_f1"]["mean"] == pytest.approx(0.02) and lr["eval_f1"]["sd"] == pytest.approx(0.0)
    assert lr["eval_f1"]["within_noise"] and lr["eval_f1"]["noise"] == pytest.approx(0.05)
    assert warmup["eval_f1"]["mean"] == pytest.approx(0.0) and warmup["eval_f1"]["within_noise"]
    calm = rows_for("baseline", {0: 0.50, 1: 0.51, 2: 0.50}) + rows_for("lr_1e-3", {0: 0.60, 1: 0.60, 2: 0.61})
    assert not recipe.summarize(calm, ["baseline", "lr_1e-3"])[1][0]["eval_f1"]["within_noise"]
    text = recipe.tables(summary, differences)
    assert "| lr_1e-3 | +0.020 ± 0.000 ~ |" in text and "0.550 ± 0.050" in text
    # --against: the paired differences are read from another variant, its seed spread sets the noise
    _, against = recipe.summarize(rows, ["baseline", "lr_1e-3", "warmup_0"], against="lr_1e-3")
    assert [d["variant"] for d in against] == ["baseline", "warmup_0"]
    assert against[1]["eval_f1"]["mean"] == pytest.approx(-0.02)
    assert "Paired difference from lr_1e-3" in recipe.tables(summary, against, "lr_1e-3")


def test_against_must_be_run_beside_the_variants(capsys):
    with pytest.raises(SystemExit):
        recipe.main(["--variants", "age_reg_0+ema", "--against", "age_reg_0", "--work", "unused"])
    assert "--against age_reg_0 is not among --variants" in capsys.readouterr().err


def one_hot(classes, n):
    out = np.full((len(classes), n), 0.01)
    out[np.arange(len(classes)), classes] = 1.0
    return out / out.sum(1, keepdims=True)


def test_other_collection_figures_and_the_true_age_boundary():
    # facemask: 3 masked (2 answered right), 2 bare (1 answered not wear)
    facemask = pd.DataFrame({"mask": [0, 0, 1, 2, 2]})
    probs = {"mask": one_hot([0, 2, 1, 2, 0], 3), "gender": one_hot([0] * 5, 2), "age": one_hot([0] * 5, 3)}
    fm = recipe.figures("fm", probs, None, facemask)
    assert fm["fm_real_mask_acc"] == pytest.approx(2 / 3) and fm["fm_bare_not_wear"] == pytest.approx(0.5)
    # chips: a 59-year-old answered with the top age group is wrong at the true boundary of 60
    truth = {"mask": np.full(2, 2), "gender": np.array([0, 1]), "age_years": np.array([59, 64])}
    probs = {"mask": one_hot([2, 0], 3), "gender": one_hot([0, 1], 2), "age": one_hot([2, 2], 3)}
    chips = recipe.figures("chips", probs, truth)
    assert chips["chips_gender_acc"] == 1.0 and chips["chips_not_wear"] == 0.5
    assert chips["chips_age_f1"] == pytest.approx(recipe.figures("eval", probs, truth)["eval_age_f1"])
    assert chips["chips_age_f1"] < 1.0


def test_a_work_folder_refuses_another_budget_so_kept_results_keep_their_meaning(tmp_path):
    settings = {"people": 400, "eval_people": 100, "chips": 300, "proxy_seed": 0, "crop_size": [128, 128],
                "img_size": [112, 112], "epochs": 4, "batch_size": None}
    recipe.check_work(tmp_path / "work", settings)
    recipe.check_work(tmp_path / "work", dict(settings))  # the same budget: fine
    with pytest.raises(SystemExit) as exit_:
        recipe.check_work(tmp_path / "work", {**settings, "epochs": 3})
    assert str(exit_.value) == (f"error: --work {tmp_path / 'work'} was prepared with --epochs 4 (now 3); pass the "
                                f"same budget or choose another --work")


@pytest.mark.slow  # eight fits on 1,500 photos
def test_calibration_comparison_scores_kept_probabilities_on_people_it_never_fitted(tmp_path):
    import json

    from bench import recipe_calibration
    from bench.calibration import synthetic

    def answers(n, seed):  # 60+ under-confident by 2 nats: the age offsets have something to fix
        probs, truth = synthetic(n, seed, bias=2.0)
        return probs, {"mask": truth["mask"], "gender": truth["gender"],
                       "age_years": np.array([20, 40, 70])[truth["age_group"]]}
    (val, val_truth), (evaluated, eval_truth), (fm, fm_truth), (chips, chips_truth) = (
        answers(n, seed) for n, seed in ((1500, 0), (1500, 1), (400, 2), (400, 3)))
    work = tmp_path / "work"
    for name in ("baseline", "+real_masks"):
        folder = recipe.run_folder(work, name, 0)
        folder.mkdir(parents=True)
        recipe.keep_probs(folder / "probs.npz", {"val": val, "eval": evaluated, "fm": fm, "chips": chips}, val_truth,
                          pd.Series(np.arange(1500) // 5).astype(str))
        (folder / "train.json").write_text(json.dumps({"config": {"age_threshold": 60}}))
    prepared = recipe.Prepared(data=None, eval_samples=None, eval_truth=eval_truth,
                               facemask=pd.DataFrame({"mask": fm_truth["mask"]}), chips=None,
                               chips_truth=chips_truth, facemask_extra=None)
    result = recipe_calibration.compare(work, prepared, log=lambda *_: None)
    raw, fitted = result["runs"][1]["raw"], result["runs"][1]["age"]  # sorted: baseline second
    assert result["runs"][1]["variant"] == "baseline"
    assert raw["eval_f1"] == recipe.figures("eval", evaluated, eval_truth)["eval_f1"]  # read back as kept
    assert fitted["moved"] and fitted["eval_f1"] > raw["eval_f1"] + 0.01  # fitted on val, better on eval people
    assert fitted["fm_real_mask_acc"] == raw["fm_real_mask_acc"]  # the age offsets move no mask answer
    age = result["differences"]["age"]
    assert age["eval_f1"]["runs"] == 2 and age["eval_f1"]["mean"] == pytest.approx(fitted["eval_f1"] - raw["eval_f1"])
    assert age["fm_bare_not_wear"]["runs"] == 1  # the run that trained on facemask-dev is not scored on it
    assert result["runs"][0]["raw"]["cross"] is None
    assert "| age |" in recipe_calibration.report(result)


def test_hard_cases_are_the_photos_most_runs_answer_wrong_drawn_with_their_answers(tmp_path):
    import json

    from PIL import Image

    from bench import recipe_hard_cases
    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    paths = []
    for i in range(5):
        paths.append(work / "photos" / f"{i}.png")
        Image.new("RGB", (24, 24), (40 * i, 80, 120)).save(paths[-1])
    # photos 1-3 are bare (not wear = 2); photo 2 is answered wrong by 2 of 3 runs, photo 3 by 1 of 3
    pd.DataFrame({"image_path": [str(p) for p in paths], "mask": [0, 2, 2, 2, 1]}).to_csv(
        work / recipe_hard_cases.LISTING, index=False)
    answers = {("baseline", 0): [0, 2, 0, 2, 1], ("baseline", 1): [0, 2, 1, 0, 1], ("age_reg_0", 0): [0, 2, 2, 2, 1],
               ("+real_masks", 0): [0, 0, 0, 0, 0]}  # trained on facemask-dev: never counted
    for (name, seed), mask in answers.items():
        folder = recipe.run_folder(work, name, seed)
        folder.mkdir(parents=True)
        probs = {"mask": one_hot(mask, 3), "gender": one_hot([0] * 5, 2), "age": one_hot([0] * 5, 3)}
        recipe.keep_probs(folder / "probs.npz", {"fm": probs}, {"mask": np.zeros(1)}, ["p"])
        (folder / "train.json").write_text("{}")
    runs, photos, answered = recipe_hard_cases.answers_by_photo(work, truth=2)
    assert sorted(runs) == [("age_reg_0", 0), ("baseline", 0), ("baseline", 1)] and answered.shape == (3, 3)
    cases = recipe_hard_cases.hard_cases(answered, truth=2)
    assert [c["photo"] for c in cases] == [1]  # photo 2 of the listing: right in 1 of 3 runs (photo 3: 2 of 3)
    assert cases[0]["answers"] == [1, 1, 1] and cases[0]["right"] == pytest.approx(1 / 3)
    out = tmp_path / "hard.png"
    recipe_hard_cases.main(["--work", str(work), "--out", str(out)])
    assert Image.open(out).size[0] > 100
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["photos"] == 3 and written["hard_cases"][0]["image"] == "2.png"
    assert written["share_right"] == pytest.approx(6 / 9)
    with pytest.raises(SystemExit, match="not found: run bench.recipe"):
        recipe_hard_cases.main(["--work", str(tmp_path / "empty"), "--out", str(out)])
