"""Countdown: reach a target from a few given numbers with + − × ÷ (the task of TinyZero and reasoning-gym).

A problem reads ``Numbers: 3 7 25 5. Target: 47.``; the expected response writes one operation per
line, then the answer::

    25-5=20
    20+3=23
    ...
    Answer: 47

The rules are the game's: each given number, and each result, is used at most once; every result is a
positive integer (no zero or negative differences, division only when exact).  Each line gets two
exact labels:

- *valid*: both operands are available (given numbers or earlier results, not yet used), the
  arithmetic is right and the result a positive integer;
- *solvable*: the line is valid and afterwards the target can still be reached from what is
  available (exhaustive search, cached).

A valid step can lose the game (``3*5=15`` when only ``3+5`` leads on to the target), so the two
differ.  *Solvable* is the primary label (`Verdict.step_correct`): a wrong response's first
unsolvable step is where the game was lost, which is what credit assignment should find, while its
first invalid step, after a losing but legal move, is only the answer line that claims a target never
reached.  A step is judged on the state the response itself carries: a line whose operands are
available uses them up and makes its written result available, even when miscomputed (a line whose
operands are not changes nothing), so an error is blamed where it happens.  The answer line is
right when it states the target and the target is available.  The outcome is right when every
operation is valid and the answer line is right.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from creditrl.config import CountdownSection
from creditrl.steps import split_steps
from creditrl.tasks.base import Problem, Verdict
from creditrl.tasks.lab import ALPHABET  # the lab's, so that a countdown model can start from the lab model
from creditrl.tasks.registry import register_task
from creditrl.tasks.splits import GeneratedSplits

OPERATIONS = "+-*/"
_QUESTION = re.compile(r"^Numbers: (\d+(?: \d+)*)\. Target: (\d+)\.$")
_LINE = re.compile(r"^(\d+)([+\-*/])(\d+)=(-?\d+)$")
_ANSWER = re.compile(r"^Answer: (-?\d+)$")


@dataclass(frozen=True)
class Puzzle:
    numbers: tuple[int, ...]
    target: int

    def question(self) -> str:
        return f"Numbers: {' '.join(map(str, self.numbers))}. Target: {self.target}."


def combine(a: int, op: str, b: int) -> int | None:
    """a op b when the game allows it (a positive integer result), else None."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a > b else None
    return a // b if a % b == 0 else None


def moves(values: tuple[int, ...]) -> list[tuple[int, str, int, int]]:
    """Every legal move (a, op, b, result) on a multiset of values, one per distinct (a, op, b)."""
    out = set()
    for i, j in itertools.permutations(range(len(values)), 2):
        for op in OPERATIONS:
            result = combine(values[i], op, values[j])
            if result is not None:
                out.add((values[i], op, values[j], result))
    return sorted(out)


def after_move(values: tuple[int, ...], a: int, b: int, result: int | None) -> tuple[int, ...]:
    """The sorted multiset once a and b (both present) are used up and `result` (None: nothing) added."""
    rest = list(values)
    rest.remove(a)
    rest.remove(b)
    return tuple(sorted(rest + ([] if result is None else [result])))


@lru_cache(maxsize=1 << 18)
def solvable(values: tuple[int, ...], target: int) -> bool:
    """Whether `target` is among, or can be made from, the sorted multiset `values` by legal moves.
    Multiplying or dividing by 1 never helps, so those moves are skipped."""
    if target in values:
        return True
    return any(solvable(after_move(values, a, b, r), target)
               for a, op, b, r in moves(values) if not (op in "*/" and b == 1))


def sample_puzzle(rng: random.Random, cfg: CountdownSection) -> Puzzle:
    """Random numbers combined by random legal moves (using them all) into a target in 2..target_max that is
    not itself a given number."""
    n = rng.randint(cfg.min_numbers, cfg.max_numbers)
    while True:
        numbers = tuple(rng.randint(1, cfg.number_max) for _ in range(n))
        values = tuple(sorted(numbers))
        while len(values) > 1:
            a, _, b, r = rng.choice(moves(values))
            values = after_move(values, a, b, r)
        if 2 <= values[0] <= cfg.target_max and values[0] not in numbers:
            return Puzzle(numbers, values[0])


def parse_question(question: str) -> Puzzle:
    m = _QUESTION.match(question)
    if m is None:
        raise ValueError(f"not a countdown question: {question!r}")
    return Puzzle(tuple(int(x) for x in m[1].split()), int(m[2]))


def judge(puzzle: Puzzle, response: str) -> Verdict:
    """Outcome and both step labels of a response, one step per `newline`-splitter step."""
    lines = [response[start:end].strip() for start, end in split_steps(response, CountdownTask.step_splitter)]
    if not lines:  # an empty response is one wrong step (its end-of-sequence token)
        return Verdict(correct=False, step_correct=(False,), format_ok=False,
                       step_labels={"valid": (False,), "solvable": (False,)})
    values = tuple(sorted(puzzle.numbers))
    valid: list[bool] = []
    winning: list[bool] = []
    answer: int | None = None
    for j, line in enumerate(lines):
        op_line, answer_line = _LINE.match(line), _ANSWER.match(line)
        if op_line:
            a, op, b, written = int(op_line[1]), op_line[2], int(op_line[3]), int(op_line[4])
            available = not Counter((a, b)) - Counter(values)
            ok = available and combine(a, op, b) == written
            if available:  # a miscomputed result is carried on; one no move could give (≤ 0) is dropped
                values = after_move(values, a, b, written if written > 0 else None)
            valid.append(ok)
            winning.append(ok and solvable(values, puzzle.target))
        elif answer_line and j == len(lines) - 1:
            answer = int(answer_line[1])
            right = answer == puzzle.target and answer in values
            valid.append(right)
            winning.append(right)
        else:
            valid.append(False)
            winning.append(False)
    correct = answer is not None and all(valid)
    return Verdict(correct=correct, step_correct=tuple(winning), format_ok=answer is not None,
                   answer=None if answer is None else str(answer),
                   step_labels={"valid": tuple(valid), "solvable": tuple(winning)})


def noisy_solution(puzzle: Puzzle, rng: random.Random, error_rate: float) -> str:
    """A solution that picks, at each step, a random move that keeps the target reachable, until the target is
    made; with probability `error_rate` a step is instead a slip (a winning move's result off by 1..10) or,
    as often, a legal move that loses.  After an error the play goes on from the written result with
    winning moves where any remain, else random legal ones, and the answer is the last result."""
    values, lines, last = tuple(sorted(puzzle.numbers)), [], puzzle.target
    while puzzle.target not in values and len(values) > 1:
        legal = moves(values)
        winning = [m for m in legal if solvable(after_move(values, m[0], m[2], m[3]), puzzle.target)]
        losing = [m for m in legal if m not in winning]
        a, op, b, result = rng.choice(winning or legal)
        if rng.random() < error_rate:
            if losing and rng.random() < 0.5:
                a, op, b, result = rng.choice(losing)
            else:
                result = max(1, result + rng.choice([-1, 1]) * rng.randint(1, 10))
        lines.append(f"{a}{op}{b}={result}")
        values, last = after_move(values, a, b, result), result
    return "\n".join(lines + [f"Answer: {last}"])


class CountdownTask(GeneratedSplits):
    """Seeded train and held-out splits of Countdown puzzles with an exact two-label step verifier."""

    name = "countdown"
    step_splitter = "newline"
    alphabet = ALPHABET

    def __init__(self, cfg: CountdownSection | None = None):
        super().__init__(cfg or CountdownSection())

    def _generate(self, rng: random.Random) -> Problem:
        puzzle = sample_puzzle(rng, self.cfg)
        return Problem(id="countdown", prompt=puzzle.question(), answer=str(puzzle.target),
                       meta={"difficulty": len(puzzle.numbers)})

    def verify(self, problem: Problem, response: str) -> Verdict:
        return judge(parse_question(problem.prompt), response)

    def noisy_solution(self, problem: Problem, rng: random.Random, error_rate: float) -> str:
        return noisy_solution(parse_question(problem.prompt), rng, error_rate)


@register_task("countdown", config=CountdownSection, bundled_model="countdown")
def countdown_task(cfg: CountdownSection) -> CountdownTask:
    """Countdown with the section's knobs."""
    return CountdownTask(cfg)
