"""Outcome reward shaping: the verifier's verdict, format, and DAPO's soft overlong punishment.

R_i = (correct if the verdict is right else wrong)
      − format_weight · 1[format not ok]            (only when format_weight > 0; see RewardConfig)
      + overlong_penalty · overlong(|o_i|)           (only when overlong_max is set)
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor


class RewardConfig(BaseModel):
    """Reward shaping (config section `reward`).

    - `correct` / `wrong`: reward for a right / wrong final answer (DAPO uses +1 / −1).
    - `format_weight` (≥ 0): 0 ignores the format.  When > 0 the format is required: a
      response whose format is not ok counts as wrong whatever the verdict, and also loses
      `format_weight`, so it gets `wrong − format_weight`; good-format responses are unchanged.
    - `overlong_max` (L_max), `overlong_buffer` (L_cache), `overlong_penalty` (scale): DAPO's soft
      overlong punishment, off while `overlong_max` is None.  DAPO used L_max = 20480 with
      L_cache = 4096 (expected length 16384), i.e. L_max = the max new tokens and a buffer of a
      fifth of it: what `dapo` and `fipo` get when `overlong_max` is unset (`overlong_penalty=0`
      turns it off).
    """

    model_config = ConfigDict(extra="forbid")

    correct: float = 1.0
    wrong: float = 0.0
    format_weight: float = Field(0.0, ge=0.0)
    overlong_max: int | None = Field(None, gt=0)
    overlong_buffer: int = Field(0, ge=0)
    overlong_penalty: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _buffer_fits(self) -> "RewardConfig":
        if self.overlong_max is not None and self.overlong_buffer > self.overlong_max:
            raise ValueError(f"reward.overlong_buffer ({self.overlong_buffer}) must not exceed reward.overlong_max ({self.overlong_max})")
        return self


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


def outcome_rewards(correct: Tensor, lengths: Tensor, format_ok: Tensor, cfg: RewardConfig) -> Tensor:
    """Scalar reward per response (B,) from the verdict (B,) bool, response lengths (B,) and format (B,) bool."""
    correct = correct.bool()
    if cfg.format_weight > 0:
        correct = correct & format_ok.bool()
    rewards = torch.where(correct, cfg.correct, cfg.wrong).to(torch.float32)
    if cfg.format_weight > 0:
        rewards = rewards - cfg.format_weight * (~format_ok.bool()).float()
    if cfg.overlong_max is not None:
        rewards = rewards + cfg.overlong_penalty * overlong_penalty(lengths, cfg.overlong_max, cfg.overlong_buffer)
    return rewards
