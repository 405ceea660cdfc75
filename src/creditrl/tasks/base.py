"""What every task gives the trainer: problems to sample from and a verifier for responses."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer.

    `prompt` is the raw question text (the policy backend applies any chat template);
    `meta` carries task-specific facts such as the lab's step count or MATH's level; a generated
    task's problems carry `meta["difficulty"]`, an int (its difficulty knob's value).
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


class GeneratedTask(Task, Protocol):
    """A task whose problems a seeded generator draws, so a tiny model can be pretrained on it from scratch.

    `noisy_solution` is a full response (steps one per line, then the answer line) in which each step is,
    with probability `error_rate`, replaced by a plausible wrong step, the solution continuing from it:
    pretraining on such traces leaves the model an imperfect, localised error habit.  `alphabet` holds
    every character the task's prompts and responses can contain (the character tokenizer's vocabulary).
    Every problem's `meta["difficulty"]` is an int.  A generated task may also define
    `draw_problem(rng) -> Problem` (fresh training problems, never a held-out one): pretraining then draws
    from it instead of from `train_problems()`.
    """

    alphabet: str

    def noisy_solution(self, problem: Problem, rng: random.Random, error_rate: float) -> str: ...
