"""Architectures, the 18-class recombination, and the losses."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl import labels
from mtl.errors import ConfigError
from mtl.losses import SoftF1, balanced_weights, build_loss, class_counts
from mtl.metrics import head_probs, recombine, score
from mtl.model import create_model

LOSSES = {"mask": {"name": "ce"}, "gender": {"name": "bce"}, "age": {"name": "ce"}, "joint": {"name": "ce"}}


def batch_targets(mask, gender, age):
    age = torch.tensor(age, dtype=torch.float32)
    return {"mask": torch.tensor(mask), "gender": torch.tensor(gender),
            "age_group": torch.as_tensor(labels.LabelSchema(60).group(age.numpy())), "age_years": age}


@pytest.mark.parametrize("arch,trunks", [("multihead", 1), ("joint18", 1), ("separate", 3)])
@pytest.mark.parametrize("trunk", ["test_efficientnet", "test_vit"])
def test_forward_shapes(arch, trunks, trunk):
    model = create_model(trunk, arch, pretrained=False, age_reg=True)
    assert len(model.trunks) == trunks
    size = 32 if trunk == "test_vit" else 40
    out = model(torch.randn(2, 3, size, size))
    expected = {"joint": (2, 18)} if arch == "joint18" else {"mask": (2, 3), "gender": (2,), "age": (2, 3)}
    assert {k: tuple(v.shape) for k, v in out.items()} == {**expected, "age_reg": (2,)}
    probs = head_probs(out)
    assert probs["mask"].shape == (2, 3) and probs["gender"].shape == (2, 2) and probs["age"].shape == (2, 3)
    assert torch.allclose(recombine(probs).sum(1), torch.ones(2), atol=1e-5)


def test_recombination_agrees_with_label_encode():
    for mask, gender, age in itertools.product(range(3), range(2), range(3)):
        probs = {"mask": F.one_hot(torch.tensor([mask]), 3).float() * 0.8 + 0.2 / 3,
                 "gender": F.one_hot(torch.tensor([gender]), 2).float() * 0.8 + 0.1,
                 "age": F.one_hot(torch.tensor([age]), 3).float() * 0.8 + 0.2 / 3}
        assert recombine(probs).argmax(1).item() == labels.encode(mask, gender, age)
        numpy_probs = {k: v.numpy() for k, v in probs.items()}
        assert recombine(numpy_probs).argmax(1)[0] == labels.encode(mask, gender, age)


def test_joint_head_marginals_match_joint_distribution():
    logits = torch.randn(4, 18)
    probs = head_probs({"joint": logits})
    joint = F.softmax(logits, 1)
    parts = dict(zip(labels.TASKS, labels.decode(np.arange(18))))
    for task, part in parts.items():  # each task's probability of a class: the 18-class mass that has it
        for k in range(labels.NUM_CLASSES[task]):
            assert torch.allclose(probs[task][:, k], joint[:, torch.as_tensor(part == k)].sum(1), atol=1e-6), (task, k)
    assert torch.allclose(probs["mask"].sum(1), torch.ones(4)) and torch.equal(recombine(probs), joint)


@pytest.mark.parametrize("arch", ["multihead", "separate"])
def test_unknown_label_gives_zero_gradient(arch):
    torch.manual_seed(0)
    model = create_model("test_efficientnet", arch, pretrained=False, age_reg=True)
    targets = batch_targets([labels.UNKNOWN], [1], [70.0])  # gender and age known, mask unknown
    loss_fn = build_loss(LOSSES, arch, class_counts(batch_targets([0, 1, 2], [0, 1, 0], [20.0, 40.0, 70.0])),
                         age_reg_weight=0.1)
    loss, parts = loss_fn(model(torch.randn(1, 3, 40, 40)), targets)
    loss.backward()
    assert parts["mask"].item() == 0.0
    assert torch.count_nonzero(model.heads["mask"].fc.weight.grad) == 0
    assert torch.count_nonzero(model.heads["gender"].fc.weight.grad) > 0
    assert torch.count_nonzero(model.heads["age_reg"].fc.weight.grad) > 0


def test_joint18_partial_labels_use_the_consistent_classes():
    logits = torch.randn(1, 18, requires_grad=True)
    loss_fn = build_loss(LOSSES, "joint18", {"joint": [1] * 18})
    loss, _ = loss_fn({"joint": logits}, batch_targets([2], [-1], [-1.0]))  # only "not wear" known
    log_p = F.log_softmax(logits, 1)[0]
    assert torch.isclose(loss, -torch.logsumexp(log_p[12:18], 0))
    nothing, _ = loss_fn({"joint": logits}, batch_targets([-1], [-1], [-1.0]))
    assert nothing.item() == 0.0


@pytest.mark.parametrize("spec", [{"name": "focal", "gamma": 2.0}, {"name": "soft_f1", "ce_weight": 0.5},
                                  {"name": "ce", "label_smoothing": 0.1, "class_weights": "balanced"}])
def test_each_loss_is_finite_and_decreases_on_a_toy_problem(spec):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    head = torch.nn.Linear(8, 3)
    loss_fn = build_loss({**LOSSES, "age": spec}, "multihead", class_counts(batch_targets([0] * 64, [0] * 64,
                                                                                         [20.0] * 64)))
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = loss_fn.losses["age"](head(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert np.isfinite(loss.item()) and loss.item() < first


def test_focal_with_gamma_zero_is_cross_entropy():
    from mtl.losses import Focal
    logits, target = torch.randn(16, 3), torch.randint(0, 3, (16,))
    assert torch.isclose(Focal(gamma=0.0)(logits, target), F.cross_entropy(logits, target), atol=1e-6)


def test_soft_f1_is_low_for_perfect_predictions():
    target = torch.tensor([0, 1, 2, 1])
    perfect = F.one_hot(target, 3).float() * 50
    assert SoftF1()(perfect, target) < 1e-3 < SoftF1()(-perfect, target)


def test_balanced_weights_favour_rare_classes():
    w = balanced_weights([90, 9, 1])
    assert w[2] > w[1] > w[0] and torch.isclose(w.mean(), torch.tensor(1.0))


def test_uncertainty_weighting_learns_its_weights():
    loss_fn = build_loss(LOSSES, "multihead", {t: [1, 1, 1] for t in ("mask", "gender", "age")},
                         weighting="uncertainty")
    assert set(loss_fn.weights()) == {"mask", "gender", "age"} and loss_fn.weights()["mask"] == 0.5
    outputs = {"mask": torch.randn(4, 3), "gender": torch.randn(4), "age": torch.randn(4, 3)}
    loss, parts = loss_fn(outputs, batch_targets([0, 1, 2, 0], [0, 1, 0, 1], [20.0, 40.0, 70.0, 30.0]))
    expected = sum(p * 0.5 + 0.0 for p in parts.values())  # s = 0 at the start: L / 2 + 0 / 2
    assert torch.isclose(loss, expected)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in loss_fn.log_vars.values())


def test_unknown_loss_and_option_are_refused():
    from mtl.checks import check_loss_spec
    with pytest.raises(ConfigError, match="unknown loss 'nope' for age"):
        check_loss_spec("age", {"name": "nope"})
    with pytest.raises(ConfigError, match="gamma"):
        check_loss_spec("age", {"name": "ce", "gamma": 2})
    with pytest.raises(ConfigError, match="gender task only"):
        check_loss_spec("mask", {"name": "bce"})


def test_score_reports_both_age_readings():
    at60, at59 = labels.LabelSchema(60), labels.LabelSchema(59)
    years = np.array([20, 45, 65])
    truth = {"mask": np.array([0, 1, 2]), "gender": np.array([0, 1, 0]), "age_years": years}
    probs = {"mask": np.eye(3), "gender": np.eye(2)[[0, 1, 0]], "age": np.eye(3), "age_reg": np.array([21., 50., 59.])}
    scored = score(probs, {**truth, "age_group": at60.group(years)}, at60)
    assert scored["f1"] == 1.0 and scored["age_reg_acc"] == pytest.approx(2 / 3)
    assert scored["age_reg_mae"] == pytest.approx((1 + 5 + 6) / 3)
    assert score(probs, {**truth, "age_group": at59.group(years)}, at59)["age_reg_acc"] == 1.0  # threshold moved
    # the groups given are the ones scored (no second derivation); without them they come from the schema
    assert score(probs, {**truth, "age_group": np.array([0, 1, 1])}, at60)["age_f1"] < 1.0
    assert score(probs, truth, at60) == scored == score(probs, {**truth, "age": years}, 60)  # the older call
