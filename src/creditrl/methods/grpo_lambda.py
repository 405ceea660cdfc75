"""GRPO-λ: eligibility traces without a critic (Parthasarathi, Reymond et al., arXiv 2510.00194; methods.md §4).

The GRPO advantage, clamped below, is applied to a *traced* ratio r̃_t = exp(z_t) with
z_t = Σ_{k ≤ t} w(t, k)·Δ_k·m_k: a token's log-ratio also moves the ratios of the tokens after
it, so credit for the outcome reaches earlier tokens.  There is no official code; two variants:

- `grpo_lambda` (ε-trace, the reading of methods.md): the ratio transform `grpo_lambda_trace`;
  the PPO clip ε acts on the traced ratio.
- `grpo_lambda_weight` (ε-weight) [uncertain]: the plain per-token ratio, clipped per token, with
  the trace coefficients as weights on A (token weight `grpo_lambda_weight`, defined there).

Token positions t, k count from 0 at the first response token; padding inside a row still
counts as distance.  Both traces are O(B·T) scans (`discounted_cumsum`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from creditrl.methods.fipo import discounted_cumsum
from creditrl.methods.grpo import GRPOParams, grpo
from creditrl.methods.registry import (
    Method,
    register_advantage,
    register_method,
    register_ratio_transform,
    register_token_weight,
)
from creditrl.rollouts import Rollouts


class GRPOLambdaParams(GRPOParams):
    adv_clamp: float | None = Field(-0.1, le=0.0, description="A ← max(A, adv_clamp); None: no clamp")


class TraceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lam: float = Field(0.99, ge=0.0, le=1.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="[uncertain] the paper's γ; the trace decays by γ·λ")
    trace_style: Literal["recent", "both"] = "recent"


class TraceWeightParams(TraceParams):
    weight_normalize: bool = Field(True, description="scale each response's weights to mean 1 over its tokens")


@register_advantage("grpo_lambda", params=GRPOLambdaParams, group_relative=True)
def grpo_lambda_advantage(rollouts: Rollouts, params: GRPOLambdaParams) -> Tensor:
    """A_i = max(GRPO advantage, adv_clamp), adv_clamp = −0.1: the authors' guard against the larger
    KL drift of traced ratios on negative samples.  Shapes: rewards (B,), group_ids (B,) -> (B, T).
    """
    adv = grpo(rollouts, params)
    return adv if params.adv_clamp is None else adv.clamp(min=params.adv_clamp)


def _powers(decay: float, exponents: Tensor, like: Tensor) -> Tensor:
    """decay^exponents (integer exponents ≥ 0) in float64, then in like's dtype (far powers underflow to 0)."""
    return (torch.tensor(decay, dtype=torch.float64) ** exponents.to(torch.float64)).to(like.dtype).to(like.device)


@register_ratio_transform("grpo_lambda_trace", params=TraceParams)
def grpo_lambda_trace(delta: Tensor, mask: Tensor, params: TraceParams) -> Tensor:
    """Traced log-ratio z_t = Σ_{k ≤ t} w(t, k)·Δ_k·m_k, d = γλ; the loss uses r̃ = exp(z).

    - `recent`: w = d^(t−k), i.e. z_t = Δ_t + d·z_{t−1}.
    - `both`: w = max(d^(t−k), d^k), which also keeps the first tokens in every trace.  Since
      d^(t−k) ≥ d^k iff k ≥ t/2, with h = ⌈t/2⌉ and Z the `recent` trace:
      z_t = Σ_{h ≤ k ≤ t} d^(t−k)Δ_k + Σ_{k < h} d^k Δ_k = (Z_t − d^(t−h+1)·Z_{h−1}) + Q_{h−1},
      Q_j = Σ_{k ≤ j} d^k Δ_k.  Only powers of d ≤ 1 appear, so it is stable for any T; the
      subtraction loses at most float precision times |Z|.
    The gradient flows through z.  Shapes: delta, mask (B, T) -> (B, T), 0 off the mask.
    """
    mask = mask.bool()
    decay = params.gamma * params.lam
    x = torch.where(mask, delta, 0.0)
    recent = discounted_cumsum(x, decay)
    if params.trace_style == "recent":
        return torch.where(mask, recent, 0.0)
    t = torch.arange(x.shape[-1], device=x.device)
    half = (t + 1) // 2
    prefix = torch.cumsum(x * _powers(decay, t, x), dim=-1)
    window = recent - _powers(decay, t // 2 + 1, x) * F.pad(recent, (1, 0))[..., half]
    return torch.where(mask, window + F.pad(prefix, (1, 0))[..., half], 0.0)


@register_token_weight("grpo_lambda_weight", params=TraceWeightParams)
def grpo_lambda_weight(advantages: Tensor, delta: Tensor, mask: Tensor, params: TraceWeightParams) -> Tensor:
    """ε-weight [uncertain]: per-token weights c_k = Σ_{t ≥ k} w(t, k)·m_t on A, with the plain ratio.

    c_k is the sensitivity of the traced surrogate to Δ_k at π_θ = π_old (d Σ_t z_t m_t / dΔ_k), so
    without normalisation the ε-weight and ε-trace gradients agree on the first update and differ
    only in where the ε-clip acts.  With d = γλ: `recent` c_k = Σ_{t ≥ k} d^(t−k) m_t; `both`
    c_k = Σ_{k ≤ t ≤ 2k} d^(t−k) m_t + d^k·Σ_{t > 2k} m_t.  Early tokens get the larger weights.
    `weight_normalize` (default) divides by the response's mean c, keeping the loss scale of GRPO.
    Alternative reading, not implemented: the trace mass c'_t = Σ_{k ≤ t} w(t, k)·m_k, which favours
    late tokens instead.  Shapes: advantages, delta, mask (B, T) -> (B, T).
    """
    mask = mask.bool()
    decay = params.gamma * params.lam
    m = mask.to(delta.dtype if delta.is_floating_point() else torch.float32)
    weight = discounted_cumsum(m, decay, reverse=True)
    if params.trace_style == "both":
        length = m.shape[-1]
        k = torch.arange(length, device=m.device)
        after = torch.clamp(2 * k + 1, max=length)
        tail_count = F.pad(m.flip(-1).cumsum(-1).flip(-1), (0, 1))[..., after]
        weight = (weight - _powers(decay, k + 1, m) * F.pad(weight, (0, 1))[..., after]
                  + _powers(decay, k, m) * tail_count)
    if params.weight_normalize:
        mean = (weight * m).sum(dim=-1, keepdim=True) / m.sum(dim=-1, keepdim=True).clamp(min=1)
        weight = weight / mean.clamp(min=torch.finfo(m.dtype).tiny)
    return torch.where(mask, weight, 0.0)


register_method(
    Method(
        name="grpo_lambda",
        advantage="grpo_lambda",
        ratio_transform="grpo_lambda_trace",
        defaults={"loss.agg": "seq-mean-token-mean"},
        summary=(
            "GRPO-λ (arXiv 2510.00194), ε-trace: GRPO advantages clamped at −0.1 on the traced ratio "
            "exp(Σ_{k≤t} w(t,k)Δ_k); trace_style recent (γλ)^(t−k) or both max((γλ)^(t−k), (γλ)^k)."
        ),
    )
)
register_method(
    Method(
        name="grpo_lambda_weight",
        advantage="grpo_lambda",
        token_weight="grpo_lambda_weight",
        defaults={"loss.agg": "seq-mean-token-mean"},
        summary=(
            "GRPO-λ ε-weight [uncertain reading]: the plain ratio, with GRPO-λ's trace coefficients "
            "Σ_{t≥k} w(t,k) as per-token weights on the clamped GRPO advantage."
        ),
    )
)
