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

TILE_ROWS = 24  # tokens of row i per tile of the band search (fewer when the other rows are longer)
KEY_BYTES = 2 ** 25  # the other rows' tokens gathered for one chunk of the band search
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


def window_similarity(states: Tensor, mask: Tensor, window: int) -> Tensor:
    """s_ij(t) = max(0, max_{|u − c| ≤ W, m_{j,u}} cos(h_{i,t}, h_{j,u})), c = ⌊t·T_j / T_i⌋, for i ≠ j, m_{i,t}.

    The dot products needed form a band of width 2W + 1 around the line u = t·T_j / T_i.  For each
    row i the band is covered by tiles: k consecutive tokens of i against the span of j's tokens
    that their windows reach (k·T_j / T_i + 2W + 1 of them), one matrix product per tile, all tiles
    and rows j batched.  k is TILE_ROWS, made smaller when the other rows are longer than i so that
    a tile spans about TILE_ROWS tokens of the longest; the tiles hold about (TILE_ROWS + 2W + 1) /
    (2W + 1) times the band's products.  The other rows' tokens are gathered into one buffer of
    KEY_BYTES, as many rows j at a time as fit (one row at least).  Cost O(G²·T·(TILE_ROWS + 2W)·D),
    memory O(G²·T) besides the buffer.  cos(h, h') = h·h' / (max(‖h‖, ε)·max(‖h'‖, ε)), ε = 1e-12 (as
    torch's `normalize`): the products of the states as given, scaled afterwards, so that the
    states are not copied.  T_i = Σ_t m_{i,t}; entries with i = j or m_{i,t} = 0 stay 0.
    Shapes: states (G, T, D) float; mask (G, T) bool -> s (G, G, T).
    """
    n_rows, width, dim = states.shape
    lengths = mask.sum(1)
    inverse_norm = 1.0 / torch.linalg.vector_norm(states, dim=-1).clamp(min=1e-12)  # (G, T)
    tokens = states.reshape(n_rows * width, dim)
    sim = states.new_zeros(n_rows, n_rows, width)
    offsets = torch.arange(2 * window + 1, device=mask.device)
    buffer = states.new_empty(0)
    for i in range(n_rows):
        positions = torch.nonzero(mask[i]).squeeze(1)
        others = torch.nonzero(torch.arange(n_rows, device=mask.device) != i).squeeze(1)
        if len(positions) == 0 or len(others) == 0:
            continue
        n_pos, length = len(positions), int(lengths[i])
        rows_per_tile = max(1, min(TILE_ROWS, TILE_ROWS * length // max(int(lengths[others].max()), 1)))
        n_tiles = -(-n_pos // rows_per_tile)
        # the last tile is filled up with i's last token, so that its span stays within j's length
        t = positions[torch.arange(n_tiles * rows_per_tile, device=mask.device).clamp(max=n_pos - 1)]
        t = t.view(n_tiles, rows_per_tile)
        queries = states[i].index_select(0, t.flatten()).view(n_tiles, rows_per_tile, dim)
        query_scale = inverse_norm[i, t][None, :, :, None]  # (1, tiles, k, 1)
        others = others[torch.argsort(lengths[others])]  # chunks of rows j of similar lengths: similar spans
        centre = t * lengths[others, None, None] // length  # (J, tiles, k)
        first = centre[:, :, :1]  # each tile's span of j's tokens starts at first − W
        spans = (centre[:, :, -1] - centre[:, :, 0]).amax(1) + 2 * window + 1  # (J,)
        keys_per_row = n_tiles * int(spans.max()) * dim
        per_chunk = max(1, KEY_BYTES // states.element_size() // keys_per_row)
        if buffer.numel() < min(per_chunk, len(others)) * keys_per_row:  # at least one row j's keys
            buffer = states.new_empty(min(per_chunk, len(others)) * keys_per_row)
        for start in range(0, len(others), per_chunk):
            rows = slice(start, start + per_chunk)
            js, span = others[rows], int(spans[rows].max())
            band = (centre[rows] - first[rows])[..., None] + offsets  # (J', tiles, k, 2W + 1): places in the span
            u = first[rows] - window + torch.arange(span, device=mask.device)  # (J', tiles, span)
            inside = (u >= 0) & (u < width)
            u = u.clamp(0, width - 1)
            inside &= mask[js[:, None, None], u]
            flat = (js[:, None, None] * width + u).transpose(0, 1).flatten()  # tile-major
            keys = torch.index_select(tokens, 0, flat, out=buffer[:flat.numel() * dim].view(-1, dim))
            dots = torch.bmm(queries, keys.view(n_tiles, -1, dim).transpose(1, 2))  # (tiles, k, J'·span)
            dots = dots.view(n_tiles, rows_per_tile, len(js), span).permute(2, 0, 1, 3)
            key_scale = inverse_norm[js[:, None, None], u][:, :, None, :].expand(-1, -1, rows_per_tile, -1)
            cos = dots.gather(-1, band) * query_scale * key_scale.gather(-1, band)
            valid = inside[:, :, None, :].expand(-1, -1, rows_per_tile, -1).gather(-1, band)
            best = cos.masked_fill(~valid, 0.0).amax(-1).clamp(min=0.0)  # (J', tiles, k)
            sim[i, js[:, None], positions] = best.flatten(1)[:, :n_pos]
    return sim


def denser_weights(hidden: Tensor, mask: Tensor, negative: Tensor, params: DenseRParams) -> Tensor:
    """Per-token weights of one group (Bansal 2026, DenseR blog; methods.md §6).

    P = rows with A_i ≥ 0, N = rows with A_i < 0 (`negative`); if either is empty, w = 1.
    s_ij(t) = max(0, max_{|u − c| ≤ W, m_{j,u}} cos(h_{i,t}, h_{j,u})) with c = ⌊t·T_j / T_i⌋
    (0 if the window holds no token of j; see `window_similarity`); Div_S(i,t) =
    (1 − mean_{j ∈ S} s_ij(t))·m_{i,t}, which is m_{i,t} when S is empty.  c = α_c·Div_cross +
    α_w·Div_within (S: the opposite class, the own class without i); ĉ = c / mean over i's tokens
    of c (ĉ = 1 where c ≡ 0, i.e. where that mean is below (α_c + α_w)·DIVERGENCE_TOLERANCE);
    w = (1 − β) + β·ĉ.  Computed in float32.
    Shapes: hidden (G, T, D), mask (G, T), negative (G,) bool -> w (G, T) float32.
    """
    n_rows, width = mask.shape
    if negative.all() or not negative.any():
        return torch.ones(n_rows, width, device=hidden.device)
    mask = mask.bool()
    sim = window_similarity(hidden.float(), mask, params.window)
    same = negative[:, None] == negative[None, :]
    within = same & ~torch.eye(n_rows, dtype=torch.bool, device=mask.device)
    credit = params.alpha_c * _divergence(sim, ~same, mask) + params.alpha_w * _divergence(sim, within, mask)
    mean = credit.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
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
