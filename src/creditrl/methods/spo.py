"""SPO-chain: segment policy optimization with Monte Carlo values at segment boundaries
(Guo et al., arXiv 2505.23564; code github.com/AIFrameResearch/SPO).

A response is cut into segments; the value of the state at each segment's start is the mean
outcome reward of K continuations of it (`creditrl.value_estimation`, the estimator VinePPO
uses, identical states estimated once), and every token of a segment gets the segment's
advantage V(end) − V(start).  Only low-probability tokens (π_old < 0.9) carry it: the published
code zeroes the advantage of the others and trains only on the low-probability ones.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from creditrl.methods.loss import masked_mean
from creditrl.methods.registry import Method, register_advantage, register_method
from creditrl.rollouts import Rollouts
from creditrl.value_estimation import PrefixState, ValueEstimator

Partition = Literal["cutpoint", "fixed"]


class SPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(4, ge=1, description="continuations per segment boundary (published: 4 for the 0.5B / 1.1B "
                                        "runs, 9 for Qwen2.5-1.5B base)")
    partition: Partition = Field("cutpoint", description="cutpoint: a segment starts at every `interval`-th "
                                                         "low-probability token; fixed: every `interval` tokens")
    interval: int = Field(5, ge=1, description="low-probability tokens (cutpoint) or tokens (fixed) per segment "
                                               "(published cutpoint_interval: 5)")
    prob_threshold: float = Field(0.9, gt=0.0, le=1.0, description="a token is low-probability when "
                                                                   "π_old(token) < this (published: 0.9)")
    prob_mask: bool = Field(True, description="only low-probability tokens carry the advantage (published: on)")
    temperature: float | None = Field(None, ge=0.0, description="continuations' temperature "
                                                                "(None: sampling.temperature; published: 0.6)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="continuations' top-p (None: sampling.top_p; "
                                                                  "published: 1)")
    max_continuation_tokens: int | None = Field(None, ge=1,
                                                description="None: sampling.max_new_tokens minus the prefix length")
    whiten: bool = Field(True, description="whiten over the batch's low-probability tokens (published: on)")
    eps: float = Field(1e-8, gt=0.0)


def segment_starts(low_prob: Tensor, partition: Partition, interval: int) -> list[int]:
    """Token positions where segments start, for one response of L tokens: low_prob (L,) bool -> sorted list.

    cutpoint: every `interval`-th low-probability token, from the first (a segment begins with it);
    fixed: 0, interval, 2·interval, ...  Tokens before the first start belong to no segment.
    """
    if partition == "fixed":
        return list(range(0, len(low_prob), interval))
    return low_prob.nonzero().squeeze(1)[::interval].tolist()


def _low_probability(rollouts: Rollouts, params: SPOParams) -> Tensor:
    """(B, T) bool: response tokens drawn with π_old < prob_threshold."""
    if rollouts.old_logprobs is None:
        raise ValueError("spo needs rollouts.old_logprobs (the sampler's per-token log-probs, which "
                         "sampling.engine=kv-cache gives) to find low-probability tokens; with "
                         "method_params.partition=fixed and method_params.prob_mask=false it needs none")
    return rollouts.response_mask.bool() & (rollouts.old_logprobs.exp() < params.prob_threshold)


@register_advantage("spo", params=SPOParams, needs=("value_estimator",))
def spo(rollouts: Rollouts, params: SPOParams, value_estimator: ValueEstimator) -> Tensor:
    """A_t = V̂(s_{e}) − V̂(s_{b}) for a token t of the segment [b, e) (Guo et al., arXiv 2505.23564).

    s_b = prompt + the response's first b tokens; V̂ is the mean outcome reward of K continuations;
    the last segment ends at the response's end, where V = R (0 for a response cut off at the length
    limit, as its continuations score).  Tokens before the first segment get 0.  With `prob_mask`,
    tokens with π_old ≥ prob_threshold get 0; with `whiten`, A ← (A − mean)·(var + eps)^−½, mean and
    unbiased var over the batch's low-probability tokens (all response tokens without `prob_mask`, or
    when none is), and the others are set back to 0.  Shapes: response_ids (B, T), rewards (B,) -> (B, T).
    """
    if rollouts.problems is None:
        raise ValueError("spo needs rollouts.problems (row-aligned problems, to verify continuations)")
    mask = rollouts.response_mask.bool()
    needs_probs = params.prob_mask or params.partition == "cutpoint"
    low = _low_probability(rollouts, params) if needs_probs else mask
    starts = [segment_starts(low[b][mask[b]], params.partition, params.interval) for b in range(rollouts.batch_size)]
    states = []
    for b, row_starts in enumerate(starts):
        prompt = tuple(rollouts.prompt_ids[b][rollouts.prompt_mask[b].bool()].tolist())
        tokens = rollouts.response_ids[b][mask[b]].tolist()
        states += [PrefixState(prompt, tuple(tokens[:t]), rollouts.problems[b]) for t in row_starts]
    estimates = value_estimator.estimate(states, params.k, params.temperature, params.top_p,
                                         params.max_continuation_tokens).tolist()
    rewards = rollouts.rewards if rollouts.rewards.is_floating_point() else rollouts.rewards.float()
    returns = torch.where(rollouts.truncated.to(rewards.device), 0.0, rewards).tolist()
    adv = torch.zeros(mask.shape, dtype=rewards.dtype, device=mask.device)
    used = 0
    for b, row_starts in enumerate(starts):
        values = estimates[used: used + len(row_starts)] + [returns[b]]
        ends = row_starts[1:] + [int(mask[b].sum())]
        for j, (start, end) in enumerate(zip(row_starts, ends)):
            adv[b, start:end] = values[j + 1] - values[j]
        used += len(row_starts)
    carriers = low if params.prob_mask else mask
    if params.whiten:
        counted = carriers if carriers.any() else mask
        n = counted.sum()
        mean = masked_mean(adv, counted)
        var = masked_mean((adv - mean).square(), counted) * n / (n - 1).clamp(min=1)
        adv = (adv - mean) * torch.rsqrt(var + params.eps)
    return torch.where(carriers, adv, 0.0)


register_method(
    Method(
        name="spo",
        advantage="spo",
        summary=(
            "SPO-chain (arXiv 2505.23564): segments start at every 5th token with π_old < 0.9; each "
            "segment's advantage V̂(end) − V̂(start) from K = 4 Monte Carlo continuations per boundary, on its "
            "low-probability tokens, whitened; about #boundaries × K extra generations per response.  The paper "
            "samples at temperature 0.6 with KL 1e-4: set those in the recipe."
        ),
    )
)
