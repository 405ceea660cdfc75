"""Outcome reward shaping: the verifier's verdict, format, and DAPO's soft overlong punishment.

R_i = (correct if the verdict is right else wrong), or wrong + (correct − wrong)·score for a graded verdict
      − format_weight · 1[format not ok]            (only when format_weight > 0; see RewardConfig)
      + overlong_penalty · overlong(|o_i|)           (only when overlong_max is set)
"""

from __future__ import annotations

import torch
from torch import Tensor

from creditrl.config import RewardConfig


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int) -> Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, §3.4), per response (B,).

    With L_max = max_len, L_cache = buffer: 0 if |o| ≤ L_max − L_cache;
    ((L_max − L_cache) − |o|) / L_cache inside the buffer; −1 beyond L_max.
    A buffer of 0 gives the hard version (0 up to L_max, −1 beyond).
    """
    lengths = lengths.to(torch.float32)
    start = max_len - buffer
    inside = (start - lengths) / max(buffer, 1)
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), inside)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)


def outcome_rewards(correct: Tensor, lengths: Tensor, format_ok: Tensor, cfg: RewardConfig,
                    scores: Tensor | None = None) -> Tensor:
    """Scalar reward per response (B,) from the verdict (B,) bool, response lengths (B,) and format (B,) bool;
    with graded `scores` (B,) in [0, 1] (a share of unit tests passed), wrong + (correct − wrong)·score."""
    correct = correct.bool()
    if scores is None:
        scores = correct.float()
    if cfg.format_weight > 0:
        scores = torch.where(format_ok.bool(), scores, 0.0)
    rewards = (cfg.wrong + (cfg.correct - cfg.wrong) * scores).to(torch.float32)
    if cfg.format_weight > 0:
        rewards = rewards - cfg.format_weight * (~format_ok.bool()).float()
    if cfg.overlong_max is not None:
        rewards = rewards + cfg.overlong_penalty * overlong_penalty(lengths, cfg.overlong_max, cfg.overlong_buffer)
    return rewards
