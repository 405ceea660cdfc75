"""Log-probs of chosen tokens from final hidden states, without the batch's full float32 logits.

    log π(y_k | y_<k) = (W h_k)[y_k] / τ − logsumexp_v (W h_k)[v] / τ

computed over chunks of positions.  With gradients on and more than one chunk, each chunk is
checkpointed (`torch.utils.checkpoint`): its logits are dropped after the forward and rebuilt
from its hidden states in the backward, so at most one chunk of (tokens × vocabulary) float32
logits is alive at a time.  For a 152k vocabulary that is what lets 16 × 2048 tokens fit on a
GPU at all (the whole batch's logits alone would take 18.5 GiB).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from creditrl.methods.loss import token_entropy


def chosen_token_logprobs(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, temperature: float = 1.0,
                          with_entropy: bool = False, entropy_grad: bool = False,
                          chunk_elements: int = 2 ** 26) -> tuple[Tensor, Tensor | None]:
    """Per-position log-prob of `targets` (N,) given `hidden` (N, D), and optionally the entropy (N,).

    `head` maps hidden states to logits (the model's output projection).  `chunk_elements` bounds
    one chunk's logits (positions × vocabulary); the entropy carries gradients only with
    `entropy_grad`.  Temperature 0 (greedy sampling) scores at temperature 1.
    """
    vocab = head.out_features if isinstance(head, torch.nn.Linear) else head(hidden[:1]).shape[-1]
    per_chunk = max(1, chunk_elements // vocab)
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    divisor = temperature if temperature > 0 else 1.0

    def one_chunk(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = head(h).float()
        if divisor != 1.0:
            logits = logits / divisor
        logprob = logits.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            entropy = token_entropy(logits) if with_entropy else logprob.new_zeros(())
        return logprob, entropy

    chunks = list(zip(hidden.split(per_chunk), targets.split(per_chunk)))
    recompute = torch.is_grad_enabled() and len(chunks) > 1
    results = [checkpoint(one_chunk, h, y, use_reentrant=False) if recompute else one_chunk(h, y) for h, y in chunks]
    logprobs = torch.cat([lp for lp, _ in results])
    entropy = torch.cat([e for _, e in results]) if with_entropy else None
    return logprobs, entropy
