"""Micro-batches under a token budget (`train.max_tokens_per_microbatch`).

A minibatch's rows are packed into micro-batches whose padded size, rows × (longest prompt +
longest response) after trimming, stays within the budget, so a forward's activations are
bounded by the budget instead of growing with prompts_per_step × group_size (verl's
`ppo_max_token_len_per_gpu` plays this part there).  The update runs one forward and backward per
micro-batch and one optimizer step per minibatch; each micro-batch's loss is divided by the
minibatch's totals (`MinibatchTotals`), so the gradients summed over its micro-batches are those
of the unsplit minibatch for every aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from creditrl.rollouts import Rollouts


@dataclass(frozen=True)
class MinibatchTotals:
    """The denominators of `aggregate` over a whole minibatch, for losses computed a micro-batch at a time.

    token-mean divides by `tokens` (Σ m), seq-mean-token-mean by `rows_with_tokens`,
    seq-mean-token-sum-norm by `rows`·norm_length.
    """

    tokens: int
    rows_with_tokens: int
    rows: int

    @classmethod
    def of(cls, mask: Tensor) -> MinibatchTotals:
        """The totals of a minibatch's response mask (B, T)."""
        lengths = mask.bool().sum(1)
        return cls(tokens=int(lengths.sum()), rows_with_tokens=int((lengths > 0).sum()), rows=mask.shape[0])


def pack_rows(prompt_lengths: Tensor, response_lengths: Tensor, budget: int) -> list[Tensor]:
    """Row indices of micro-batches with rows × (max prompt length + max response length) ≤ budget each.

    Rows are taken longest first (prompt + response) and added to the current micro-batch while its
    padded size stays within the budget; a row that does not fit starts the next one.  Every row is
    in exactly one micro-batch.  Shapes: lengths (B,) -> list of (b_k,) long tensors, Σ b_k = B.
    """
    total = prompt_lengths + response_lengths
    too_long = int(total.max()) if len(total) else 0
    if too_long > budget:
        raise ValueError(f"train.max_tokens_per_microbatch={budget} is below a single row's {too_long} tokens "
                         "(prompt + response); raise it to at least the longest row")
    order = torch.argsort(total, descending=True, stable=True).tolist()
    batches: list[list[int]] = []
    prompt_width = response_width = 0
    for row in order:
        p, r = int(prompt_lengths[row]), int(response_lengths[row])
        if batches:
            width = max(prompt_width, p) + max(response_width, r)
            if (len(batches[-1]) + 1) * width <= budget:
                batches[-1].append(row)
                prompt_width, response_width = max(prompt_width, p), max(response_width, r)
                continue
        batches.append([row])
        prompt_width, response_width = p, r
    return [torch.tensor(rows, dtype=torch.long) for rows in batches]


def micro_batches(rollouts: Rollouts, rows: Tensor, budget: int | None) -> list[Tensor]:
    """The rows of `rollouts` (a minibatch's indices, (b,)) as micro-batches under `budget` tokens (`pack_rows`);
    all of them at once without a budget."""
    if budget is None:
        return [rows]
    lengths = rollouts.prompt_mask[rows].sum(1), rollouts.response_mask[rows].sum(1)
    return [rows[part] for part in pack_rows(*lengths, budget)]


def combine_metrics(parts: list[tuple[dict[str, float], int]], summed: tuple[str, ...]) -> dict[str, float]:
    """One minibatch's metrics from its micro-batches' (metrics, response tokens): keys in `summed` (losses
    already divided by the minibatch's totals) add up, the others (token means) are weighted by tokens."""
    tokens = sum(n for _, n in parts)
    out: dict[str, float] = {}
    for metrics, n in parts:
        for key, value in metrics.items():
            share = 1.0 if key in summed else n / max(tokens, 1)
            out[key] = out.get(key, 0.0) + share * float(value)
    return out
