"""What sampling and scoring return: plain containers every engine and the trainer share."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Generation:
    """Sampled responses, row-aligned with the prompts they continue (prompt-major)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    truncated: list[bool]
    logprobs: list[list[float]] | None = None  # of each sampled token, when the engine gives them
    entropies: list[list[float]] | None = None  # of the distribution each token was drawn from, likewise
    calls: int = 1  # batched calls into the engine (generate, the kv-cache sampler, vLLM) that made them


@dataclass
class TokenScores:
    """Per-token outputs of one forward over prompt+response (response positions only)."""

    logprobs: Tensor  # (B, T)
    entropy: Tensor | None = None  # (B, T)
    hidden_states: Tensor | None = None  # (B, T, D), last decoder layer before the final norm
