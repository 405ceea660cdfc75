"""The trace task: read a short Python program and write the state change of every statement it runs.

A problem is a generated program; the expected response has one line per executed statement that
sets a variable (assignments, list appends, and a loop binding its variable at each iteration),
then the printed output::

    a = 4                  a = 4
    xs = [a, 2]            xs = [4, 2]
    for v in xs:           v = 4
        a = a + v          a = 8
    print(a)               v = 2
                           a = 10
                           Output: 10

The labels come from running the program under a line tracer (`sys.settrace`): the tracer sees
each statement finish, reads the variable it set, and, before the next statement runs, replaces
that value with the one the response wrote (when the response names the right variable with a
value of the right kind).  Step j is therefore judged *locally*: it is right when it is exactly
the state change the program makes next from the state the response itself has carried so far,
so an error is blamed once, where it happens.  A line that names another variable, cannot be
read, or comes where the program makes no further change is wrong and leaves the true state in
place.  The output line is right when it is the last line, follows the last change and repeats
what the program prints from the carried state; the response is correct when its last line is
an output line with the program's true output.
"""

from __future__ import annotations

import ast
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from creditrl.config import TraceSection
from creditrl.steps import split_steps
from creditrl.tasks.base import Problem, Verdict
from creditrl.tasks.registry import register_task

INT_NAMES = ("a", "b", "c", "d", "n", "s")
LIST_NAMES = ("xs", "ys")
LOOP_NAMES = ("i", "j", "v", "w")
COMPARISONS = ("<", ">", "==")
ALPHABET = "\n !()*+,-.:<=>O[]_0123456789abcdefghijklmnopqrstuvwxyz"  # every character of prompts and responses
OUTPUT_PREFIX = "Output: "

_ASSIGNMENT = re.compile(r"^([a-z_][a-z0-9_]*) = (.+)$")
_OUTPUT = re.compile(r"^Output: (.+)$")
_BUILTINS = {"range": range}

Value = int | list[int]
Carry = Callable[[str, Value], Value]  # (variable, value the program just gave it) -> the value to go on with


# ---------------------------------------------------------------- running a program under the tracer


@dataclass(frozen=True)
class Statement:
    """What one source line does to the state: `sets` the variable it assigns (None: nothing), and for a
    loop header, the lines of its body (a header followed by a body line has bound its variable)."""

    sets: str | None
    body: range | None = None


def statements(tree: ast.Module) -> dict[int, Statement]:
    """Line number -> Statement for every statement of a parsed trace program."""
    out: dict[int, Statement] = {}
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Assign):
            out[node.lineno] = Statement(node.targets[0].id)
        elif isinstance(node, ast.For):
            out[node.lineno] = Statement(node.target.id, range(node.body[0].lineno, node.end_lineno + 1))
        elif isinstance(node, ast.Expr) and isinstance(node.value.func, ast.Attribute):  # xs.append(e)
            out[node.lineno] = Statement(node.value.func.value.id)
        else:
            out[node.lineno] = Statement(None)
        pending.extend(getattr(node, "body", ()))
        pending.extend(getattr(node, "orelse", ()))
    return out


class StopTrace(Exception):
    """Raised by a Carry to end the run early (the response has no more lines to judge)."""


@dataclass
class Run:
    """What a traced run did: the carried state change of each executed statement, what it printed,
    and the error that ended it (None when it ran to the end)."""

    changes: list[tuple[str, Value]] = field(default_factory=list)
    printed: list[Value] = field(default_factory=list)
    error: str | None = None


def keep(_name: str, value: Value) -> Value:
    """The Carry that changes nothing: the program's own run."""
    return value


def run_traced(source: str, carry: Carry) -> Run:
    """Run `source`; after each statement that sets a variable, `carry(name, value)` chooses the value
    execution goes on with.  Values are ints and lists of ints; each is handed over as a copy."""
    tree = ast.parse(source)
    lines = statements(tree)
    code = compile(tree, "<trace>", "exec")
    run = Run()
    namespace: dict[str, Any] = {"__builtins__": {**_BUILTINS, "print": lambda value: run.printed.append(value)}}
    previous: int | None = None  # the line that has just run

    def finish(next_line: int | None) -> None:
        statement = lines.get(previous) if previous is not None else None
        if statement is None or statement.sets is None:
            return
        if statement.body is not None and next_line not in statement.body:
            return  # a loop header that found its iterator exhausted
        value = carry(statement.sets, _copy(namespace[statement.sets]))
        namespace[statement.sets] = _copy(value)
        run.changes.append((statement.sets, _copy(value)))

    def local(frame: FrameType, event: str, _arg: Any):
        nonlocal previous
        if event == "line":
            finish(frame.f_lineno)
            previous = frame.f_lineno
        elif event == "return":
            finish(None)
            previous = None
        elif event == "exception":
            previous = None  # the statement did not finish
        return local

    def enter(frame: FrameType, event: str, _arg: Any):
        return local if frame.f_code is code else None

    outer = sys.gettrace()
    sys.settrace(enter)
    try:
        exec(code, namespace)
    except StopTrace:
        run.error = "stopped"
    except Exception as error:  # a carried state the program cannot run from (e.g. an index now out of range)
        run.error = f"{type(error).__name__}: {error}"
    finally:
        sys.settrace(outer)
    return run


def _copy(value: Value) -> Value:
    return list(value) if isinstance(value, list) else value


def same_kind(a: Any, b: Any) -> bool:
    """Both ints, or both lists of ints (bools are neither)."""
    def kind(x: Any) -> str | None:
        if type(x) is int:
            return "int"
        if type(x) is list and all(type(e) is int for e in x):
            return "list"
        return None
    return kind(a) is not None and kind(a) == kind(b)


def parse_value(text: str) -> Value | None:
    """An int or a list of ints written as Python writes it, else None."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    return value if same_kind(value, value) else None


# ---------------------------------------------------------------- judging a response


def judge(source: str, response: str) -> Verdict:
    """Outcome and per-line correctness of a response, one step per `newline`-splitter step."""
    lines = [response[start:end].strip() for start, end in split_steps(response, TraceTask.step_splitter)]
    if not lines:
        return Verdict(correct=False, step_correct=(False,), format_ok=False)
    steps: list[bool] = []

    def carry(name: str, value: Value) -> Value:
        if len(steps) == len(lines):
            raise StopTrace
        claim = _ASSIGNMENT.match(lines[len(steps)])
        claimed = parse_value(claim[2]) if claim else None
        if claim is None or claim[1] != name or not same_kind(claimed, value):
            steps.append(False)
            return value
        steps.append(claimed == value)
        return claimed

    run = run_traced(source, carry)
    n_changes = len(steps)
    for j in range(n_changes, len(lines)):
        output = _OUTPUT.match(lines[j])
        steps.append(bool(output) and j == n_changes == len(lines) - 1 and run.error is None
                     and len(run.printed) == 1 and _equal(parse_value(output[1]), run.printed[0]))
    final = _OUTPUT.match(lines[-1])
    answer = parse_value(final[1]) if final else None
    truth = parse_value(true_output(source))
    return Verdict(correct=final is not None and _equal(answer, truth), step_correct=tuple(steps),
                   format_ok=final is not None, answer=None if answer is None else repr(answer))


def _equal(a: Value | None, b: Value | None) -> bool:
    return a is not None and same_kind(a, b) and a == b


def true_output(source: str) -> str:
    """What the program prints when every statement keeps the value it computed."""
    run = run_traced(source, keep)
    if run.error is not None or len(run.printed) != 1:
        raise ValueError(f"not a trace program (it printed {len(run.printed)} values, error {run.error}):\n{source}")
    return repr(run.printed[0])


def solution(source: str, carry: Carry | None = None) -> str:
    """The response that writes every state change (as `carry` decides them) and the output."""
    run = run_traced(source, carry or (keep))
    if run.error is not None or len(run.printed) != 1:
        raise ValueError(f"the program did not run to its print ({run.error}):\n{source}")
    return "\n".join([f"{name} = {repr(value)}" for name, value in run.changes]
                     + [OUTPUT_PREFIX + repr(run.printed[0])])


def noisy_solution(source: str, rng: random.Random, error_rate: float) -> str:
    """The program's solution with each state change, with probability `error_rate`, replaced by a plausible
    wrong value (same variable, same kind), execution going on from it."""
    def carry(_name: str, value: Value) -> Value:
        return wrong_value(value, rng) if rng.random() < error_rate else value
    return solution(source, carry)


def wrong_value(value: Value, rng: random.Random) -> Value:
    """A plausible wrong value of the same kind: an int moved by ±1..3, or a list with one element so moved."""
    if isinstance(value, list):
        if not value:
            return [rng.randint(0, 9)]
        k = rng.randrange(len(value))
        return value[:k] + [wrong_value(value[k], rng)] + value[k + 1:]
    return value + rng.choice((-1, 1)) * rng.randint(1, 3)


# ---------------------------------------------------------------- generating programs


class _Writer:
    """Draws one program: source lines with indentation, and the variables each point may read."""

    def __init__(self, rng: random.Random, cfg: TraceSection):
        self.rng, self.cfg = rng, cfg
        self.lines: list[str] = []
        self.ints: list[str] = []  # ints certainly set at this point
        self.lists: dict[str, int] = {}  # list -> its length, certainly reached at this point

    def const(self) -> int:
        return self.rng.randint(0, self.cfg.value_max)

    def operand(self, readable: list[str]) -> str:
        return self.rng.choice(readable) if readable and self.rng.random() < 0.7 else str(self.const())

    def simple(self, indent: str, readable: list[str], conditional: bool, iterated: str | None) -> None:
        """One assignment or append; what it sets counts as set later only when it surely runs."""
        rng = self.rng
        appendable = [name for name in self.lists if name != iterated]
        choices = ["const", "arith", "arith"] + ["append"] * bool(appendable) + ["index"] * bool(self.lists)
        kind = rng.choice(choices)
        if kind == "append":
            target = rng.choice(appendable)
            self.lines.append(f"{indent}{target}.append({self.operand(readable)})")
            if not conditional and not indent:
                self.lists[target] += 1
            return
        target = rng.choice(INT_NAMES)
        if kind == "const":
            expression = str(self.const())
        elif kind == "index":
            name = rng.choice(list(self.lists))
            expression = f"{name}[{rng.randrange(self.lists[name])}]"
        elif readable:
            op = rng.choice("+-*")
            left = rng.choice(readable)
            right = str(rng.randint(2, 3)) if op == "*" else self.operand(readable)
            expression = f"{left} {op} {right}"
        else:
            expression = str(self.const())
        self.lines.append(f"{indent}{target} = {expression}")
        if not conditional and target not in self.ints:
            self.ints.append(target)

    def branch(self, indent: str, readable: list[str], iterated: str | None) -> None:
        subject = self.rng.choice(readable)
        others = [name for name in readable if name != subject]
        self.lines.append(f"{indent}if {subject} {self.rng.choice(COMPARISONS)} {self.operand(others)}:")
        for _ in range(self.rng.randint(1, self.cfg.body_max)):
            self.simple(indent + "    ", readable, conditional=True, iterated=iterated)
        if self.rng.random() < 0.5:
            self.lines.append(f"{indent}else:")
            for _ in range(self.rng.randint(1, self.cfg.body_max)):
                self.simple(indent + "    ", readable, conditional=True, iterated=iterated)

    def loop(self) -> None:
        rng = self.rng
        variable = rng.choice(LOOP_NAMES)
        if self.lists and rng.random() < 0.5:
            iterated = rng.choice(list(self.lists))
            self.lines.append(f"for {variable} in {iterated}:")
        else:
            iterated = None
            self.lines.append(f"for {variable} in range({rng.randint(1, self.cfg.loop_max)}):")
        if variable not in self.ints:
            self.ints.append(variable)
        for _ in range(rng.randint(1, self.cfg.body_max)):
            if rng.random() < 0.25:
                self.branch("    ", list(self.ints), iterated)
            else:
                self.simple("    ", list(self.ints), conditional=False, iterated=iterated)

    def list_literal(self) -> None:
        name = self.rng.choice(LIST_NAMES)
        items = [self.operand(self.ints) for _ in range(self.rng.randint(1, self.cfg.loop_max))]
        self.lines.append(f"{name} = [{', '.join(items)}]")
        self.lists[name] = len(items)

    def program(self) -> str:
        rng = self.rng
        for k in range(rng.randint(self.cfg.min_statements, self.cfg.max_statements)):
            kind = "simple" if k == 0 else rng.choice(["simple", "simple", "list", "branch", "loop"])
            if kind == "list":
                self.list_literal()
            elif kind == "branch" and self.ints:
                self.branch("", list(self.ints), None)
            elif kind == "loop":
                self.loop()
            else:
                self.simple("", list(self.ints), conditional=False, iterated=None)
        printable = self.ints + list(self.lists)  # never empty: the first statement always sets an int
        self.lines.append(f"print({rng.choice(printable[-2:])})")
        return "\n".join(self.lines) + "\n"


def sample_program(rng: random.Random, cfg: TraceSection) -> str:
    """Draw one program that runs to its print."""
    return _Writer(rng, cfg).program()


def traced_problem(source: str, problem_id: str) -> Problem:
    """A program as a Problem: its output is the answer; its difficulty, the number of state changes it makes."""
    run = run_traced(source, keep)
    n_statements = sum(line.strip() != "else:" for line in source.splitlines())
    return Problem(id=problem_id, prompt=source, answer=repr(run.printed[0]),
                   meta={"difficulty": len(run.changes), "steps": len(run.changes), "statements": n_statements})


class DrawnPrograms(Sequence[Problem]):
    """`size` problems, the i-th drawn from its own seeded stream (so each is made when first asked for),
    redrawn while its program is one of `excluded` (the held-out set)."""

    def __init__(self, size: int, seed: int, cfg: TraceSection, excluded: frozenset[str]):
        self.size, self.seed, self.cfg, self.excluded = size, seed, cfg, excluded
        self._made: dict[int, Problem] = {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if not -self.size <= index < self.size:
            raise IndexError(index)
        index %= self.size
        if index not in self._made:
            rng = random.Random(f"{self.seed}:{index}")
            for _ in range(100):
                source = sample_program(rng, self.cfg)
                if source not in self.excluded:
                    break
            else:
                raise ValueError("task.trace: 100 draws in a row fell in the held-out set: these settings allow too "
                                 "few distinct programs (raise max_statements, loop_max or value_max, or lower "
                                 "eval_size)")
            self._made[index] = traced_problem(source, f"trace-{self.seed}-{index}")
        return self._made[index]


class TraceTask:
    """Seeded train and held-out splits of trace programs with an exact step-level verifier; training
    programs are made as they are first used."""

    name = "trace"
    step_splitter = "newline"
    alphabet = ALPHABET

    def __init__(self, cfg: TraceSection | None = None):
        self.cfg = cfg or TraceSection()
        self._eval = self._distinct(self.cfg.eval_size, self.cfg.seed * 2 + 2)
        self._train = DrawnPrograms(self.cfg.train_size, self.cfg.seed * 2 + 1, self.cfg,
                                    frozenset(p.prompt for p in self._eval))

    def _distinct(self, n: int, seed: int) -> list[Problem]:
        """n distinct programs from one seeded stream."""
        rng = random.Random(seed)
        sources: dict[str, None] = {}
        for _ in range(100 * n):
            if len(sources) == n:
                break
            sources.setdefault(sample_program(rng, self.cfg))
        else:
            if len(sources) < n:
                raise ValueError(f"task.trace: {len(sources)} distinct programs after {100 * n} draws, {n} wanted "
                                 "for the held-out set: raise max_statements, loop_max or value_max, or lower "
                                 "eval_size")
        return [traced_problem(source, f"trace-{seed}-{k}") for k, source in enumerate(sources)]

    def draw_problem(self, rng: random.Random) -> Problem:
        """A fresh training program from `rng`, never a held-out one (what pretraining draws)."""
        while True:
            source = sample_program(rng, self.cfg)
            if source not in self._train.excluded:
                return traced_problem(source, "trace-drawn")

    def train_problems(self) -> list[Problem]:
        return self._train

    def eval_problems(self) -> list[Problem]:
        return self._eval

    def verify(self, problem: Problem, response: str) -> Verdict:
        return judge(problem.prompt, response)

    def noisy_solution(self, problem: Problem, rng: random.Random, error_rate: float) -> str:
        return noisy_solution(problem.prompt, rng, error_rate)


@register_task("trace", config=TraceSection)
def trace_task(cfg: TraceSection) -> TraceTask:
    """The trace task with the section's knobs (`task.min_statements`, `task.loop_max`, ...)."""
    return TraceTask(cfg)
