"""Ensembles: the answers of several members combined into one, soft (mean probabilities) or hard (a weighted vote).

`combine` joins checkpoints' per-task probabilities (predict.py, `mtl.Predictor`, pseudo_label): `soft`
averages each head's probabilities (weighted) and recombines them into the 18 classes with
`metrics.recombine`; `hard` is a weighted vote of the members' own 18-class answers, ties going to the
soft result. `mtl.vote` votes over finished submissions with the same vote (`hard_vote`), ties going to
the earliest file that voted for a tied class. Weights are checked once for both (`check_weights`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mtl import labels
from mtl.errors import ConfigError
from mtl.names import ENSEMBLES


@dataclasses.dataclass
class Ensemble:
    """The combined answer: per-task probabilities (weighted mean), 18-class answers and their confidence."""
    probs: dict
    pred: np.ndarray
    confidence: np.ndarray
    method: str = "soft"


def check_weights(weights, n: int, what="checkpoint", positive=False) -> np.ndarray:
    """--weights as an array of n non-negative numbers with a positive sum (all ones when not given).

    With positive, every weight must be above 0 (mtl.vote: a file that should not count is left out instead).
    """
    if weights is None:
        return np.ones(n)
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) != n:
        raise ConfigError(f"--weights got {len(weights)} number(s) for {n} {what}(s); give one per {what}")
    finite = bool(np.all(np.isfinite(weights)))
    if positive and not (finite and np.all(weights > 0)):
        raise ConfigError(f"--weights must be positive numbers, got {weights.tolist()} (to leave a {what} out, do "
                          f"not list it)")
    if not finite or np.any(weights < 0) or weights.sum() <= 0:
        raise ConfigError(f"--weights must be non-negative numbers with a positive sum, got {weights.tolist()}")
    return weights


def soft_mean(member_probs, weights) -> dict:
    """Weighted mean of every output all members have ('joint' and 'age_reg' only when every member has them)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    keys = [k for k in member_probs[0] if all(k in p for p in member_probs)]
    return {k: sum(np.float32(wi) * p[k] for wi, p in zip(w, member_probs)).astype(np.float32) for k in keys}


def vote_counts(answers, weights) -> np.ndarray:
    """(photos, 18) weighted votes per class; answers is (members, photos) of 18-class answers."""
    answers = np.asarray(answers, dtype=np.int64)
    rows = np.arange(answers.shape[1])
    votes = np.zeros((answers.shape[1], labels.NUM_JOINT))
    for w, ans in zip(weights, answers):
        np.add.at(votes, (rows, ans), w)
    return votes


def tied_classes(votes, weights) -> np.ndarray:
    """(photos, 18) bool: the classes with the most votes per photo (vote_counts)."""
    # NOTE: a relative tolerance, so weights like 0.1 + 0.2 tie with 0.3
    return votes >= votes.max(1, keepdims=True) - 1e-9 * np.sum(weights)


def hard_vote(answers, weights, tie_scores=None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted vote per photo over the members' 18-class answers ((members, photos)) -> (answers, vote share).

    Among the classes tied for the most votes, the one with the highest tie_scores ((photos, 18), e.g. the
    soft ensemble's 18-class probabilities) wins; without tie_scores, the earliest member's answer among
    the tied classes (the first file's when it is one of them).
    """
    answers = np.asarray(answers, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    votes = vote_counts(answers, weights)
    tied = tied_classes(votes, weights)
    rows = np.arange(answers.shape[1])
    if tie_scores is not None:
        pred = np.where(tied, tie_scores, -np.inf).argmax(1)
    else:
        pred = np.full(len(rows), -1, dtype=np.int64)
        for ans in answers:
            take = (pred < 0) & tied[rows, ans]
            pred[take] = ans[take]
    return pred, votes[rows, pred] / weights.sum()


def combine(member_probs, weights=None, method="soft") -> Ensemble:
    """Soft (mean probabilities, then recombine) or hard (weighted vote, ties to the soft result) ensemble."""
    from mtl.metrics import predict_classes, recombine
    if method not in ENSEMBLES:
        raise ConfigError(f"--ensemble must be one of {', '.join(ENSEMBLES)}, got {method!r}")
    weights = check_weights(weights, len(member_probs))
    probs = soft_mean(member_probs, weights)
    soft_joint = np.asarray(recombine(probs))
    if method == "soft" or len(member_probs) == 1:
        pred = soft_joint.argmax(1)
        return Ensemble(probs, pred, soft_joint[np.arange(len(pred)), pred], "soft")
    pred, share = hard_vote([predict_classes(p) for p in member_probs], weights, tie_scores=soft_joint)
    return Ensemble(probs, pred, share.astype(np.float32), "hard")
