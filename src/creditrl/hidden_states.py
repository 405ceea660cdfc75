"""The resource `hidden_states`: the policy's last-layer hidden states, whole groups at a time (DenseR).

A batch's states (B, T, D) are too large to hold for a real model (15 GiB for 16 rows of 4096
tokens at D = 3584), so an advantage that reads them walks the batch in chunks of whole groups:

    for rows, hidden in hidden_states.by_groups(rollouts):    # hidden (rows, T, D)
        ...

`PolicyHiddenStates` runs one no-grad forward per chunk and keeps the log-probs that forward also
gives, so the trainer takes them as the old log-probs instead of scoring the batch again;
`StoredHiddenStates` serves states computed elsewhere (B, T, D) in the same chunks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from creditrl.policy.transformers_backend import TransformersPolicy, evaluation_mode
from creditrl.rollouts import Rollouts, pad_cols, trimmed


def group_chunks(group_ids: Tensor, size: int) -> list[Tensor]:
    """Row indices in chunks of whole groups, up to `size` rows each (one group if it alone is larger)."""
    chunks, current, n_rows = [], [], 0
    for group in torch.unique(group_ids):
        rows = (group_ids == group).nonzero().squeeze(1)
        if current and n_rows + len(rows) > size:
            chunks.append(torch.cat(current))
            current, n_rows = [], 0
        current.append(rows)
        n_rows += len(rows)
    return chunks + [torch.cat(current)]


class PolicyHiddenStates:
    """Hidden states from forwards of the policy, `batch_size` rows (whole groups) at a time."""

    def __init__(self, policy: TransformersPolicy, temperature: float = 1.0, batch_size: int = 64,
                 buckets: int = 1):
        self.policy, self.temperature, self.batch_size, self.buckets = policy, temperature, batch_size, buckets
        self.logprobs: Tensor | None = None  # (B, T) of the last batch walked to the end
        self.forwards = 0  # sequences put through a forward since the last reset

    def reset(self, seed: int) -> None:
        self.logprobs, self.forwards = None, 0

    def metrics(self) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def by_groups(self, rollouts: Rollouts) -> Iterator[tuple[Tensor, Tensor]]:
        """(rows, hidden (rows, T', D)) per chunk, T' ≤ T the chunk's longest response, from the old-log-prob
        forward (eval mode, the sampling temperature); once every chunk is done, `logprobs` holds the batch's
        (B, T) log-probs."""
        width, parts, order = rollouts.response_ids.shape[1], [], []
        with evaluation_mode(self.policy.model):
            for rows in group_chunks(rollouts.group_ids, self.batch_size):
                sub = trimmed(rollouts.select(rows)).to(self.policy.device)
                scores = self.policy.score(sub.prompt_ids, sub.prompt_mask, sub.response_ids, sub.response_mask,
                                           self.temperature, with_hidden=True, buckets=self.buckets)
                self.forwards += len(rows)
                parts.append(pad_cols(scores.logprobs.cpu(), width))
                order.append(rows)
                yield rows, scores.hidden_states
        self.logprobs = torch.cat(parts)[torch.cat(order).argsort()]


class StoredHiddenStates:
    """States computed elsewhere, (B, T, D) row-aligned with the batch, served like `PolicyHiddenStates`."""

    def __init__(self, hidden: Tensor, batch_size: int = 64):
        self.hidden, self.batch_size = hidden, batch_size

    def by_groups(self, rollouts: Rollouts) -> Iterator[tuple[Tensor, Tensor]]:
        for rows in group_chunks(rollouts.group_ids, self.batch_size):
            yield rows, self.hidden[rows]
