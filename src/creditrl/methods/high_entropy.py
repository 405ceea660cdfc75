"""The 80/20 rule: only the highest-entropy tokens get a gradient (Wang et al., Qwen, arXiv 2506.01939).

"Beyond the 80/20 Rule" finds that a minority of tokens, the forks where the policy is unsure what comes
next, carry RL's improvement in reasoning: keeping the gradient of only the top ρ = 20% of a batch's tokens
by the policy's entropy matches or beats training on all of them.  The token weight is f_t = 1 where
H_t ≥ the (1 − ρ)-quantile of H over the batch's response tokens (linear interpolation, as
`torch.quantile`), 0 elsewhere; the other tokens stay in the aggregation's denominator, as TRL's
`top_entropy_quantile` keeps them.  The batch is what the loss gets: one minibatch.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from creditrl.methods.grpo import DAPO_COMPARE_OVERRIDES, DAPO_DEFAULTS
from creditrl.methods.registry import Method, register_method, register_token_weight


class HighEntropyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rho: float = Field(0.2, gt=0.0, le=1.0, description="the share of the batch's tokens, by entropy, kept")


@register_token_weight("high_entropy", params=HighEntropyParams, needs_entropy=True)
def high_entropy_weight(advantages: Tensor, delta: Tensor, mask: Tensor, entropy: Tensor,
                        params: HighEntropyParams) -> Tensor:
    """f = 1[H ≥ quantile_{1−ρ}(H on the mask)] on the mask, 0 elsewhere (all 0 without tokens).
    Shapes: advantages, delta, mask, entropy (B, T) -> (B, T)."""
    mask = mask.bool()
    if not mask.any():
        return torch.zeros_like(advantages)
    values = entropy[mask]
    threshold = torch.quantile(values if values.dtype in (torch.float32, torch.float64) else values.float(),
                               1.0 - params.rho)
    return (mask & (entropy >= threshold)).to(advantages.dtype)


register_method(
    Method(
        name="high_entropy",
        advantage="grpo",
        token_weight="high_entropy",
        defaults=dict(DAPO_DEFAULTS),  # DAPO's, the paper's base recipe
        overlong_shaping=True,
        compare_overrides=DAPO_COMPARE_OVERRIDES,
        summary=(
            "The 80/20 rule (arXiv 2506.01939): DAPO whose gradient reaches only the top 20% of each batch's "
            "tokens by the policy's entropy (method_params.rho); the token weight combines with any advantage."
        ),
    )
)
