"""Held-out evaluation: avg@k (sampled accuracy), pass@k (unbiased), maj@k and greedy accuracy.

pass@k uses the unbiased estimator of Chen et al. 2021 (Codex): with n samples of which c are
correct, pass@k = 1 − C(n−c, k) / C(n, k).  avg@k is the mean correctness over all samples at the
sampling temperature, the number RL papers report as accuracy.
"""

from __future__ import annotations

from collections import Counter
from math import comb
from typing import Sequence

from creditrl.policy.transformers_backend import SamplingConfig, TransformersPolicy
from creditrl.tasks.base import Problem, Task


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


def evaluate(policy: TransformersPolicy, task: Task, problems: Sequence[Problem], k: int,
             sampling: SamplingConfig, seed: int, greedy: bool = True) -> dict[str, float]:
    """Sample k responses per problem (and one greedy one); return the accuracy metrics."""
    prompts = [policy.encode_prompt(p.prompt) for p in problems]
    metrics: dict[str, float] = {}
    if k > 0:
        gen = policy.sample(prompts, k, sampling, seed=seed)
        verdicts = [task.verify(problems[i // k], policy.decode(r)) for i, r in enumerate(gen.response_ids)]
        per_problem = [verdicts[i * k:(i + 1) * k] for i in range(len(problems))]
        counts = [sum(v.correct for v in vs) for vs in per_problem]
        metrics["avg@k"] = sum(counts) / (k * len(problems))
        for kk in sorted({1, k}):
            metrics[f"pass@{kk}"] = sum(pass_at_k(k, c, kk) for c in counts) / len(problems)
        metrics["maj@k"] = sum(majority_correct([v.answer for v in vs], [v.correct for v in vs])
                               for vs in per_problem) / len(problems)
        metrics["mean_length"] = sum(len(r) for r in gen.response_ids) / len(gen.response_ids)
        metrics["k"] = k
    if greedy:
        gen = policy.sample(prompts, 1, sampling.model_copy(update={"temperature": 0.0}), seed=seed)
        metrics["greedy"] = sum(task.verify(p, policy.decode(r)).correct
                                for p, r in zip(problems, gen.response_ids)) / len(problems)
    return metrics


def evaluate_accuracy(policy: TransformersPolicy, task: Task, n_samples: int, seed: int,
                      max_new_tokens: int = 96) -> dict[str, float]:
    """Sampled (T = 1) and greedy accuracy on the task's held-out problems, ~n_samples samples."""
    problems = task.eval_problems()
    k = max(1, round(n_samples / len(problems)))
    return evaluate(policy, task, problems, k, SamplingConfig(max_new_tokens=max_new_tokens), seed)
