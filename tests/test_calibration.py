"""Answers tuned for macro F1 (mtl.calibration): fitted on the data given only, never moving an optimal model,
raising F1 on an imbalanced case (and on photos it was not fitted on), plain-data records, numpy = torch = export."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from bench.calibration import synthetic
from mtl import calibration, labels, metrics
from mtl.calibration import Calibration, CalibrationError
from mtl.errors import ConfigError

SCHEMA = labels.LabelSchema()


def f1(probs, truth) -> float:
    return metrics.score(probs, truth, SCHEMA)["f1"]


def concat(*parts) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def separable(n: int, seed: int = 0, joint: bool = False) -> tuple[dict, dict]:
    """Probabilities that put 0.9 on the true class of every photo: a model no offset can improve."""
    rng = np.random.default_rng(seed)
    truth = {"mask": rng.integers(0, 3, n), "gender": rng.integers(0, 2, n), "age_group": rng.integers(0, 3, n)}
    if joint:
        y = labels.encode(truth["mask"], truth["gender"], truth["age_group"])
        outputs = {"joint": torch.tensor(np.log(np.where(np.eye(18)[y] > 0, 0.9, 0.1 / 17)))}
    else:
        outputs = {t: torch.tensor(np.log(np.where(np.eye(k)[truth[key]] > 0, 0.9, 0.1 / (k - 1))))
                   for t, k, key in (("mask", 3, "mask"), ("gender", 2, "gender"), ("age", 3, "age_group"))}
        outputs["gender"] = outputs["gender"][:, 1] - outputs["gender"][:, 0]
    return {k: v.numpy() for k, v in metrics.head_probs(outputs).items()}, truth


# ---------------------------------------------------------------- the metric
def test_fast_macro_f1_is_the_competition_metric():
    rng = np.random.default_rng(0)
    for n, classes in ((1, 18), (50, 18), (400, 18), (400, 5), (3000, 12)):
        y = rng.integers(0, classes, n)
        preds = rng.integers(0, classes, (6, n))
        preds[0] = y                              # perfect
        preds[1] = np.where(rng.random(n) < 0.5, y, preds[1])
        preds[2] = (y + 1) % 18                   # predicts classes absent from the truth
        fast = calibration.fast_macro_f1(y, preds)
        assert fast.shape == (6,)
        for pred, value in zip(preds, fast):
            assert value == pytest.approx(metrics.macro_f1(y, pred), abs=1e-12)
        assert float(calibration.fast_macro_f1(y, preds[3])) == pytest.approx(metrics.macro_f1(y, preds[3]), abs=1e-12)


# ---------------------------------------------------------------- fit
def test_switch_points_are_argmax_at_each_offset_ties_included():
    rng = np.random.default_rng(0)
    grid = np.arange(-40, 41) * 0.05
    for k in (2, 3, 18):
        probs = np.round(rng.dirichlet(np.ones(k), 400), 1)   # NOTE: rounded, so many exact ties
        probs[:50] = 1.0 / k                                # every class tied
        logp = np.log(np.maximum(probs, calibration.EPS))
        for c in range(k):
            offsets = rng.choice([0.0, 0.5, -0.5, 0.15], k)
            rival, first = calibration.switch_points(logp, offsets, c, grid)
            for g, value in enumerate(grid):
                moved = offsets.copy()
                moved[c] = value
                assert np.array_equal(np.where(first <= g, c, rival), (logp + moved).argmax(1)), (k, c, value)


def test_f1_over_grid_is_the_metric_of_the_answers_at_each_index():
    rng = np.random.default_rng(1)
    for n, steps in ((30, 5), (500, 161), (2000, 40)):
        y, before, after = rng.integers(0, 18, n), rng.integers(0, 18, n), rng.integers(0, 18, n)
        before[: n // 3] = y[: n // 3]
        first = rng.integers(0, steps + 1, n)    # steps + 1: never switched
        got = calibration.f1_over_grid(y, before, after, first, steps)
        answers = np.where(first[None, :] <= np.arange(steps)[:, None], after, before)
        np.testing.assert_allclose(got, calibration.fast_macro_f1(y, answers), atol=1e-12)
        for g in (0, steps // 2, steps - 1):
            assert got[g] == pytest.approx(metrics.macro_f1(y, answers[g]), abs=1e-12)


def test_fit_never_lowers_f1_on_the_photos_it_is_given():
    for seed in range(12):
        for joint in (False, True):
            probs, truth = synthetic(250 + 50 * (seed % 4), seed=seed, bias=(-1.0, 0.0, 1.5)[seed % 3], joint=joint)
            fitted = calibration.fit(probs, truth, SCHEMA)
            assert fitted.f1_after == pytest.approx(f1(calibration.apply(probs, fitted), truth), abs=1e-12)
            if fitted.is_identity:
                assert fitted.f1_after == fitted.f1_before
            else:
                assert fitted.f1_after > fitted.f1_before + calibration.MIN_GAIN


@pytest.mark.parametrize("joint", [False, True], ids=["heads", "joint18"])
def test_a_model_already_optimal_keeps_every_answer(joint):
    probs, truth = separable(600, joint=joint)
    fitted = calibration.fit(probs, truth, SCHEMA)
    assert fitted.is_identity and set(fitted.offsets) == ({"joint"} if joint else {"mask", "gender", "age"})
    assert fitted.f1_before == fitted.f1_after == 1.0 and fitted.fitted_on == 600
    after = calibration.apply(probs, fitted)
    for key in probs:
        assert np.array_equal(after[key], probs[key])  # bit for bit
    assert np.array_equal(metrics.predict_classes(after), metrics.predict_classes(probs))


def test_raises_macro_f1_on_an_imbalanced_case_and_on_photos_not_fitted():
    probs, truth = synthetic(5000, seed=0)  # 60+ is 8% of photos and its probabilities run 1.5 nats low
    fitted = calibration.fit(probs, truth, SCHEMA)
    assert fitted.f1_before == pytest.approx(f1(probs, truth))
    assert fitted.f1_after == pytest.approx(f1(calibration.apply(probs, fitted), truth))
    assert fitted.f1_after > fitted.f1_before + 0.03
    assert fitted.offsets["age"][2] - max(fitted.offsets["age"][:2]) > 0.5  # the under-confident class is raised
    assert all(o[0] == 0.0 for o in fitted.offsets.values())
    assert fitted.notes == ()
    new_probs, new_truth = synthetic(5000, seed=1)
    assert f1(calibration.apply(new_probs, fitted), new_truth) > f1(new_probs, new_truth) + 0.03
    # more 60+ photos found: the rare class's recall rises
    age_before, age_after = (metrics.score(p, new_truth, SCHEMA)["age_f1"]
                             for p in (new_probs, calibration.apply(new_probs, fitted)))
    assert age_after > age_before


def test_joint18_model_gets_18_offsets_and_marginals_of_the_calibrated_distribution():
    probs, truth = synthetic(3000, seed=0, joint=True)
    fitted = calibration.fit(probs, truth, SCHEMA)
    assert list(fitted.offsets) == ["joint"] and len(fitted.offsets["joint"]) == 18
    assert fitted.offsets["joint"][0] == 0.0
    assert fitted.f1_after > fitted.f1_before + 0.03
    new_probs, new_truth = synthetic(5000, seed=1, joint=True)
    after = calibration.apply(new_probs, fitted)
    assert f1(after, new_truth) > f1(new_probs, new_truth) + 0.03
    # exactly what head_probs gives for the joint logits log p + offset: the distribution and its marginals
    logits = torch.tensor(np.log(new_probs["joint"].astype(np.float64)) + np.array(fitted.offsets["joint"]))
    expected = metrics.head_probs({"joint": logits})
    for key in ("joint", "mask", "gender", "age"):
        np.testing.assert_allclose(after[key], expected[key].numpy(), atol=1e-6)
    assert after["joint"].dtype == np.float32


def test_of_equally_good_offsets_the_smallest_wins():
    # every 60+ photo's age probabilities rate 60+ 0.325 below "<30"; every other answer is sure. Raw F1 is 1.0 for
    # any 60+ offset from 0.35 up (the grid's step is 0.05), and F1 averaged over +-SMOOTH (0.8) from 0.35 + 0.8 up
    probs, truth = separable(600)
    old = truth["age_group"] == 2
    probs["age"] = np.where(old[:, None], np.exp([0.0, -12.0, -0.325]), np.where(probs["age"] > 0.5, 0.98, 1e-4))
    probs["age"] /= probs["age"].sum(1, keepdims=True)
    fitted = calibration.fit(probs, truth, SCHEMA)
    assert fitted.f1_after == 1.0 > fitted.f1_before
    assert fitted.offsets["age"] == (0.0, 0.0, pytest.approx(0.35 + calibration.SMOOTH))
    assert fitted.offsets["mask"] == (0.0, 0.0, 0.0) and fitted.offsets["gender"] == (0.0, 0.0)


def test_fit_uses_only_the_data_it_is_given():
    low, low_truth = synthetic(3000, seed=0, bias=1.5)     # 60+ under-confident
    high, high_truth = synthetic(3000, seed=1, bias=-1.5)  # 60+ over-confident
    on_low, on_high = calibration.fit(low, low_truth, SCHEMA), calibration.fit(high, high_truth, SCHEMA)
    assert on_low.fitted_on == on_high.fitted_on == 3000
    assert on_low.offsets["age"][2] > 0 > on_high.offsets["age"][2]
    assert calibration.fit(low, low_truth, SCHEMA) == on_low  # deterministic: nothing but its input matters
    # applied to the other set, each one's offsets go the wrong way there
    assert f1(calibration.apply(high, on_high), high_truth) > f1(high, high_truth) > \
        f1(calibration.apply(high, on_low), high_truth)
    # fitting on both sets is neither set's answer
    both = calibration.fit(concat(low, high), concat(low_truth, high_truth), SCHEMA)
    assert both.fitted_on == 6000 and both.offsets != on_low.offsets and both.offsets != on_high.offsets


def test_photos_with_unknown_truth_are_left_out():
    probs, truth = synthetic(2000, seed=0)
    alone = calibration.fit(probs, truth, SCHEMA)
    # partial-label rows (-1 in some task) whose probabilities would pull the offsets the other way if counted
    noise, noise_truth = synthetic(3000, seed=5, bias=-3.0)
    noise_truth["mask"][:1000] = labels.UNKNOWN
    noise_truth["gender"][1000:2000] = labels.UNKNOWN
    noise_truth["age_group"][2000:] = labels.UNKNOWN
    mixed = calibration.fit(concat(noise, probs), concat(noise_truth, truth), SCHEMA)
    assert mixed == alone and mixed.fitted_on == 2000


def test_truth_in_years_is_read_at_the_schemas_threshold():
    probs, truth = synthetic(2000, seed=0)
    years = SCHEMA.stand_in_years(truth["age_group"])
    years[:100] = labels.UNKNOWN                  # unknown ages: left out
    in_years = {"mask": truth["mask"], "gender": truth["gender"], "age_years": years}
    grouped = {**truth, "age_group": np.where(years < 0, labels.UNKNOWN, truth["age_group"])}
    assert calibration.fit(probs, in_years, SCHEMA) == calibration.fit(probs, grouped, 60)
    assert calibration.fit(probs, in_years, SCHEMA).fitted_on == 1900


def test_too_few_photos_leave_offsets_at_zero_and_say_so():
    probs, truth = synthetic(5000, seed=0)
    few = calibration.fit({k: v[:40] for k, v in probs.items()}, {k: v[:40] for k, v in truth.items()}, SCHEMA)
    assert few.is_identity and few.fitted_on == 40 and few.f1_after == few.f1_before
    assert len(few.notes) == 1 and "only 40 photos" in few.notes[0]
    unknown = {**truth, "mask": np.full(5000, labels.UNKNOWN)}
    none = calibration.fit(probs, unknown, SCHEMA)
    assert none.is_identity and none.fitted_on == 0 and none.f1_before == none.f1_after == 0.0
    assert "no photo" in none.notes[0]


def test_a_class_without_support_keeps_offset_zero_and_says_so():
    probs, truth = synthetic(4000, seed=0)
    keep = truth["mask"] != 1                     # no incorrectly worn mask in this validation set
    fitted = calibration.fit({k: v[keep] for k, v in probs.items()}, {k: v[keep] for k, v in truth.items()}, SCHEMA)
    assert fitted.offsets["mask"][1] == 0.0
    assert fitted.offsets["age"][2] > 0          # what the data supports is still fitted
    assert any(note.startswith("mask:") and "incorrect" in note for note in fitted.notes)


def test_bad_probabilities_are_refused():
    probs, truth = synthetic(300, seed=0)
    with pytest.raises(ValueError, match=r"probs\['age'\] has shape \(299, 3\), expected \(300, 3\)"):
        calibration.fit({**probs, "age": probs["age"][1:]}, truth, SCHEMA)
    with pytest.raises(ValueError, match="missing"):
        calibration.fit({"mask": probs["mask"], "gender": probs["gender"]}, truth, SCHEMA)


# ---------------------------------------------------------------- apply: numpy, torch, export
def test_apply_none_and_mismatched_architectures():
    probs, _ = synthetic(10, seed=0)
    assert calibration.apply(probs, None) is probs and calibration.apply_torch(probs, None) is probs
    heads = Calibration({"mask": (0, 1, 0), "gender": (0, 0), "age": (0, 0, 1)}, 0.5, 0.6, 300)
    joint = Calibration({"joint": (0.5,) * 18}, 0.5, 0.6, 300)
    joint_probs, _ = synthetic(10, seed=0, joint=True)
    with pytest.raises(CalibrationError, match="per-task heads cannot apply to a joint18"):
        calibration.apply(joint_probs, heads)
    with pytest.raises(CalibrationError, match="joint18 model's 18-way probabilities cannot apply"):
        calibration.apply(probs, joint)


def test_apply_is_softmax_of_log_probabilities_plus_offsets_and_keeps_age_reg():
    probs, _ = synthetic(50, seed=0)
    probs["age_reg"] = np.linspace(20, 70, 50, dtype=np.float32)
    cal = Calibration({"mask": (0, -0.5, 1.2), "gender": (0, 0.3), "age": (0, 0, 2.0)}, 0.5, 0.6, 300)
    after = calibration.apply(probs, cal)
    for task, offs in cal.offsets.items():
        expected = torch.softmax(torch.tensor(np.log(probs[task].astype(np.float64)) + np.array(offs)), 1).numpy()
        np.testing.assert_allclose(after[task], expected, atol=1e-6)
        assert after[task].dtype == probs[task].dtype
    assert after["age_reg"] is probs["age_reg"]
    assert probs["mask"].sum() == pytest.approx(50, abs=1e-3)  # the input is not modified
    assert not np.array_equal(after["mask"], probs["mask"])


@pytest.mark.parametrize("joint", [False, True], ids=["heads", "joint18"])
def test_torch_gives_the_numpy_probabilities(joint):
    probs, truth = synthetic(800, seed=2, joint=joint)
    probs["age_reg"] = np.linspace(20, 70, 800, dtype=np.float32)
    fitted = calibration.fit(probs, truth, SCHEMA)
    assert not fitted.is_identity
    rng = np.random.default_rng(0)
    every = Calibration({t: (0.0, *rng.uniform(-2, 2, len(o) - 1)) for t, o in fitted.offsets.items()}, 0.5, 0.6, 800)
    tensors = {k: torch.from_numpy(v) for k, v in probs.items()}
    for cal in (fitted, every):
        expected = calibration.apply(probs, cal)
        layer = calibration.CalibrationLayer(cal)
        assert layer.state_dict() == {}  # the offsets stay out of a model's weights
        for got in (calibration.apply_torch(tensors, cal), layer(tensors)):
            assert list(got) == list(expected)
            for key in expected:
                assert got[key].dtype == torch.float32
                np.testing.assert_allclose(got[key].numpy(), expected[key], atol=1e-6)
            assert torch.equal(metrics.recombine(got).argmax(1), torch.from_numpy(metrics.predict_classes(expected)))


class TinyDeploy(nn.Module):
    """Features in, calibrated probabilities out, as an exported model would compute them."""

    def __init__(self, cal, joint):
        super().__init__()
        torch.manual_seed(0)
        self.joint = joint
        self.body = nn.Linear(6, 18 if joint else 7)
        self.calibrate = calibration.CalibrationLayer(cal)

    def forward(self, x):
        z = self.body(x)
        logits = {"joint": z} if self.joint else {"mask": z[:, :3], "gender": z[:, 3], "age": z[:, 4:]}
        probs = self.calibrate(metrics.head_probs(logits))
        return probs["mask"], probs["gender"], probs["age"], metrics.recombine(probs)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("joint", [False, True], ids=["heads", "joint18"])
def test_exported_model_applies_the_offsets(fmt, joint, tmp_path):
    pytest.importorskip("onnxruntime")
    from mtl import deploy
    offsets = {"joint": tuple(np.linspace(-1, 1, 18))} if joint else \
        {"mask": (0, 0.7, -0.4), "gender": (0, -0.6), "age": (0, 0.2, 1.5)}
    module = TinyDeploy(Calibration(offsets, 0.5, 0.6, 300), joint).eval()
    example = torch.randn(2, 6)
    path = tmp_path / f"tiny.{fmt}"
    deploy.EXPORTERS[fmt](module, (example,), path)
    for batch in (1, 5):  # not the traced batch size
        x = torch.randn(batch, 6, generator=torch.Generator().manual_seed(batch))
        got = list(deploy.RUNNERS[fmt](path, (x,)).values())
        with torch.inference_mode():
            expected = module(x)
            uncalibrated = TinyDeploy(None, joint).eval()(x)
        assert len(got) == 4
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e.numpy(), atol=1e-5)
        assert not np.allclose(got[3], uncalibrated[3].numpy(), atol=1e-3)  # the offsets are in the file


# ---------------------------------------------------------------- the record
def test_record_round_trips_through_json_and_a_weights_only_checkpoint(tmp_path):
    probs, truth = synthetic(3000, seed=0)
    fitted = calibration.fit(probs, truth, SCHEMA)
    few = calibration.fit({k: v[:40] for k, v in probs.items()}, {k: v[:40] for k, v in truth.items()}, SCHEMA)
    joint = Calibration({"joint": tuple(np.linspace(-1, 1, 18))}, 0.25, 0.5, 123, ("a note",))
    for cal in (fitted, few, joint):
        record = cal.to_dict()
        assert Calibration.from_dict(json.loads(json.dumps(record))) == cal
        torch.save({"model": {"w": torch.zeros(2)}, "calibration": record}, tmp_path / "best.pt")
        loaded = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
        assert Calibration.from_dict(loaded["calibration"]) == cal
    assert few.notes and Calibration.from_dict(few.to_dict()).notes == few.notes


GOOD = {"version": 1, "offsets": {"mask": [0, 0.5, -0.5], "gender": [0, 0.1], "age": [0, 0, 1]},
        "f1_before": 0.5, "f1_after": 0.6, "fitted_on": 300, "notes": []}


@pytest.mark.parametrize("record, message", [
    ([1, 2], "must be a mapping, got list"),
    ({**GOOD, "version": 7}, "version 7 is not one this mtl reads"),
    ({k: v for k, v in GOOD.items() if k != "fitted_on"}, "lacks fitted_on"),
    ({**GOOD, "offsets": {"mask": [0, 0, 0]}}, "must be for mask, gender and age, or for joint alone"),
    ({**GOOD, "offsets": {**GOOD["offsets"], "joint": [0] * 18}}, "or for joint alone"),
    ({**GOOD, "offsets": {**GOOD["offsets"], "age": [0, 1]}}, r"offsets\['age'\] must be 3 numbers"),
    ({**GOOD, "offsets": {"joint": [0] * 17}}, r"offsets\['joint'\] must be 18 numbers"),
    ({**GOOD, "offsets": {**GOOD["offsets"], "gender": [0, float("nan")]}}, "must be finite numbers"),
    ({**GOOD, "offsets": {**GOOD["offsets"], "gender": [0, "1"]}}, "must be finite numbers"),
    ({**GOOD, "f1_after": 1.5}, "f1_after must be a number from 0 to 1"),
    ({**GOOD, "fitted_on": -3}, "fitted_on must be a count"),
    ({**GOOD, "fitted_on": 2.5}, "fitted_on must be a count"),
    ({**GOOD, "notes": "one"}, "notes must be a list of strings"),
])
def test_a_bad_record_is_a_one_line_error(record, message):
    assert Calibration.from_dict(GOOD).offsets["gender"] == (0.0, 0.1)
    with pytest.raises(CalibrationError, match=message) as caught:
        Calibration.from_dict(record)
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- cross-validated by person, and which heads move
def people_of(n: int, photos_per_person: int = 7) -> np.ndarray:
    return np.arange(n) // photos_per_person


def test_offsets_that_hold_for_new_people_are_kept_with_their_cross_validated_gain():
    probs, truth = synthetic(3000, seed=0)  # 60+ under-confident by 1.5 nats for everyone: a gain that generalises
    fitted = calibration.fit(probs, truth, SCHEMA, groups=people_of(3000))
    assert not fitted.is_identity and fitted.cv_gain is not None and fitted.cv_gain > 0.01
    assert fitted.offsets == calibration.fit(probs, truth, SCHEMA).offsets  # the check keeps or drops, never moves
    assert Calibration.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted


def test_offsets_fitted_to_noise_are_not_kept_when_they_do_not_hold_for_new_people():
    rng = np.random.default_rng(3)
    n = 700  # 100 people of 7 photos: answers that carry no signal, so whatever offsets win here win by chance
    truth = {"mask": rng.integers(0, 3, n), "gender": np.repeat(rng.integers(0, 2, n // 7), 7),
             "age_group": np.repeat(rng.integers(0, 3, n // 7), 7)}
    probs = {"mask": rng.dirichlet(np.ones(3), n), "gender": rng.dirichlet(np.ones(2), n),
             "age": rng.dirichlet(np.ones(3), n)}
    plain = calibration.fit(probs, truth, SCHEMA)
    assert not plain.is_identity and plain.f1_after > plain.f1_before  # it does fit the noise it is given ...
    checked = calibration.fit(probs, truth, SCHEMA, groups=people_of(n))
    assert checked.is_identity and checked.f1_after == checked.f1_before  # ... which fails on people left out
    assert checked.cv_gain is not None and checked.cv_gain <= calibration.MIN_GAIN
    assert any("cross-validated by person" in note for note in checked.notes)


def test_too_few_people_to_cross_validate_keep_nothing():
    probs, truth = synthetic(600, seed=0)
    fitted = calibration.fit(probs, truth, SCHEMA, groups=np.arange(600) % 6)  # 6 people, 100 photos each
    assert fitted.is_identity and any("too few people" in note for note in fitted.notes)


def test_tasks_names_the_heads_whose_offsets_may_move():
    probs, truth = synthetic(3000, seed=0)
    age_only = calibration.fit(probs, truth, SCHEMA, tasks=("age",))
    assert age_only.offsets["mask"] == (0.0,) * 3 and age_only.offsets["gender"] == (0.0,) * 2
    assert age_only.offsets["age"][2] > 0  # the under-confident 60+ group is raised
    with pytest.raises(ValueError, match="tasks must be among"):
        calibration.fit(probs, truth, SCHEMA, tasks=("age", "colour"))


def test_the_summary_says_what_moved_and_every_note():
    cal = Calibration({"mask": (0, 0.5, 0), "gender": (0, 0), "age": (0, -0.25, 1)}, 0.5, 0.55, 300,
                      ("age: fewer than 5 photos of 60+: offset left at 0",), cv_gain=0.012)
    lines = calibration.summary(cal).splitlines()
    assert lines[0] == ("18-class F1 0.5000 -> 0.5500 on the 300 photos fitted, +0.0120 cross-validated by person; "
                        "offsets mask +0.00 +0.50 +0.00; age +0.00 -0.25 +1.00")
    assert lines[1:] == ["  age: fewer than 5 photos of 60+: offset left at 0"]
    assert calibration.summary(Calibration({"joint": (0.0,) * 18}, 0.4, 0.4, 10)).endswith("offsets all 0")
