"""Seeded train and held-out splits of a generated task, drawn from its problem generator."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

from creditrl.tasks.base import Problem

Generator = Callable[[random.Random], Problem]  # draws one problem (its id is set here)


def draw_problems(generate: Generator, n: int, seed: int, exclude: set[str], distinct: bool,
                  name: str) -> list[Problem]:
    """n problems of the task `name` from the stream random.Random(seed), skipping prompts in `exclude` and,
    when `distinct`, prompts already drawn."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    for draws in itertools.count(1):
        if len(out) == n:
            return out
        if draws > 100 * n:
            raise ValueError(f"task ({name}): {len(out)} problems outside the held-out set after {draws - 1} draws, "
                             f"{n} wanted: these settings allow too few; widen them or lower task.train_size / "
                             "task.eval_size")
        problem = generate(rng)
        if problem.prompt not in seen:
            if distinct:
                seen.add(problem.prompt)
            out.append(Problem(f"{name}-{seed}-{len(out)}", problem.prompt, problem.answer, problem.meta))


def file_splits(evals: list, trains: list | None, seed: int, eval_size: int | None,
                eval_fraction: float) -> tuple[tuple, tuple]:
    """(train, held-out) rows of a task read from files: without a train file, a seeded shuffle holds out
    `eval_fraction` of the eval file (at least one row) and trains on the rest; then a seeded sample of
    `eval_size` held-out rows when that is fewer.  Rows keep their file order."""
    if trains is None:
        order = list(range(len(evals)))
        random.Random(f"{seed}:split").shuffle(order)
        n_eval = max(1, round(eval_fraction * len(evals)))
        trains = [evals[i] for i in sorted(order[n_eval:])]
        evals = [evals[i] for i in sorted(order[:n_eval])]
    if eval_size is not None and eval_size < len(evals):
        keep = random.Random(f"{seed}:eval_size").sample(range(len(evals)), eval_size)
        evals = [evals[i] for i in sorted(keep)]
    return tuple(trains), tuple(evals)


def held_out_and_train(generate: Generator, seed: int, eval_size: int, train_size: int,
                       name: str) -> tuple[list[Problem], list[Problem]]:
    """(held-out, train): distinct held-out problems from stream seed·2+2, train problems from stream seed·2+1
    outside the held-out set (repeats allowed)."""
    held_out = draw_problems(generate, eval_size, seed * 2 + 2, set(), True, name)
    train = draw_problems(generate, train_size, seed * 2 + 1, {p.prompt for p in held_out}, False, name)
    return held_out, train


class GeneratedSplits:
    """The splits of a generated task whose subclass draws one problem with `_generate(rng)`: `cfg` needs
    `seed`, `eval_size` and `train_size`; pretraining draws fresh problems outside the held-out set."""

    name: str

    def __init__(self, cfg):
        self.cfg = cfg
        self._eval, self._train = held_out_and_train(self._generate, cfg.seed, cfg.eval_size, cfg.train_size,
                                                     self.name)
        self.held_out = {p.prompt for p in self._eval}

    def _generate(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def draw_problem(self, rng: random.Random) -> Problem:
        """A fresh problem outside the held-out set (pretraining's stream)."""
        problem = self._generate(rng)
        while problem.prompt in self.held_out:
            problem = self._generate(rng)
        return problem

    def train_problems(self) -> list[Problem]:
        return self._train

    def eval_problems(self) -> list[Problem]:
        return self._eval
