"""Statistics over a batch's prompt groups: the rows that share a `group_ids` entry.

Rows of a group need not be contiguous.  `group_index` gives each row's group in 0..G−1, the
`index` (B,) that the other functions take; they return per-group (G,) or per-row (B, ...) values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_index(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) index of each row's group in 0..G−1 and (G,) group sizes."""
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return index, counts


def group_sum(values: Tensor, index: Tensor, n_groups: int) -> Tensor:
    """(G,) sum of per-row values (B,) within each group."""
    return values.new_zeros(n_groups).index_add_(0, index, values)


def group_spread(values: Tensor, index: Tensor, n_groups: int, valid: Tensor | None = None) -> Tensor:
    """(G,) whether a group's valid values differ at all (a NaN among them counts, so that it reaches the
    advantages and stops the step): values (B, ...), valid of its shape (None: every value), index (B,).

    Normalised rewards of a group that agree are exactly 0 by definition; computed they are
    (x − mean)/(std + eps) with mean off x by a rounding (−0.1 summed in float32), a push of
    ±0.01–0.06 on the whole group that nothing in the rewards asked for, so callers zero them.
    """
    valid = torch.ones_like(values, dtype=torch.bool) if valid is None else valid
    flat, ok = (values.flatten(1), valid.flatten(1)) if values.dim() > 1 else (values[:, None], valid[:, None])
    high = flat.masked_fill(~ok, -torch.inf).amax(dim=1)
    low = flat.masked_fill(~ok, torch.inf).amin(dim=1)
    group_high = high.new_full((n_groups,), -torch.inf).scatter_reduce(0, index, high, "amax")
    group_low = low.new_full((n_groups,), torch.inf).scatter_reduce(0, index, low, "amin")
    return (group_high > group_low) | group_high.isnan()


def group_normalize(values: Tensor, index: Tensor, n_groups: int, valid: Tensor | None = None, *, eps: float = 1e-6,
                    scale_by_std: bool = True) -> Tensor:
    """x̃ = (x − mean_g) / (std_g + eps) over all valid values of the group (std unbiased); without
    `scale_by_std`, x̃ = x − mean_g.

    Invalid values and every value of a group whose valid values all agree (one value included)
    get 0 (see `group_spread`).  Shapes: values (B,) or (B, K), valid (None: every value) of its
    shape, index (B,) -> values' shape.
    """
    valid = torch.ones_like(values, dtype=torch.bool) if valid is None else valid
    rows, ok = (values, valid) if values.dim() > 1 else (values[:, None], valid[:, None])
    n_valid = group_sum(ok.sum(dim=1).to(values.dtype), index, n_groups)
    mean = group_sum(torch.where(ok, rows, 0.0).sum(dim=1), index, n_groups) / n_valid.clamp(min=1)
    centred = torch.where(ok, rows - mean[index, None], 0.0)
    normed = centred
    if scale_by_std:
        var = group_sum(centred.square().sum(dim=1), index, n_groups) / (n_valid - 1).clamp(min=1)
        normed = centred / (var.sqrt()[index, None] + eps)
    normed = torch.where(ok & group_spread(values, index, n_groups, valid)[index, None], normed, 0.0)
    return normed.view_as(values)


def leave_one_out_mean(values: Tensor, index: Tensor, counts: Tensor) -> Tensor:
    """b_i = (Σ_{j ∈ g(i)} x_j − x_i) / (n_g − 1), the mean of the other rows of row i's group
    (a group of one: x_i − x_i = 0).  Shapes: values (B,), index (B,), counts (G,) -> (B,).
    """
    row_counts = counts.to(values.dtype)[index]
    return (group_sum(values, index, len(counts))[index] - values) / (row_counts - 1).clamp(min=1)
