"""The one batch every stage reads: sampled responses as tensors, with step spans.

Shapes: B = P·G rows (prompt-major: rows of one group are contiguous), T = padded response
length, S = the largest number of steps in any response.  Responses are right-padded; prompts
are left-padded.  `step_ids[b, t]` is the index of the step that response token t belongs to
(−1 on padding); it is computed once, from token offsets, when the response is sampled.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from creditrl.tasks.base import Problem


@dataclass
class Rollouts:
    prompt_ids: Tensor  # (B, Tp) long, left-padded
    prompt_mask: Tensor  # (B, Tp) bool
    response_ids: Tensor  # (B, T) long, right-padded
    response_mask: Tensor  # (B, T) bool, True on real response tokens
    group_ids: Tensor  # (B,) long, one id per prompt
    step_ids: Tensor  # (B, T) long, token -> step index, -1 on padding
    rewards: Tensor  # (B,) float, outcome reward after any shaping
    correct: Tensor  # (B,) bool, the verifier's verdict
    truncated: Tensor  # (B,) bool, hit the token limit before finishing
    step_labels: Tensor | None = None  # (B, S) long: 1 right, 0 wrong, -1 unknown/absent
    named_step_labels: list[dict[str, tuple[bool, ...]]] | None = None  # row -> the verifier's labels by name
    step_rewards: Tensor | None = None  # (B, S) float, NaN where a response has no step j
    old_logprobs: Tensor | None = None  # (B, T) float, log π_old of each response token
    old_entropy: Tensor | None = None  # (B, T) float, entropy of π_old where each response token was drawn
    ref_logprobs: Tensor | None = None  # (B, T) float, log π_ref (only when β > 0)
    response_texts: list[str] | None = None
    problem_index: list[int] | None = None  # row -> index into the batch's problem list
    problems: list[Problem] | None = None  # row -> its problem (to verify continuations of its prefixes)
    failures: list[str | None] | None = None  # row -> why its verdict fell short, when the task says (e.g. "timeout")

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(dim=1)

    @property
    def num_steps(self) -> Tensor:
        """(B,) number of steps in each response."""
        return (self.step_ids.max(dim=1).values + 1).clamp(min=0)

    def select(self, rows: Tensor) -> "Rollouts":
        """The sub-batch of the given row indices (tensors and lists alike)."""
        rows = rows.to(torch.long)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                picked[f.name] = None
            elif isinstance(value, Tensor):
                picked[f.name] = value[rows]
            else:
                picked[f.name] = [value[i] for i in rows.tolist()]
        return replace(self, **picked)

    def to(self, device: torch.device | str) -> "Rollouts":
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **moved)


def aligned_step_labels(step_correct: tuple[bool, ...], n_steps: int) -> Tensor:
    """Verifier step labels aligned to the splitter's steps (−1 where the two disagree in count)."""
    labels = [int(ok) for ok in step_correct[:n_steps]]
    return torch.tensor(labels + [-1] * (n_steps - len(labels)) if n_steps else [-1], dtype=torch.long)


def pad_right(rows: list[Tensor], value: float | int, width: int | None = None) -> Tensor:
    """Stack 1-D (or N-D along dim 0) tensors of different lengths, padding at the end."""
    width = max((r.shape[0] for r in rows), default=0) if width is None else width
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def concat(batches: list[Rollouts]) -> Rollouts:
    """Concatenate rollout batches row-wise, re-padding prompts (left) and responses (right).

    `problem_index` refers to the batches' problem lists joined in order: each batch's indices are
    shifted by the problems of the batches before it (their largest index + 1)."""
    if len(batches) == 1:
        return batches[0]
    merged = {}
    for f in fields(Rollouts):
        values = [getattr(b, f.name) for b in batches]
        if any(v is None for v in values):
            merged[f.name] = None
        elif f.name == "problem_index":
            shifts = itertools.accumulate((max(v, default=-1) + 1 for v in values[:-1]), initial=0)
            merged[f.name] = [i + shift for v, shift in zip(values, shifts) for i in v]
        elif not isinstance(values[0], Tensor):
            merged[f.name] = [x for v in values for x in v]
        elif f.name in ("prompt_ids", "prompt_mask"):
            width = max(v.shape[1] for v in values)
            merged[f.name] = torch.cat([torch.nn.functional.pad(v, (width - v.shape[1], 0)) for v in values])
        elif values[0].dim() >= 2:
            width = max(v.shape[1] for v in values)
            fill = {"step_ids": -1, "step_labels": -1, "step_rewards": float("nan")}.get(f.name, 0)
            merged[f.name] = torch.cat([_pad_dim1(v, width, fill) for v in values])
        else:
            merged[f.name] = torch.cat(values)
    return Rollouts(**merged)


def _pad_dim1(x: Tensor, width: int, fill: float | int) -> Tensor:
    if x.shape[1] == width:
        return x
    pad = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), fill)
    return torch.cat([x, pad], dim=1)


def trimmed(r: Rollouts) -> Rollouts:
    """The batch without prompt columns that are padding in every row, nor response columns past the longest
    response (in place; returns it)."""
    keep_p = r.prompt_mask.any(0).nonzero()
    start = int(keep_p[0]) if len(keep_p) else r.prompt_mask.shape[1]
    width = int(r.response_mask.sum(1).max()) if r.batch_size else 0
    r.prompt_ids, r.prompt_mask = r.prompt_ids[:, start:], r.prompt_mask[:, start:]
    for name in ("response_ids", "response_mask", "step_ids", "old_logprobs", "old_entropy", "ref_logprobs"):
        value = getattr(r, name)
        if value is not None:
            setattr(r, name, value[:, :width])
    return r


def pad_cols(x: Tensor, width: int) -> Tensor:
    """x (B, T, ...) padded with zeros on the right of dim 1 to `width` columns."""
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]))
