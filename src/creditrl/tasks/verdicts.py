"""Graded verdicts, and judging many responses at once.

A task whose outcome is a share (unit tests passed) returns a `ScoredVerdict`: its `score` in
[0, 1] sets the reward R = wrong + (correct − wrong)·score, and its `failure` names why a
response fell short, which the trainer counts per step (`failure/<reason>`).  A task that runs
responses in parallel defines `verify_batch(problems, responses)`; `verify_all` uses it when present.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from creditrl.tasks.base import Problem, Task, Verdict


@dataclass(frozen=True)
class ScoredVerdict(Verdict):
    score: float = 0.0  # in [0, 1]: the share of the task's checks passed
    failure: str | None = None  # why it scored below 1 (e.g. "timeout", "tests_failed"); None when it did not


def score_of(verdict: Verdict) -> float:
    """A verdict's graded outcome: its score when it has one, else 1 when correct and 0 when not."""
    return verdict.score if isinstance(verdict, ScoredVerdict) else float(verdict.correct)


def failure_of(verdict: Verdict) -> str | None:
    return verdict.failure if isinstance(verdict, ScoredVerdict) else None


def verify_all(task: Task, problems: Sequence[Problem], responses: Sequence[str]) -> list[Verdict]:
    """`task.verify` of each (problem, response) pair, through the task's `verify_batch` when it has one."""
    batch = getattr(task, "verify_batch", None)
    if batch is not None:
        return list(batch(problems, responses))
    return [task.verify(p, r) for p, r in zip(problems, responses)]
