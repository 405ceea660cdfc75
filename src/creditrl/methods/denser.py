"""DenseR: GRPO advantages reweighted per token by hidden-state divergence (methods.md §6).

The hidden states are the rollout policy's own (last decoder layer, before the final norm), from
the resource `hidden_states` (`creditrl.hidden_states`): one forward per chunk of whole groups, whose
log-probs the trainer keeps as the old log-probs, so DenseR costs no extra forward.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from creditrl.methods.grpo import GRPOParams, grpo
from creditrl.methods.registry import Method, register_advantage, register_method
from creditrl.rollouts import Rollouts

TEMPORARY_BYTES = 2 ** 28  # the similarity search's float32 temporaries, per window offset
# A row whose mean divergence, c̄ / (α_c + α_w), is below this has c ≡ 0 up to rounding: a float32 cosine of
# unit vectors is off by a few 2⁻²⁴ (about 1e-7, 1e-6 at most for D in the thousands), so identical
# states give c of that size and c / c̄ would be noise / noise.  1e-5 is ten times that bound, and
# a real divergence that small (1 − cos θ = 1e-5: θ ≈ 0.26°) is not resolved in float32 either.
DIVERGENCE_TOLERANCE = 1e-5


class DenseRParams(GRPOParams):
    alpha_c: float = Field(1.0, ge=0.0, description="weight of the divergence from the opposite class")
    alpha_w: float = Field(1.0, ge=0.0, description="weight of the divergence from the own class (recipe: 0.3)")
    beta: float = Field(1.0, ge=0.0, le=1.0, description="w = (1 − β) + β·ĉ (recipe: 0.1)")
    window: int = Field(5, ge=0, description="W: half-width of the aligned window searched in each other rollout")


def denser_weights(hidden: Tensor, mask: Tensor, negative: Tensor, params: DenseRParams) -> Tensor:
    """Per-token weights of one group (Bansal 2026, DenseR blog; methods.md §6).

    P = rows with A_i ≥ 0, N = rows with A_i < 0 (`negative`); if either is empty, w = 1.
    s_ij(t) = max(0, max_{|u − c| ≤ W, m_{j,u}} cos(h_{i,t}, h_{j,u})) with c = ⌊t·T_j / T_i⌋
    (0 if the window holds no token of j); Div_S(i,t) = (1 − mean_{j ∈ S} s_ij(t))·m_{i,t}, which is
    m_{i,t} when S is empty.  c = α_c·Div_cross + α_w·Div_within (S: the opposite class, the own
    class without i); ĉ = c / mean over i's tokens of c (ĉ = 1 where c ≡ 0, i.e. where that mean
    is below (α_c + α_w)·DIVERGENCE_TOLERANCE); w = (1 − β) + β·ĉ.
    Computed in float32 for a few rows i at a time, so that the (rows, G, T, D) temporaries of
    each window offset stay near TEMPORARY_BYTES (a whole group at once: 15 GiB for 16 rows of
    4096 tokens at D = 3584).
    Shapes: hidden (G, T, D), mask (G, T), negative (G,) bool -> w (G, T) float32.
    """
    n_rows, width = mask.shape
    if negative.all() or not negative.any():
        return torch.ones(n_rows, width, device=hidden.device)
    mask = mask.bool()
    h = torch.nn.functional.normalize(hidden.float(), dim=-1)
    lengths = mask.sum(1)
    positions = torch.arange(width, device=mask.device)
    other = torch.arange(n_rows, device=mask.device)[None, :, None]  # j, broadcast against centre
    sim = h.new_zeros(n_rows, n_rows, width)  # s_ij(t), starting from the clamp at 0
    per_chunk = max(1, TEMPORARY_BYTES // (4 * h[0].numel() * n_rows))
    for start in range(0, n_rows, per_chunk):
        rows = slice(start, start + per_chunk)
        centre = positions * lengths[None, :, None] // lengths[rows, None, None].clamp(min=1)  # (rows, G_j, T)
        part = sim[rows]  # a view: the maximum is taken in place
        for offset in range(-params.window, params.window + 1):
            u = centre + offset
            valid = (u >= 0) & (u < width)
            u = u.clamp(0, width - 1)
            valid &= mask[other, u]
            cos = (h[rows, None] * h[other, u]).sum(-1)
            torch.maximum(part, cos.masked_fill(~valid, 0.0), out=part)

    same = negative[:, None] == negative[None, :]
    within = same & ~torch.eye(n_rows, dtype=torch.bool, device=mask.device)
    credit = params.alpha_c * _divergence(sim, ~same, mask) + params.alpha_w * _divergence(sim, within, mask)
    mean = credit.sum(1, keepdim=True) / lengths[:, None].clamp(min=1)
    real = mean > (params.alpha_c + params.alpha_w) * DIVERGENCE_TOLERANCE
    normed = torch.where(real, credit / torch.where(real, mean, 1.0), 1.0)
    return (1.0 - params.beta) + params.beta * normed


def _divergence(sim: Tensor, refs: Tensor, mask: Tensor) -> Tensor:
    """(1 − mean_{j: refs[i, j]} s_ij(t))·m_{i,t}: sim (G, G, T), refs (G, G) bool -> (G, T)."""
    mean_sim = (sim * refs[..., None]).sum(1) / refs.sum(1, keepdim=True).clamp(min=1)
    return (1.0 - mean_sim) * mask


@register_advantage("denser", params=DenseRParams, needs=("hidden_states",), group_relative=True)
def denser(rollouts: Rollouts, params: DenseRParams, hidden_states) -> Tensor:
    """A_{i,t} = A_i·w_{i,t}: the GRPO advantage times `denser_weights` of the row's group.

    Defaults are the code's (α_c = α_w = β = 1, W = 5); the published recipe uses α_w = 0.3,
    β = 0.1.  `hidden_states.by_groups(rollouts)` gives the states (rows, T', D) a chunk of whole
    groups at a time.  A row without response tokens counts as P.
    Shapes: rewards (B,), group_ids (B,) -> (B, T).
    """
    adv = grpo(rollouts, params)
    negative = (adv < 0).any(1)
    weights = torch.ones_like(adv)
    for rows, hidden in hidden_states.by_groups(rollouts):
        width = hidden.shape[1]
        for group in torch.unique(rollouts.group_ids[rows]):
            in_group = rollouts.group_ids[rows] == group
            group_rows = rows[in_group]
            weights[group_rows, :width] = denser_weights(hidden[in_group], rollouts.response_mask[group_rows, :width],
                                                         negative[group_rows], params).to(adv.dtype)
    return adv * weights


register_method(
    Method(
        name="denser",
        advantage="denser",
        summary=(
            "DenseR (Bansal 2026, blog): GRPO advantages weighted per token by how far the rollout's hidden states "
            "are from those of the other rollouts of its prompt, correct vs wrong and within each class. Published "
            "recipe: method_params.alpha_w=0.3, method_params.beta=0.1, G=8, temperature 0.7, lr 1e-6, "
            "loss.eps_high=0.28."
        ),
    )
)
