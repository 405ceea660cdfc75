"""Held-out evaluation: avg@k (sampled accuracy), pass@k (unbiased), maj@k and greedy accuracy.

pass@k uses the unbiased estimator of Chen et al. 2021 (Codex): with n samples of which c are
correct, pass@k = 1 − C(n−c, k) / C(n, k).  avg@k is the mean correctness over all samples at the
sampling temperature, the number RL papers report as accuracy; its standard error over problems,
avg@k_se = sqrt(Σ_i (p_i − p̄)² / (n·(n − 1))) with p_i = c_i / k the i-th problem's share of correct
samples, counts both the draw of the n problems and the k samples' noise (it needs n ≥ 2).  The
accuracies are broken down by difficulty (the lab's step count, a generated task's difficulty, MATH's
level), and the behaviour metrics of `creditrl.behaviour` are computed from the same samples.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from math import comb
from typing import Sequence

from rich.progress import Progress

from creditrl.behaviour import VERIFY_PHRASES, behaviour_metrics
from creditrl.policy.transformers_backend import SamplingConfig, TransformersPolicy
from creditrl.tasks.base import Problem, Task, Verdict
from creditrl.tasks.verdicts import verify_all

DIFFICULTY_KEYS = ("steps", "difficulty", "level")  # Problem.meta keys read as difficulty, first found wins
_BY_DIFFICULTY = re.compile(r"^(avg@k|pass@k|maj@k)_(\w+)=(.+)$")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """maj@k: is the most frequent extracted answer a correct one? (ties: first seen wins)."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]
    return any(ok for a, ok in zip(answers, correct) if a == winner)


def sampled_accuracy(per_problem: Sequence[Sequence[Verdict]]) -> dict[str, float]:
    """avg@k, pass@k and maj@k over problems with k verdicts each (k: the fewest any problem has)."""
    k = min(len(vs) for vs in per_problem)
    counts = [sum(v.correct for v in vs) for vs in per_problem]
    return {"avg@k": sum(counts) / sum(len(vs) for vs in per_problem),
            "pass@k": sum(pass_at_k(len(vs), c, k) for vs, c in zip(per_problem, counts)) / len(per_problem),
            "maj@k": sum(majority_correct([v.answer for v in vs], [v.correct for v in vs])
                         for vs in per_problem) / len(per_problem)}


def by_difficulty(problems: Sequence[Problem], per_problem: Sequence[Sequence[Verdict]]) -> dict[str, float]:
    """`sampled_accuracy` for each difficulty value, keyed like `pass@k_steps=3`.  The difficulty is
    the first of DIFFICULTY_KEYS that some problem's meta has; problems without it are left out."""
    key = next((d for d in DIFFICULTY_KEYS if any(d in p.meta for p in problems)), None)
    if key is None:
        return {}
    groups: dict[object, list[Sequence[Verdict]]] = {}
    for problem, vs in zip(problems, per_problem):
        if key in problem.meta:
            groups.setdefault(problem.meta[key], []).append(vs)
    return {f"{name}_{key}={value}": x for value in sorted(groups, key=lambda v: (type(v).__name__, v))
            for name, x in sampled_accuracy(groups[value]).items()}


def standard_error(values: Sequence[float]) -> float:
    """sqrt(Σ (x − x̄)² / (n·(n − 1))): the standard error of the mean of n ≥ 2 values."""
    n = len(values)
    mean = sum(values) / n
    return (sum((x - mean) ** 2 for x in values) / (n * (n - 1))) ** 0.5


def difficulty_breakdown(metrics: dict[str, float]) -> tuple[str, dict[str, dict[str, float]]] | None:
    """The `by_difficulty` entries of a metrics dict as (difficulty key, value -> {avg@k, pass@k, maj@k}), values in
    the order they appear; None when there are none."""
    key, rows = None, {}
    for name, x in metrics.items():
        m = _BY_DIFFICULTY.match(name)
        if m:
            key = m[2]
            rows.setdefault(m[3], {})[m[1]] = x
    return None if key is None else (key, rows)


def evaluation_seed(train_seed: int) -> int:
    """The sampling seed of every evaluation of a run with `train.seed` = train_seed: the trainer's and
    `creditrl eval`'s, so that evaluating a run's final model reproduces the run's final table."""
    return hash((train_seed, 10**6)) % (2**31)


def evaluation_steps(problems: Sequence[Problem], greedy: bool) -> int:
    """How many prompt samplings `evaluate` reports to its `progress` callback: each problem once, twice with greedy."""
    return len(problems) * (1 + int(greedy))


@contextmanager
def progress_task(progress: Progress, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A task on a rich progress display for the length of the block; yields its `advance(done)` callback."""
    task = progress.add_task(description, total=total, stats="")
    try:
        yield lambda done: progress.advance(task, done)
    finally:
        progress.remove_task(task)


def evaluate(policy: TransformersPolicy, task: Task, problems: Sequence[Problem], k: int,
             sampling: SamplingConfig, seed: int, greedy: bool = True, behaviour: bool = True,
             verify_phrases: Sequence[str] = VERIFY_PHRASES,
             progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Sample k responses per problem (and one greedy one); return the accuracy metrics and, when
    `behaviour`, the behaviour metrics of the sampled responses.  `progress` is called with the number
    of problems each sampling call finished (`evaluation_steps` in all)."""
    policy.on_sampled = progress
    try:
        return _evaluate(policy, task, problems, k, sampling, seed, greedy, behaviour, verify_phrases)
    finally:
        policy.on_sampled = None


def _evaluate(policy: TransformersPolicy, task: Task, problems: Sequence[Problem], k: int,
              sampling: SamplingConfig, seed: int, greedy: bool, behaviour: bool,
              verify_phrases: Sequence[str]) -> dict[str, float]:
    prompts = [policy.encode_prompt(p.prompt) for p in problems]
    metrics: dict[str, float] = {}
    if k > 0:
        gen = policy.sample(prompts, k, sampling, seed=seed)
        texts = [policy.decode(r) for r in gen.response_ids]
        verdicts = verify_all(task, [problems[i // k] for i in range(len(texts))], texts)
        per_problem = [verdicts[i * k:(i + 1) * k] for i in range(len(problems))]
        counts = [sum(v.correct for v in vs) for vs in per_problem]
        metrics["avg@k"] = sum(counts) / (k * len(problems))
        if len(problems) > 1:
            metrics["avg@k_se"] = standard_error([c / k for c in counts])
        for kk in sorted({1, k}):
            metrics[f"pass@{kk}"] = sum(pass_at_k(k, c, kk) for c in counts) / len(problems)
        metrics["maj@k"] = sum(majority_correct([v.answer for v in vs], [v.correct for v in vs])
                               for vs in per_problem) / len(problems)
        lengths = [len(r) for r in gen.response_ids]
        metrics["mean_length"] = sum(lengths) / len(lengths)
        metrics["k"] = k
        if behaviour:
            metrics.update(by_difficulty(problems, per_problem))
            metrics.update(behaviour_metrics(texts, [v.correct for v in verdicts],
                                             [i // k for i in range(len(texts))], lengths, verify_phrases))
    if greedy:
        gen = policy.sample(prompts, 1, sampling.model_copy(update={"temperature": 0.0}), seed=seed)
        greedy_verdicts = verify_all(task, problems, [policy.decode(r) for r in gen.response_ids])
        metrics["greedy"] = sum(v.correct for v in greedy_verdicts) / len(problems)
    return metrics


def evaluate_accuracy(policy: TransformersPolicy, task: Task, n_samples: int, seed: int,
                      max_new_tokens: int = 96) -> dict[str, float]:
    """Sampled (T = 1) and greedy accuracy on the task's held-out problems, ~n_samples samples."""
    problems = task.eval_problems()
    k = max(1, round(n_samples / len(problems)))
    return evaluate(policy, task, problems, k, SamplingConfig(max_new_tokens=max_new_tokens), seed)
