"""Credit accuracy against exact step labels: does a method blame the first wrong step? (methods.md §8)

Step credit is the *mean* token credit of a step, c̄_j = mean_{t ∈ step j} c_t: the mean, not the
sum, so that a long step is not blamed more merely for being long.  A response's first wrong step
j* is the first step labelled wrong (label 0).  Over the wrong responses that have one:

- top-1 hit: j* = argmin_j c̄_j; when k steps tie at the minimum and j* is among them, the hit
  counts 1/k (the expected hit of breaking ties at random).  `hit_chance` is the same rate for
  uniform credit, mean 1/(number of steps).
- before / after: mean c̄_j over steps j < j* and over steps j ≥ j*, pooled over responses.

AUC of −c̄ separating wrong steps (label 0) from right ones (label 1), P(−c̄_wrong > −c̄_right) +
½·P(tie), from the rank formula U = Σ mid-ranks of the wrong − n_w(n_w + 1)/2, AUC = U / (n_w·n_r):
`auc` pools every labelled step of the batch (outcome-level credit helps it: wrong steps sit in
wrong responses); `auc_within` counts only pairs of a wrong and a right step of the same wrong
response, ΣU_b / Σ n_w,b·n_r,b, so only localisation counts (credit uniform in a response: 0.5).

Uniformity on correct responses: H = −Σ_t p_t·log p_t / log n, p_t = |c_t| / Σ_s |c_s| over the n
response tokens (1: credit spread evenly); responses with Σ|c| = 0 or n < 2 are left out.

Credit F1 as ProcessBench defines it (Zheng et al. 2024, arXiv 2412.06559): a step is *flagged*
when its mean credit is negative, c̄_j < 0 (the method blames it), and a response's predicted first
error is its first flagged step (none: "no error").  err = the share of wrong responses whose first
flagged step is exactly j*; ok = the share of correct responses with no step flagged (responses with
at least one step); F1 = 2·err·ok / (err + ok) (0 when both are 0).  Outcome-level credit (GRPO: every
token of a wrong response negative) flags step 0, so its err is the share of errors at step 0; so does
credit that rescales the outcome advantage by positive token weights (FIPO's): F1 sees signs and zeros
(DenseR's weight 0 unflags a step), hit@1 and AUC within a response see the rescaling.

Undefined numbers (no wrong response, no labelled step of a class) are NaN.  All in float64.

A task that labels steps in several senses (Countdown: valid, solvable) gets the same numbers against
each label (`credit_accuracy_by_label`), each with its own first wrong step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from creditrl.rollouts import Rollouts, aligned_step_labels, pad_right

NAN = float("nan")


@dataclass(frozen=True)
class CreditAccuracy:
    hit_rate: float  # top-1 hit rate of the first wrong step, ties split
    hit_chance: float  # the hit rate of uniform credit: mean 1/(number of steps)
    auc: float  # wrong vs right steps, every labelled step
    auc_within: float  # wrong vs right steps, pairs within the same wrong response
    before: float  # mean step credit before the first wrong step
    after: float  # mean step credit from the first wrong step on
    entropy: float  # mean normalised entropy of |credit| over the tokens of correct responses
    n_wrong: int  # wrong responses with a labelled first wrong step
    n_correct: int  # correct responses that entered the entropy
    error_accuracy: float = NAN  # ProcessBench: wrong responses whose first flagged step is the first wrong step
    correct_accuracy: float = NAN  # ProcessBench: correct responses with no step flagged
    f1: float = NAN  # ProcessBench: the harmonic mean of the two

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def step_credit(credit: Tensor, step_ids: Tensor) -> Tensor:
    """c̄_j = mean of the credit of the tokens of step j, for j = 0 .. max step; NaN for a step without tokens.

    Shapes: credit (T,), step_ids (T,) with −1 on padding -> (S,) float64.
    """
    valid = step_ids >= 0
    n_steps = int(step_ids[valid].max()) + 1 if valid.any() else 0
    ids = step_ids[valid]
    sums = torch.zeros(n_steps, dtype=torch.float64).index_add_(0, ids, credit[valid].double())
    counts = torch.zeros(n_steps, dtype=torch.float64).index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
    return torch.where(counts > 0, sums / counts.clamp(min=1), NAN)


def first_wrong_step(labels: Tensor | None) -> int | None:
    """Index of the first step labelled wrong (0) in a row of step labels (B's row of (B, S)), or None."""
    if labels is None:
        return None
    wrong = (labels == 0).nonzero()
    return int(wrong[0]) if len(wrong) else None


def top1_hit(step_values: Tensor, target: int) -> float:
    """1/k when `target` is among the k steps holding the minimum of `step_values` (S,), else 0."""
    present = ~torch.isnan(step_values)
    lowest = step_values[present].min()
    at_min = present & (step_values == lowest)
    return 1.0 / int(at_min.sum()) if bool(at_min[target]) else 0.0


def first_flagged(step_values: Tensor) -> int:
    """The index of the first step with negative mean credit (S,), NaN steps skipped; −1 when none is."""
    flagged = (step_values < 0).nonzero()
    return int(flagged[0]) if len(flagged) else -1


def processbench_f1(error_accuracy: float, correct_accuracy: float) -> float:
    """2·a·b / (a + b): 0 when both are 0, NaN when either is NaN."""
    if math.isnan(error_accuracy) or math.isnan(correct_accuracy):
        return NAN
    total = error_accuracy + correct_accuracy
    return 2 * error_accuracy * correct_accuracy / total if total else 0.0


def rank_auc(positive: list[float], negative: list[float]) -> float:
    """P(score_pos > score_neg) + ½·P(tie) = U / (n_pos·n_neg); NaN if a class is empty."""
    if not positive or not negative:
        return NAN
    return rank_u(positive, negative) / (len(positive) * len(negative))


def rank_u(positive: list[float], negative: list[float]) -> float:
    """U = Σ mid-ranks of the positives among all scores − n_pos(n_pos + 1)/2: the number of
    (positive, negative) pairs with the positive scored higher, ties counting ½."""
    n_pos = len(positive)
    scores = sorted([(s, True) for s in positive] + [(s, False) for s in negative], key=lambda x: x[0])
    rank_sum, i = 0.0, 0
    while i < len(scores):
        j = i
        while j < len(scores) and scores[j][0] == scores[i][0]:
            j += 1
        mid_rank = (i + 1 + j) / 2  # ranks i+1 .. j share their mean
        rank_sum += mid_rank * sum(1 for _, is_pos in scores[i:j] if is_pos)
        i = j
    return rank_sum - n_pos * (n_pos + 1) / 2


def normalized_entropy(credit: Tensor) -> float | None:
    """−Σ p log p / log n with p = |c| / Σ|c| over the n given tokens (T,); None if n < 2 or Σ|c| = 0."""
    weights = credit.double().abs()
    total = weights.sum()
    if len(weights) < 2 or total == 0:
        return None
    p = weights / total
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(len(weights)))


def credit_accuracy(credit: Tensor, rollouts: Rollouts) -> CreditAccuracy:
    """The module's metrics for one method's credit (B, T) on a batch with step labels (B, S).

    A batch without step labels gets NaN for everything but the entropy.
    """
    hits, chances, before, after = [], [], [], []
    wrong_steps, right_steps = [], []
    u_within, pairs_within = 0.0, 0
    entropies, found, unflagged = [], [], []
    mask = rollouts.response_mask.bool()
    for b in range(rollouts.batch_size):
        if bool(rollouts.correct[b]):
            h = normalized_entropy(credit[b][mask[b]])
            if h is not None:
                entropies.append(h)
        if rollouts.step_labels is None:
            continue
        values = step_credit(credit[b], torch.where(mask[b], rollouts.step_ids[b], -1))
        labels = rollouts.step_labels[b, : len(values)]
        if bool(rollouts.correct[b]) and len(values) and not bool(torch.isnan(values).all()):
            unflagged.append(float(first_flagged(values) == -1))
        labelled = [(float(v), int(lab)) for v, lab in zip(values, labels) if lab >= 0 and not math.isnan(v)]
        wrong_steps += [v for v, lab in labelled if lab == 0]
        right_steps += [v for v, lab in labelled if lab == 1]
        target = first_wrong_step(labels)
        if bool(rollouts.correct[b]) or target is None or math.isnan(values[target]):
            continue
        hits.append(top1_hit(values, target))
        found.append(float(first_flagged(values) == target))
        chances.append(1.0 / int((~torch.isnan(values)).sum()))
        before += [float(v) for v in values[:target] if not math.isnan(v)]
        after += [float(v) for v in values[target:] if not math.isnan(v)]
        wrong_here = [-v for v, lab in labelled if lab == 0]
        right_here = [-v for v, lab in labelled if lab == 1]
        u_within += rank_u(wrong_here, right_here)
        pairs_within += len(wrong_here) * len(right_here)
    return CreditAccuracy(
        hit_rate=_mean(hits), hit_chance=_mean(chances),
        auc=rank_auc([-v for v in wrong_steps], [-v for v in right_steps]),
        auc_within=u_within / pairs_within if pairs_within else NAN,
        before=_mean(before), after=_mean(after), entropy=_mean(entropies),
        n_wrong=len(hits), n_correct=len(entropies), error_accuracy=_mean(found), correct_accuracy=_mean(unflagged),
        f1=processbench_f1(_mean(found), _mean(unflagged)),
    )


def credit_accuracy_by_label(credit: Tensor, rollouts: Rollouts) -> dict[str, CreditAccuracy]:
    """`credit_accuracy` against each named step label of the verifier (label name -> metrics); empty when the
    batch has none.  Each label is aligned to the splitter's steps as the primary one is."""
    if rollouts.named_step_labels is None:
        return {}
    n_steps = rollouts.num_steps.tolist()
    return {name: credit_accuracy(credit, replace(rollouts, step_labels=pad_right(
        [aligned_step_labels(row[name], n) for row, n in zip(rollouts.named_step_labels, n_steps)], -1)))
        for name in rollouts.named_step_labels[0]}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else NAN
