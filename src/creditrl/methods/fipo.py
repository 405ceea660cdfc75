"""FIPO: future-KL influence weights on the advantage (Ma et al., Qwen, arXiv 2603.19835; methods.md §7).

Each token's advantage is scaled by how much the policy has already moved on the tokens that
follow it: f_t = clip(exp(F_t)), F_t = Σ_{k ≥ t} γ^(k−t)·Δ_k over the response.  The weight is
computed from Δ = log π_θ − log π_old inside the loss, so it needs π_θ ≠ π_old: with one PPO
epoch and one minibatch the update runs at π_θ = π_old, Δ = 0, f ≡ 1 and FIPO *is* its base
method (DAPO for the `fipo` method); the weight declares `needs_off_policy`, so a run configured that
way is warned.

`discounted_cumsum` is the O(B·T) scan that replaces the official code's O(B·T²) decay matrix;
GRPO-λ's traces use it too.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from creditrl.methods.registry import Method, register_method, register_token_weight

SCAN_CHUNK = 256
SAFETY_CLIP = (0.8, 1.0)


def discounted_cumsum(x: Tensor, decay: float, reverse: bool = False, chunk: int = SCAN_CHUNK) -> Tensor:
    """y_t = Σ_{k ≤ t} decay^(t−k)·x_k along the last dim; `reverse`: y_t = Σ_{k ≥ t} decay^(k−t)·x_k.

    Shapes: x (..., T) -> (..., T); decay in [0, 1].  Chunks of `chunk` tokens are scanned by
    doubling (log2(chunk) passes of y_t += decay^s·y_{t−s}); the value at each chunk's end is
    carried into the next chunk by the same scan over the chunk ends with decay^chunk.  Work
    O(T·log chunk) per row, memory O(T), differentiable; every multiplier is a power of decay ≤ 1,
    so nothing overflows at any T or decay (far powers underflow to 0, as they should).
    """
    if chunk < 2:
        raise ValueError(f"discounted_cumsum: chunk must be at least 2, got {chunk}")
    if reverse:
        return discounted_cumsum(x.flip(-1), decay, chunk=chunk).flip(-1)
    length = x.shape[-1]
    if length == 0:
        return x
    size = min(chunk, length)
    n_chunks = -(-length // size)
    y = F.pad(x, (0, n_chunks * size - length)).unflatten(-1, (n_chunks, size))
    shift, factor = 1, decay
    while shift < size:
        y = y + factor * F.pad(y[..., :-shift], (shift, 0))
        shift, factor = 2 * shift, factor * factor
    if n_chunks > 1:
        ends = discounted_cumsum(y[..., -1], decay**size, chunk=chunk)
        carry = F.pad(ends[..., :-1], (1, 0))
        powers = torch.tensor(decay, dtype=torch.float64) ** torch.arange(1, size + 1, dtype=torch.float64)
        y = y + carry[..., None] * powers.to(y.dtype).to(y.device)
    return y.flatten(-2)[..., :length]


class FIPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    half_life: float = Field(32.0, gt=0.0, description="τ in tokens; the future-KL decay is γ = 2^(−1/τ)")
    filter_threshold: float = Field(10.0, gt=1.0, description="c: tokens with Δ > log c leave the future sum")
    clip_mode: Literal["high_only", "symmetric"] = "high_only"
    rho_low: float = Field(0.2, ge=0.0, lt=1.0, description="symmetric mode only: f ≥ 1 − rho_low")
    rho_high: float = Field(0.2, ge=0.0)
    safety_threshold: float = Field(10.0, gt=0.0, description="A < 0 and r > this: f clamped to [0.8, 1]")
    drop_exploded_responses: bool = True


@register_token_weight("fipo", params=FIPOParams, needs_off_policy=True)
def fipo_weight(advantages: Tensor, delta: Tensor, mask: Tensor, params: FIPOParams) -> Tensor | tuple[Tensor, Tensor]:
    """FIPO influence weight f (no gradient); the loss uses A·f.

    M_k = 1[Δ_k ≤ log c];  F_t = Σ_{k ≥ t} m_k·M_k·γ^(k−t)·Δ_k,  γ = 2^(−1/τ)  (masked positions add 0
    but count as distance);  f_t = clip(exp(F_t), lo, 1 + ρ_high) with lo = 1 (`high_only`, the 32B
    recipe) or 1 − ρ_low (`symmetric`, the 7B recipe [0.8, 1.2]).  Where A_t < 0 and r_t = exp(Δ_t)
    exceeds `safety_threshold` (32B: 10, 7B: 3), f_t ← clamp(f_t, 0.8, 1).  With
    `drop_exploded_responses`, a response with more than one negative-advantage token at r > c
    leaves the loss, its tokens out of the token-mean's denominator too, as the official code takes
    it out of the loss mask: the weight comes back as (f, keep).
    Shapes: advantages, delta, mask (B, T) -> (B, T), or ((B, T), keep (B, T)).
    """
    mask = mask.bool()
    delta = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    exploded = delta > math.log(params.filter_threshold)
    future = discounted_cumsum(torch.where(mask & ~exploded, delta, 0.0), 2.0 ** (-1.0 / params.half_life),
                               reverse=True)
    low = 1.0 if params.clip_mode == "high_only" else 1.0 - params.rho_low
    weight = future.exp().clamp(low, 1.0 + params.rho_high)
    negative = mask & (advantages < 0)
    unsafe = negative & (delta > math.log(params.safety_threshold))
    weight = torch.where(unsafe, weight.clamp(*SAFETY_CLIP), weight)
    if params.drop_exploded_responses:
        dropped = (negative & exploded).sum(dim=1, keepdim=True) > 1
        return torch.where(dropped, 0.0, weight), ~dropped.expand_as(mask)
    return weight


register_method(
    Method(
        name="fipo",
        advantage="grpo",
        token_weight="fipo",
        defaults={
            "reward.correct": 1.0,
            "reward.wrong": -1.0,
            "loss.eps_low": 0.2,
            "loss.eps_high": 0.28,
            "loss.dual_clip": 10.0,
            "loss.agg": "token-mean",
            "rollout.dynamic_sampling": True,
            "rollout.max_num_gen_batches": 10,
            "train.n_minibatches": 8,  # the paper's 8 updates per rollout batch: π_θ ≠ π_old from the second on
        },
        overlong_shaping=True,
        # 4 minibatches (π_θ ≠ π_old from the second) keep a short grid's FIPO steps affordable
        compare_overrides=("train.n_minibatches=4", "reward.overlong_max=96", "reward.overlong_buffer=16"),
        summary=(
            "FIPO (arXiv 2603.19835): DAPO with each token's advantage scaled by clip(exp(discounted future Δ)); "
            "needs several minibatches or epochs per rollout batch (otherwise Δ = 0 and it is DAPO): 8 minibatches "
            "by default, as the paper."
        ),
    )
)
