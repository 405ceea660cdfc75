"""GSPO: the sequence's importance ratio on every token (Zheng et al., Qwen, arXiv 2507.18071).

GSPO clips one ratio per response, s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|), the geometric mean of its
tokens' ratios, instead of each token's own.  With per-token advantages it takes the paper's GSPO-token
form, which is what verl's `gspo` loss computes: s_{i,t} = sg[s_i]·π_θ(y_t) / sg[π_θ(y_t)], equal to s_i
in value, with the gradient of token t's own log-probability.  With one advantage per response its
gradient is GSPO's (TRL's `importance_sampling_level="sequence"`).  The paper clips s_i to
[1 − 3·10⁻⁴, 1 + 4·10⁻⁴] and averages each response's tokens before the responses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from creditrl.methods.registry import Method, NoParams, register_method, register_ratio_transform


@register_ratio_transform("gspo")
def gspo_log_ratio(delta: Tensor, mask: Tensor, params: NoParams) -> Tensor:
    """log s_{i,t} = sg[(1/|y_i|)·Σ_k m_k·Δ_k] + Δ_t − sg[Δ_t]: the response's mean log-ratio in value, the
    token's own Δ in gradient.  Shapes: delta, mask (B, T) -> (B, T), 0 off the mask."""
    mask = mask.bool()
    lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1)
    sequence = (torch.where(mask, delta, 0.0).sum(dim=-1, keepdim=True) / lengths).detach()
    return torch.where(mask, sequence + delta - delta.detach(), 0.0)


register_method(
    Method(
        name="gspo",
        advantage="grpo",
        ratio_transform="gspo",
        defaults={
            "loss.eps_low": 3e-4,
            "loss.eps_high": 4e-4,
            "loss.dual_clip": None,
            "loss.agg": "seq-mean-token-mean",
            "train.n_minibatches": 4,  # the paper's four minibatch updates per rollout batch
        },
        summary=(
            "GSPO (arXiv 2507.18071): GRPO advantages with one importance ratio per response, the geometric mean "
            "of its tokens' ratios (GSPO-token form), clipped to [1 − 3e-4, 1 + 4e-4]; 4 minibatches per batch."
        ),
    )
)
