"""From step scores to a solution score, and best-of-N selection with it (Lightman et al. 2023).

    product:  score_i = Π_j s_ij        minimum:  score_i = min_j s_ij
over the steps present (NaN entries skipped; a response with no scored step gets NaN).
Shapes: step scores (B, S) -> (B,).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["product", "min"]


def solution_scores(step_scores: Tensor, how: Aggregation = "product") -> Tensor:
    """(B, S) step P(correct), NaN where absent -> (B,) solution scores."""
    valid = ~torch.isnan(step_scores)
    if how == "product":
        scores = torch.where(valid, step_scores, 1.0).prod(dim=1)
    elif how == "min":
        scores = torch.where(valid, step_scores, torch.inf).min(dim=1).values
    else:
        raise ValueError(f"unknown aggregation {how!r}; use 'product' or 'min'")
    return torch.where(valid.any(dim=1), scores, torch.nan)


def best_of_n(scores: Tensor, group_ids: Tensor) -> Tensor:
    """(B,) solution scores and group ids -> (n_groups,) row index of each group's best response.

    Groups come in sorted id order; ties go to the earliest row; NaN scores rank last.
    """
    ranked = torch.nan_to_num(scores.float(), nan=-torch.inf)
    best = []
    for group in torch.unique(group_ids):
        rows = (group_ids == group).nonzero().squeeze(1)
        best.append(rows[torch.argmax(ranked[rows])])
    return torch.stack(best)
