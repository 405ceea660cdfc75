"""SAPO: a soft, temperature-controlled gate in place of the hard clip (Gao et al., Qwen, arXiv 2511.20347).

Per token ℓ_t = −g_τ(r_t)·A_t with g_τ(r) = (4/τ)·σ(τ·(r − 1)), τ = τ_pos where A_t > 0, τ_neg otherwise.
Its gradient, −4σ(1 − σ)·r·A·∇log π, equals PPO's unclipped one at r = 1 and fades smoothly as r moves
away, instead of dropping to zero at the clip edge.  τ_neg > τ_pos makes negative updates fade faster:
they spread probability over the whole vocabulary and destabilise training sooner.  The paper's
τ_pos = 1, τ_neg = 1.05 (TRL's and verl's defaults), with each response's tokens averaged first.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from creditrl.config import LossConfig
from creditrl.methods.loss import Surrogate, importance_ratio
from creditrl.methods.registry import Method, register_method, register_policy_loss


class SAPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tau_pos: float = Field(1.0, gt=0.0, description="the gate's temperature where A > 0")
    tau_neg: float = Field(1.05, gt=0.0, description="the gate's temperature where A ≤ 0")


@register_policy_loss("sapo", params=SAPOParams)
def sapo_surrogate(log_ratio: Tensor, logprobs: Tensor, advantages: Tensor, cfg: LossConfig,
                   params: SAPOParams) -> Surrogate:
    """ℓ = −(4/τ)·σ(τ·(r − 1))·A, τ = τ_pos where A > 0 else τ_neg, r = exp(Δ'); no flags (nothing is
    clipped).  `cfg`'s clip ranges are not read.  Shapes: (B, T) each."""
    ratio = importance_ratio(log_ratio)
    tau = torch.full_like(ratio, params.tau_neg).masked_fill(advantages > 0, params.tau_pos)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    return Surrogate(-gate * advantages, ratio, {})


register_method(
    Method(
        name="sapo",
        advantage="grpo",
        policy_loss="sapo",
        defaults={"loss.agg": "seq-mean-token-mean"},
        summary=(
            "SAPO (arXiv 2511.20347): GRPO advantages on a soft gate (4/τ)·σ(τ(r − 1)) instead of the clip, "
            "τ = 1 for positive and 1.05 for negative advantages; seq-mean-token-mean."
        ),
    )
)
