"""KTAE: key-token advantage estimation (Sun et al., arXiv 2505.16826; code github.com/xiaolizh1/KTAE).

No extra model: within each group, every token id gets an importance from how its occurrence
differs between the correct (R > 0) and the wrong (R ≤ 0) responses, and each response token's
advantage is the GRPO advantage of its response plus the importance of its token id.

For a token id in a group of n_c correct and n_w wrong responses, with a (b) the correct (wrong)
responses containing it, c = n_c − a, d = n_w − b, and f_c (f_w) its occurrences among the N_c
(N_w) tokens of the correct (wrong) responses:

    Fisher  F  = exp(−2p), p the two-sided p-value of Fisher's exact test on [[a, b], [c, d]];
                 F = 0 for a token in every response (its table is the only one possible)
    IG      I  = H(Y) − H(Y | X), in bits, Y = correctness, X = whether a response contains it
    effect  x  = asin√(a/n_c) − asin√(b/n_w) + (with gamma_tf) tf_c/(tf_w + 1e-5) − tf_w/(tf_c + 1e-5)
    tf_c       = (f_c/N_c)(k1 + 1) / (f_c/N_c + k1(1 − b_tf + b_tf·N_c/N̄)),  N̄ = (N_c + N_w)/2 (BM25's)
    weight  w  = top · (2σ(s) − 1),  s = (α F + β I) · x / (α + β)

The published code sets F = 0 where its float32 p-value equals 1; the sum of the table
probabilities lands exactly on 1 for the single-table case, and for other tables with p = 1 only
by its rounding (for groups of 8 never, for groups of 16 in 8 of 920 tables), so this is the rule
it applies.  A group whose responses are all correct or all wrong gives w = 0.  The token that
ends a finished response (the end-of-sequence token, which the published code zeroes by its id)
gets w = 0.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from creditrl.methods.groups import group_index
from creditrl.methods.grpo import DAPO_COMPARE_OVERRIDES, DAPO_DEFAULTS, GRPOParams, grpo
from creditrl.methods.registry import Method, register_advantage, register_method
from creditrl.rollouts import Rollouts

TF_EPS = 1e-5  # the published code's guard in tf_c/(tf_w + ε); it sets the size of the TF term for one-sided tokens
TIE_RTOL = 1e-7  # tables as probable as the observed one count as extreme (scipy's relative tolerance)


class KTAEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(1.0, ge=0.0, description="α, weight of Fisher's exact test (published code: 1)")
    beta_ig: float = Field(1.0, ge=0.0, description="β, weight of the information gain (published code: 1; its "
                                                    "1.5B scripts pass 2, which the estimator does not read)")
    gamma_tf: bool = Field(True, description="add the BM25 term-frequency ratio to the effect size "
                                             "(the published code reads gamma_tf only as on/off)")
    top: float = Field(1.0, gt=0.0, description="largest key-token weight |w| (published: 1)")
    tf_k1: float = Field(2.0, gt=0.0, description="BM25's k1 in the term frequency (published: 2)")
    tf_b: float = Field(0.5, ge=0.0, le=1.0, description="BM25's length normalisation b (published: 0.5)")
    eps: float = Field(1e-6, gt=0.0, description="GRPO's std guard")

    @model_validator(mode="after")
    def _some_statistic(self) -> "KTAEParams":
        if self.alpha + self.beta_ig == 0:
            raise ValueError("alpha and beta_ig are both 0: the key-token weight (α F + β I)·x/(α + β) is undefined")
        return self


def fisher_exact_p(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Two-sided p-value of Fisher's exact test on [[a, b], [c, d]]: the hypergeometric probability of
    every table with the observed margins that is at most as probable as the observed one.

    Shapes: (U,) float64 each -> (U,).
    """
    row, col, n = a + b, a + c, a + b + c + d
    k = torch.arange(int(col.max()) + 1, dtype=a.dtype)[None, :]  # (1, K)
    support = (k >= (row + col - n).clamp(min=0)[:, None]) & (k <= torch.minimum(row, col)[:, None])

    def log_prob(x: Tensor) -> Tensor:  # log P(a = x | margins)
        return (_log_comb(col[:, None], x) + _log_comb((n - col)[:, None], row[:, None] - x)
                - _log_comb(n[:, None], row[:, None]))

    log_k = torch.where(support, log_prob(k.expand_as(support)), -torch.inf)
    log_obs = log_prob(a[:, None])
    extreme = support & (log_k <= log_obs + TIE_RTOL)
    return torch.where(extreme, log_k.exp(), 0.0).sum(dim=1)


def _log_comb(n: Tensor, k: Tensor) -> Tensor:
    """log C(n, k), valid for 0 ≤ k ≤ n (elsewhere a finite value that callers mask)."""
    k = k.clamp(min=0)
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma((n - k).clamp(min=0) + 1)


def information_gain(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """IG = H(Y) − P(X)H(Y | X) − P(¬X)H(Y | ¬X) in bits, Y correct/wrong, X the token present. (U,) -> (U,)."""
    n = a + b + c + d
    return _entropy(a + c, b + d) - (a + b) / n * _entropy(a, b) - (c + d) / n * _entropy(c, d)


def _entropy(x: Tensor, y: Tensor) -> Tensor:
    """Entropy in bits of the split x : y (0 for an empty one)."""
    total = x + y
    terms = [torch.where(v > 0, -(v / total) * torch.log2(v / total.clamp(min=1)), 0.0) for v in (x, y)]
    return terms[0] + terms[1]


def bm25_term_frequency(count: Tensor, length: Tensor, mean_length: Tensor, k1: float, b: float) -> Tensor:
    """BM25's saturated term frequency of a token seen `count` times among `length` tokens:
    (f/L)(k1 + 1) / (f/L + k1(1 − b + b·L/L̄)).  (U,) -> (U,)."""
    freq = count / length
    return freq * (k1 + 1) / (freq + k1 * (1 - b + b * length / mean_length))


def key_token_weights(tokens: Tensor, mask: Tensor, correct: Tensor, params: KTAEParams) -> Tensor:
    """w of each response token of one group (module docstring), float64: tokens, mask (m, T), correct (m,) -> (m, T).

    All-correct or all-wrong groups get 0.
    """
    weights = torch.zeros(tokens.shape, dtype=torch.float64, device=tokens.device)
    if correct.all() or not correct.any():
        return weights
    ids, column = torch.unique(tokens[mask], return_inverse=True)
    rows = torch.arange(len(tokens), device=tokens.device)[:, None].expand_as(tokens)[mask]
    counts = torch.zeros(len(tokens), len(ids), dtype=torch.float64, device=tokens.device)
    counts.index_put_((rows, column), torch.ones_like(column, dtype=torch.float64), accumulate=True)
    present = (counts > 0).double()
    a, b = present[correct].sum(0), present[~correct].sum(0)
    c, d = correct.sum() - a, (~correct).sum() - b
    in_every_response = a + b == len(tokens)
    fisher = torch.where(in_every_response, 0.0, (-2 * fisher_exact_p(a, b, c, d)).exp())
    ig = information_gain(a, b, c, d)
    effect = torch.asin((a / (a + c)).sqrt()) - torch.asin((b / (b + d)).sqrt())
    if params.gamma_tf:
        length_c, length_w = counts[correct].sum(), counts[~correct].sum()
        mean_length = (length_c + length_w) / 2
        tf_c = bm25_term_frequency(counts[correct].sum(0), length_c, mean_length, params.tf_k1, params.tf_b)
        tf_w = bm25_term_frequency(counts[~correct].sum(0), length_w, mean_length, params.tf_k1, params.tf_b)
        effect = effect + tf_c / (tf_w + TF_EPS) - tf_w / (tf_c + TF_EPS)
    score = (params.alpha * fisher + params.beta_ig * ig) * effect / (params.alpha + params.beta_ig)
    weights[mask] = (params.top * (2 * torch.sigmoid(score) - 1))[column]
    return weights


@register_advantage("ktae", params=KTAEParams, group_relative=True)
def ktae(rollouts: Rollouts, params: KTAEParams) -> Tensor:
    """A_{i,t} = A_i^GRPO + w_g(o_{i,t}): GRPO's group-normalised reward plus the key-token weight of the
    token id in its group (module docstring; Sun et al., arXiv 2505.16826, as the published code adds them).

    Correct means R > 0, as in the published code.  Shapes: response_ids (B, T), rewards (B,) -> (B, T).
    """
    rollout_adv = grpo(rollouts, GRPOParams(eps=params.eps))
    mask = rollouts.response_mask.bool()
    ends = _finished_ends(mask, rollouts.truncated.to(mask.device))
    weights = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    index, counts = group_index(rollouts.group_ids)
    for g in range(len(counts)):
        rows = (index == g).nonzero().squeeze(1)
        weights[rows] = key_token_weights(rollouts.response_ids[rows], mask[rows], rollouts.rewards[rows] > 0, params)
    weights = weights.masked_fill(ends, 0.0)
    return torch.where(mask, rollout_adv + weights.to(rollout_adv.dtype), 0.0)


def _finished_ends(mask: Tensor, truncated: Tensor) -> Tensor:
    """(B, T) True on the last token of every response that ended by itself (not cut at the length limit)."""
    last = (mask.sum(dim=1) - 1).clamp(min=0)
    ends = torch.zeros_like(mask)
    ends[torch.arange(len(mask), device=mask.device), last] = mask.any(dim=1) & ~truncated
    return ends


register_method(
    Method(
        name="ktae",
        advantage="ktae",
        defaults={"loss.agg": "token-mean"},
        summary=(
            "GRPO+KTAE (arXiv 2505.16826): GRPO's advantage plus a key-token weight in (−1, 1) per token id "
            "from Fisher's exact test, information gain and a BM25 frequency contrast between the group's "
            "correct and wrong responses; no extra model."
        ),
    )
)
register_method(
    Method(
        name="dapo_ktae",
        advantage="ktae",
        defaults=dict(DAPO_DEFAULTS),
        overlong_shaping=True,
        compare_overrides=DAPO_COMPARE_OVERRIDES,
        summary="DAPO+KTAE (arXiv 2505.16826): DAPO's recipe with KTAE's token-level advantage.",
    )
)
