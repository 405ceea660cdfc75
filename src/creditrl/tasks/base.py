"""What every task gives the trainer: problems to sample from and a verifier for responses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer.

    `prompt` is the raw question text (the policy backend applies any chat template);
    `meta` carries task-specific facts such as the lab's step count or MATH's level.
    """

    id: str
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """The verifier's judgement of one response.

    `step_correct[j]` is the exact correctness of step j (steps as the task's splitter cuts
    them); it is None when the task cannot judge steps (GSM8K, MATH).
    """

    correct: bool
    step_correct: tuple[bool, ...] | None = None
    format_ok: bool = True
    answer: str | None = None  # the extracted final answer (for majority voting)

    @property
    def first_wrong_step(self) -> int | None:
        if self.step_correct is None:
            return None
        return next((j for j, ok in enumerate(self.step_correct) if not ok), None)


class Task(Protocol):
    """A source of problems plus a verifier. Splits are fixed by the task's seed."""

    name: str
    step_splitter: str  # a name known to creditrl.steps

    def train_problems(self) -> Sequence[Problem]: ...

    def eval_problems(self) -> Sequence[Problem]: ...

    def verify(self, problem: Problem, response: str) -> Verdict: ...
