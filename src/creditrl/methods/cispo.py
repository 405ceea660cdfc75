"""CISPO: a clipped, stop-gradient importance weight on the log-probability (MiniMax-M1, arXiv 2506.13585).

PPO's clip zeroes the gradient of a token whose ratio left the trust region, so rare, decisive tokens
("However", "Recheck") stop learning after the first update.  CISPO clips the weight instead and keeps
every token's gradient: ℓ_t = −sg[clip(r_t, 1 − ε_low, 1 + ε_high)]·A_t·log π_θ(y_t).  MiniMax-M1 sets no
lower bound (ε_low = 1 here) and aggregates over all tokens; ScaleRL (arXiv 2510.13786) caps the weight at
5 (ε_high = 4), TRL's recommended value.  verl's `cispo` loss is this form; TRL's `cispo` is it with
ε_low = 1 and its `epsilon_high` the cap 1 + ε_high.
"""

from __future__ import annotations

from pydantic import BaseModel
from torch import Tensor

from creditrl.config import LossConfig
from creditrl.methods.loss import Surrogate, importance_ratio
from creditrl.methods.registry import Method, register_method, register_policy_loss


@register_policy_loss("cispo")
def cispo_surrogate(log_ratio: Tensor, logprobs: Tensor, advantages: Tensor, cfg: LossConfig,
                    params: BaseModel) -> Surrogate:
    """ℓ = −sg[w]·A·log π with w = clip(r, 1 − ε_low, 1 + ε_high), r = exp(Δ'); the gradient is −w·A·∇log π.
    Flag `clip_frac`: tokens whose weight was clipped.  Shapes: (B, T) each."""
    ratio = importance_ratio(log_ratio)
    weight = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high).detach()
    return Surrogate(-weight * advantages * logprobs, ratio, {"clip_frac": weight != ratio.detach()})


register_method(
    Method(
        name="cispo",
        advantage="grpo",
        policy_loss="cispo",
        defaults={"loss.eps_low": 1.0, "loss.eps_high": 4.0, "loss.agg": "token-mean"},
        summary=(
            "CISPO (MiniMax-M1, arXiv 2506.13585): GRPO advantages on −sg[min(r, 5)]·A·log π, a clipped "
            "stop-gradient importance weight that keeps every token's gradient; token-mean."
        ),
    )
)
