"""mtl.ensemble: one weighted hard vote for predict.py's ensembles and mtl.vote, told apart only by the tie rule."""
import numpy as np
import pytest

from mtl import labels, vote
from mtl.ensemble import check_weights, combine, hard_vote
from mtl.errors import ConfigError
from mtl.metrics import predict_classes


def test_ties_go_to_the_scores_when_given_else_to_the_earliest_member():
    answers = [[3, 0, 7], [5, 0, 7], [5, 1, 2]]  # members x photos
    weights = [1, 1, 2]  # photo 0: 5 wins 3:1; photos 1 and 2 tie 2:2 (0 vs 1, 7 vs 2), the first member says 0 and 7
    scores = np.zeros((3, labels.NUM_JOINT))
    scores[1, 1] = scores[2, 2] = 1.0
    by_order, share = hard_vote(answers, weights)
    assert by_order.tolist() == [5, 0, 7] and share.tolist() == [0.75, 0.5, 0.5]
    assert hard_vote(answers, weights, tie_scores=scores)[0].tolist() == [5, 1, 2]
    assert vote.vote(answers, weights).tolist() == by_order.tolist()


def test_hard_combine_is_the_vote_of_the_members_answers():
    rng = np.random.default_rng(0)
    members = [{task: rng.dirichlet(np.ones(n), size=40).astype(np.float32)
                for task, n in (("mask", 3), ("gender", 2), ("age", 3))} for _ in range(3)]
    hard, soft = combine(members, [1, 2, 1.5], "hard"), combine(members, [1, 2, 1.5], "soft")
    answers = np.stack([predict_classes(m) for m in members])
    votes = np.stack([(answers == c).T @ np.array([1, 2, 1.5]) for c in range(labels.NUM_JOINT)], axis=1)
    assert np.all(votes[np.arange(40), hard.pred] == votes.max(1))       # always a most-voted class
    assert hard.method == "hard" and soft.method == "soft"
    assert np.allclose(hard.probs["mask"], soft.probs["mask"])            # the probabilities are the soft mean
    clear = (votes == votes.max(1, keepdims=True)).sum(1) == 1
    assert np.array_equal(hard.pred[clear], votes[clear].argmax(1))


def test_weights_are_checked_once_for_both():
    assert check_weights(None, 3).tolist() == [1, 1, 1]
    with pytest.raises(ConfigError, match="got 2 number"):
        check_weights([1, 2], 3)
    with pytest.raises(ConfigError, match="positive sum"):
        check_weights([0, 0], 2)
    assert check_weights([0, 1], 2).tolist() == [0, 1]                    # a member may count for nothing ...
    with pytest.raises(ConfigError, match="positive numbers"):
        check_weights([0, 1], 2, "submission", positive=True)              # ... a voted file may not
