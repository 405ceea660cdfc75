"""Credit-accuracy metrics against hand-worked numbers (dyadic credits, so every tie is exact)."""

from __future__ import annotations

import math

import pytest
import torch

from creditrl.credit_metrics import (
    credit_accuracy,
    first_wrong_step,
    normalized_entropy,
    rank_auc,
    step_credit,
    top1_hit,
)
from creditrl.rollouts import Rollouts

# entropy of p = (1/4, 1/4, 1/2) over 3 tokens: −(2·¼·ln ¼ + ½·ln ½) / ln 3 = 1.5·ln 2 / ln 3
H_QUARTER_QUARTER_HALF = 1.5 * math.log(2) / math.log(3)  # 0.946395


def test_step_credit_is_the_mean_of_each_step_and_ignores_padding():
    credit = torch.tensor([1.0, 3.0, -2.0, -4.0, 9.0])
    steps = torch.tensor([0, 0, 1, 1, -1])
    assert step_credit(credit, steps).tolist() == [2.0, -3.0]
    # a step without tokens is NaN
    values = step_credit(torch.tensor([1.0, 5.0]), torch.tensor([0, 2]))
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2] == 5.0


def test_first_wrong_step():
    assert first_wrong_step(torch.tensor([1, 1, 0, 0])) == 2
    assert first_wrong_step(torch.tensor([1, -1, 1])) is None
    assert first_wrong_step(None) is None


def test_top1_hit_splits_ties():
    assert top1_hit(torch.tensor([0.2, -0.3, 0.1]), 1) == 1.0
    assert top1_hit(torch.tensor([0.2, -0.3, 0.1]), 0) == 0.0
    assert top1_hit(torch.tensor([0.5, -1.0, -1.0]), 1) == 0.5  # two steps share the minimum
    assert top1_hit(torch.tensor([-1.0, -1.0, -1.0, -1.0]), 3) == 0.25  # uniform credit: chance


def test_rank_auc_hand_worked():
    # pairs (pos, neg): (3,2) (3,0) (1,2) (1,0) -> 3 of 4 ordered
    assert rank_auc([3.0, 1.0], [2.0, 0.0]) == 0.75
    # combined [0, 1, 1, 1]: mid-rank of the 1s is (2+3+4)/3 = 3; U = 3 + 3 − 2·3/2 = 3 -> 3/4
    assert rank_auc([1.0, 1.0], [1.0, 0.0]) == 0.75
    assert rank_auc([1.0], [1.0]) == 0.5
    assert math.isnan(rank_auc([], [1.0]))


def test_normalized_entropy():
    assert normalized_entropy(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([-1.0, 1.0, -1.0, 1.0])) == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([3.0, 0.0, 0.0, 0.0])) == pytest.approx(0.0)
    assert normalized_entropy(torch.tensor([2.0, -1.0, 1.0])) == pytest.approx(H_QUARTER_QUARTER_HALF)
    assert normalized_entropy(torch.tensor([0.0, 0.0])) is None
    assert normalized_entropy(torch.tensor([1.0])) is None


def _batch(step_labels: bool = True) -> tuple[Rollouts, torch.Tensor]:
    """Four responses (T = 5; padding holds credit 9, which must be ignored):

    row 0 wrong,   labels [1, 0, 1],  steps [0 0 1 1 2], credit [.125 .375 −.5 −.75 −.625]
                                                         -> step credit [.25, −.625, −.625]
    row 1 wrong,   labels [0, 0],     steps [0 1 1],     credit [−1 −1 −1] -> [−1, −1]
    row 2 correct, labels [1, 1],     steps [0 0 1],     credit [.5 .5 1]  -> [.5, 1]
    row 3 wrong,   labels [1, −1],    steps [0 1],       credit [−1 −1]    -> [−1, −1], no labelled error
    """
    lengths = [5, 3, 3, 2]
    steps = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, -1, -1], [0, 0, 1, -1, -1], [0, 1, -1, -1, -1]])
    credit = torch.tensor([[0.125, 0.375, -0.5, -0.75, -0.625], [-1, -1, -1, 9, 9], [0.5, 0.5, 1.0, 9, 9],
                           [-1, -1, 9, 9, 9]], dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1], [0, 0, -1], [1, 1, -1], [1, -1, -1]])
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    rollouts = Rollouts(
        prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.bool),
        response_ids=torch.zeros(4, 5, dtype=torch.long), response_mask=mask,
        group_ids=torch.zeros(4, dtype=torch.long),
        step_ids=steps, rewards=torch.tensor([0.0, 0.0, 1.0, 0.0]), correct=torch.tensor([False, False, True, False]),
        truncated=torch.zeros(4, dtype=torch.bool), step_labels=labels if step_labels else None,
    )
    return rollouts, credit


def test_credit_accuracy_hand_worked():
    rollouts, credit = _batch()
    acc = credit_accuracy(credit, rollouts)
    # rows 0 and 1 have a first wrong step (1 and 0); both tie with one other step at the minimum
    assert acc.n_wrong == 2 and acc.hit_rate == 0.5
    assert acc.hit_chance == pytest.approx((1 / 3 + 1 / 2) / 2)
    # before: row 0 step 0 (.25); from the error on: row 0 steps 1, 2 and row 1 steps 0, 1
    assert acc.before == 0.25 and acc.after == pytest.approx((-0.625 - 0.625 - 1 - 1) / 4)
    # −credit of wrong steps [.625, 1, 1], of right steps [−.25, .625, −.5, −1, 1] (row 3's step 0 counts):
    # .625 beats 3, ties 1 -> 3.5; each 1 beats 4, ties 1 -> 4.5; (3.5 + 9) / 15
    assert acc.auc == pytest.approx(12.5 / 15)
    # within row 0 only (row 1 has no right step): .625 vs [−.25, .625] -> (1 + .5) / 2
    assert acc.auc_within == 0.75
    # correct row 2: |credit| (.5, .5, 1) -> p = (1/4, 1/4, 1/2)
    assert acc.n_correct == 1 and acc.entropy == pytest.approx(H_QUARTER_QUARTER_HALF)


def test_uniform_credit_is_at_chance():
    rollouts, _ = _batch()
    credit = torch.where(rollouts.response_mask, torch.where(rollouts.correct, 1.0, -1.0)[:, None], 0.0)
    acc = credit_accuracy(credit, rollouts)
    assert acc.hit_rate == acc.hit_chance and acc.auc_within == 0.5 and acc.entropy == pytest.approx(1.0)


def test_without_step_labels_only_entropy_is_defined():
    rollouts, credit = _batch(step_labels=False)
    acc = credit_accuracy(credit, rollouts)
    assert acc.n_wrong == 0 and all(math.isnan(x)
                                    for x in (acc.hit_rate, acc.auc, acc.auc_within, acc.before, acc.after))
    assert acc.entropy == pytest.approx(H_QUARTER_QUARTER_HALF)


def test_processbench_f1_hand_worked():
    rollouts, credit = _batch()
    acc = credit_accuracy(credit, rollouts)
    # row 0: step credit [.25, −.625, −.625], first negative step 1 = its first wrong step: found
    # row 1: [−1, −1], first negative 0 = its first wrong step: found; correct row 2: [.5, 1], nothing flagged
    assert (acc.error_accuracy, acc.correct_accuracy, acc.f1) == (1.0, 1.0, 1.0)
    # outcome-level credit flags step 0 of every wrong response: row 0 missed (error at 1), row 1 found
    uniform = torch.where(rollouts.response_mask, torch.where(rollouts.correct, 1.0, -1.0)[:, None], 0.0)
    acc = credit_accuracy(uniform, rollouts)
    assert acc.error_accuracy == 0.5 and acc.correct_accuracy == 1.0 and acc.f1 == pytest.approx(2 * 0.5 / 1.5)
    # a negative step in the correct response: flagged, so ok = 0 and F1 = 2·1·0 / (1 + 0) = 0
    credit[2, 2] = -1.0  # row 2 step credit [.5, −1]
    acc = credit_accuracy(credit, rollouts)
    assert acc.correct_accuracy == 0.0 and acc.f1 == 0.0
    assert math.isnan(credit_accuracy(credit, _batch(step_labels=False)[0]).f1)


def test_credit_accuracy_by_label_finds_each_labels_first_wrong_step():
    """One wrong Countdown-like response of three one-token steps, credit (-1, 0, 1/2) per step: the lowest credit
    sits on step 0.  Under `solvable` (0, 0, 0) step 0 is the first wrong step: a hit.  Under `valid` (1, 1, 0)
    it is step 2: a miss.  A correct response (labels all 1) adds right steps only."""
    from dataclasses import replace

    from factories import make_rollouts

    from creditrl.credit_metrics import credit_accuracy_by_label

    batch = make_rollouts([0.0, 1.0], [0, 0], [3, 3], step_ids=[[0, 1, 2], [0, 1, 2]])
    batch = replace(batch, named_step_labels=[{"valid": (True, True, False), "solvable": (False, False, False)},
                                              {"valid": (True, True, True), "solvable": (True, True, True)}])
    credit = torch.tensor([[-1.0, 0.0, 0.5], [0.25, 0.25, 0.25]])
    by_label = credit_accuracy_by_label(credit, batch)
    assert set(by_label) == {"valid", "solvable"}
    assert (by_label["solvable"].hit_rate, by_label["valid"].hit_rate) == (1.0, 0.0)
    assert by_label["valid"].auc_within == 0.0  # −½ (wrong) below 1 and 0 (right)
    assert math.isnan(by_label["solvable"].auc_within)  # no right step in the wrong response
    # pooled: wrong {0, 1, 2} of row 0 (−credit 1, 0, −½) vs right row 1 (−¼ ×3): 1 and 0 beat −¼, −½ does not
    assert by_label["solvable"].auc == pytest.approx(2 / 3)
    assert by_label["valid"].before == pytest.approx(-0.5) and by_label["valid"].after == 0.5
    assert credit_accuracy_by_label(credit, replace(batch, named_step_labels=None)) == {}
