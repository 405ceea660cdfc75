"""The lab task: multi-step arithmetic word problems whose every step can be checked exactly.

A problem is a start value and a chain of operations, e.g. ``Start 7. Add 5. Times 3. Minus 4.``
The expected response has one line per operation and a final answer line::

    7+5=12
    12*3=36
    36-4=32
    Answer: 32

Because the verifier knows the exact value after each operation, it reports the correctness of
every step, so "did a method blame the first wrong step?" is a number, not an anecdote.
A step is judged *locally*: line j is right when it applies operation j to the value the response
itself carried from line j−1 and computes the result correctly (an error is blamed once, where it
happens, not again on every later line); after a line that cannot be read as arithmetic, the next
line is judged on its own arithmetic.  The answer line is right when it repeats the last result.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

from creditrl.config import LabSection, LabTaskConfig
from creditrl.steps import split_steps
from creditrl.tasks.base import Problem, Verdict
from creditrl.tasks.registry import register_task

OPERATIONS = {"+": "Add", "-": "Minus", "*": "Times"}
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))  # printable ASCII: the bundled model's vocabulary
_LINE = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")  # values go negative once a response has erred
_ANSWER = re.compile(r"^Answer: (-?\d+)$")


@dataclass(frozen=True)
class Chain:
    start: int
    ops: tuple[tuple[str, int], ...]

    def values(self) -> list[int]:
        out = [self.start]
        for op, x in self.ops:
            out.append(apply(out[-1], op, x))
        return out

    def question(self) -> str:
        return f"Start {self.start}. " + " ".join(f"{OPERATIONS[op]} {x}." for op, x in self.ops)

    def solution(self) -> str:
        values = self.values()
        lines = [f"{v}{op}{x}={w}" for (op, x), v, w in zip(self.ops, values, values[1:])]
        return "\n".join(lines + [f"Answer: {values[-1]}"])


def apply(value: int, op: str, x: int) -> int:
    return value + x if op == "+" else value - x if op == "-" else value * x


def sample_chain(rng: random.Random, cfg: LabTaskConfig) -> Chain:
    """Draw one problem: a start value and operations keeping every value in 0..value_max."""
    value = rng.randint(1, cfg.start_max)
    start, ops = value, []
    for _ in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        choices = []
        if "+" in cfg.operations and value + 1 <= cfg.value_max:
            choices.append(("+", rng.randint(1, min(cfg.operand_max, cfg.value_max - value))))
        if "-" in cfg.operations and value >= 1:
            choices.append(("-", rng.randint(1, min(cfg.operand_max, value))))
        if "*" in cfg.operations and 1 <= value <= cfg.multiply_below:
            top = min(cfg.multiply_max, cfg.value_max // value)
            if top >= 2:
                choices.append(("*", rng.randint(2, top)))
        if not choices:
            raise ValueError(f"task.lab: no operation of {cfg.operations!r} can follow the value {value} (value_max "
                             f"{cfg.value_max}, multiply_below {cfg.multiply_below}); allow more operations")
        op, x = rng.choice(choices)
        ops.append((op, x))
        value = apply(value, op, x)
    return Chain(start, tuple(ops))


def noisy_chain_solution(chain: Chain, rng: random.Random, error_rate: float) -> str:
    """The chain's solution with each step's result moved by ±1..10 with probability `error_rate`,
    clipped at 0 (so a result already 0 moved down stays right: 1.5% of moves at error_rate 1; the
    bundled checkpoint was trained on exactly this data, so it is kept)."""
    value, lines = chain.start, []
    for op, x in chain.ops:
        result = apply(value, op, x)
        if rng.random() < error_rate:
            result = max(0, result + rng.choice([-1, 1]) * rng.randint(1, 10))
        lines.append(f"{value}{op}{x}={result}")
        value = result
    return "\n".join(lines + [f"Answer: {value}"])


def parse_question(question: str) -> Chain:
    """Inverse of Chain.question (used to verify a Problem without keeping the Chain)."""
    words = question.replace(".", "").split()
    names = {name: op for op, name in OPERATIONS.items()}
    if len(words) < 2 or words[0] != "Start" or len(words) % 2:
        raise ValueError(f"not a lab question: {question!r}")
    ops = tuple((names[words[i]], int(words[i + 1])) for i in range(2, len(words), 2))
    return Chain(int(words[1]), ops)


def judge(chain: Chain, response: str) -> Verdict:
    """Outcome and per-line correctness of a response, one step per `newline`-splitter step."""
    lines = [response[start:end].strip() for start, end in split_steps(response, LabTask.step_splitter)]
    if not lines:  # an empty response is one wrong step (its end-of-sequence token)
        return Verdict(correct=False, step_correct=(False,), format_ok=False)
    truth = chain.values()
    steps: list[bool] = []
    carried: int | None = chain.start  # None after an unreadable line: no value to carry
    answer: int | None = None
    for j, line in enumerate(lines):
        m = _LINE.match(line)
        if m and j < len(chain.ops):
            left, op, x, result = int(m[1]), m[2], int(m[3]), int(m[4])
            steps.append(carried in (None, left) and (op, x) == chain.ops[j] and result == apply(left, op, x))
            carried = result
            continue
        a = _ANSWER.match(line)
        is_last = j == len(lines) - 1
        if a and is_last:
            answer = int(a[1])
            steps.append(j == len(chain.ops) and carried in (None, answer))
        else:
            steps.append(False)
            carried = None
    correct = answer is not None and answer == truth[-1]
    return Verdict(correct=correct, step_correct=tuple(steps), format_ok=answer is not None,
                   answer=None if answer is None else str(answer))


class LabTask:
    """Seeded train and held-out splits of lab problems with an exact step-level verifier."""

    name = "lab"
    step_splitter = "newline"
    alphabet = ALPHABET

    def __init__(self, cfg: LabTaskConfig | None = None):
        self.cfg = cfg or LabTaskConfig()
        self._eval = self._draw(self.cfg.eval_size, self.cfg.seed * 2 + 2, exclude=set(), distinct=True)
        self.held_out = {p.prompt for p in self._eval}
        self._train = self._draw(self.cfg.train_size, self.cfg.seed * 2 + 1, exclude=self.held_out)

    def _draw(self, n: int, seed: int, exclude: set[str], distinct: bool = False) -> list[Problem]:
        """n problems from a seeded stream, skipping any question in `exclude` (the held-out set) and,
        when `distinct`, any question already drawn."""
        rng = random.Random(seed)
        out = []
        exclude = set(exclude) if distinct else exclude
        for draws in itertools.count(1):
            if len(out) == n:
                break
            if draws > 100 * n:
                raise ValueError(f"task.lab: {len(out)} problems outside the held-out set after {draws - 1} draws, "
                                 f"{n} wanted: these settings allow too few distinct problems (raise max_steps, "
                                 "start_max or operand_max, or lower train_size / eval_size)")
            chain = sample_chain(rng, self.cfg)
            if chain.question() not in exclude:
                if distinct:
                    exclude.add(chain.question())
                out.append(self._problem(chain, f"lab-{seed}-{len(out)}"))
        return out

    @staticmethod
    def _problem(chain: Chain, problem_id: str) -> Problem:
        return Problem(id=problem_id, prompt=chain.question(), answer=str(chain.values()[-1]),
                       meta={"steps": len(chain.ops), "difficulty": len(chain.ops)})

    def draw_problem(self, rng: random.Random) -> Problem:
        """A fresh problem outside the held-out set (pretraining's stream)."""
        chain = sample_chain(rng, self.cfg)
        while chain.question() in self.held_out:
            chain = sample_chain(rng, self.cfg)
        return self._problem(chain, "lab-drawn")

    def noisy_solution(self, problem: Problem, rng: random.Random, error_rate: float) -> str:
        return noisy_chain_solution(parse_question(problem.prompt), rng, error_rate)

    def train_problems(self) -> list[Problem]:
        return self._train

    def eval_problems(self) -> list[Problem]:
        return self._eval

    def verify(self, problem: Problem, response: str) -> Verdict:
        return judge(parse_question(problem.prompt), response)


@register_task("lab", config=LabSection, bundled_model="lab")
def lab_task(cfg: LabSection) -> LabTask:
    """The lab task with the section's knobs (`task.lab.*`)."""
    return LabTask(cfg.lab)
