"""Reasoning-behaviour metrics of sampled responses: length, self-verification, answer revisions,
diversity of correct solutions, and accuracy by response length.

Every function is pure.  A batch of n samples is given as parallel per-sample sequences: the
response `texts`, their `correct`ness, `problem` (the index of the prompt each answers) and
`lengths` (response lengths in tokens).  A metric that is undefined for a batch (no prompt with
two correct samples, an empty length bucket) is left out of the result rather than set to NaN.
"""

from __future__ import annotations

import re
from collections import defaultdict
from itertools import pairwise
from typing import Sequence

import numpy as np

from creditrl.config import VERIFY_PHRASES
from creditrl.tasks.math import extract_answer


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """10th/50th/90th percentile (linear interpolation) and maximum of the response lengths
    (their mean is `evaluate`'s mean_length)."""
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
    return {"length_p10": float(p10), "length_p50": float(p50), "length_p90": float(p90),
            "length_max": float(max(lengths))}


def self_verify_rate(texts: Sequence[str], phrases: Sequence[str] = VERIFY_PHRASES) -> float:
    """Fraction of responses containing any of `phrases`, case-insensitive, as whole words
    (so "wait" matches "Wait," but not "awaited")."""
    if not phrases:
        return 0.0
    pattern = re.compile("|".join(rf"(?<!\w){re.escape(p)}(?!\w)" for p in phrases), re.IGNORECASE)
    return sum(bool(pattern.search(t)) for t in texts) / len(texts)


def stated_answers(text: str) -> list[str]:
    """The answers a response states, in order: one per line that states one (`\\boxed{...}`,
    `#### N`, `<answer>...</answer>`, `Answer: N`, as `extract_answer` reads a line)."""
    return [a for a in map(extract_answer, text.splitlines()) if a is not None]


def answer_revisions(text: str) -> int:
    """How many times the stated answer changes: the number of consecutive stated answers that
    differ (0 for a response stating one answer, or the same answer repeatedly)."""
    answers = stated_answers(text)
    return sum(a != b for a, b in pairwise(answers))


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _bigrams(text: str) -> list[tuple[str, str]]:
    words = _normalise(text).split()
    return list(pairwise(words))


def correct_diversity(texts: Sequence[str], correct: Sequence[bool], problem: Sequence[int]) -> dict[str, float]:
    """Diversity of each prompt's correct samples, averaged over prompts with at least two.

    distinct_correct_ratio: distinct solutions (lowercased, whitespace collapsed) / correct samples.
    distinct_2gram_ratio: distinct word bigrams / all word bigrams (lowercased, split on whitespace),
    pooled over the prompt's correct samples.
    """
    groups: dict[int, list[str]] = defaultdict(list)
    for text, ok, i in zip(texts, correct, problem):
        if ok:
            groups[i].append(text)
    solutions, bigrams = [], []
    for group in groups.values():
        if len(group) < 2:
            continue
        solutions.append(len({_normalise(t) for t in group}) / len(group))
        pooled = [b for t in group for b in _bigrams(t)]
        if pooled:
            bigrams.append(len(set(pooled)) / len(pooled))
    metrics = {}
    if solutions:
        metrics["distinct_correct_ratio"] = sum(solutions) / len(solutions)
    if bigrams:
        metrics["distinct_2gram_ratio"] = sum(bigrams) / len(bigrams)
    return metrics


def accuracy_by_length(lengths: Sequence[int], correct: Sequence[bool]) -> dict[str, float]:
    """Accuracy within each length quartile: acc_len_q1 holds lengths ≤ the 25th percentile,
    q2 those in (p25, p50], q3 (p50, p75], q4 the rest.  An empty quartile (ties) is left out."""
    edges = np.percentile(lengths, [25, 50, 75])
    buckets: dict[int, list[bool]] = defaultdict(list)
    for length, ok in zip(lengths, correct):
        buckets[int(np.searchsorted(edges, length, side="left"))].append(bool(ok))
    return {f"acc_len_q{q + 1}": sum(oks) / len(oks) for q, oks in sorted(buckets.items())}


def behaviour_metrics(texts: Sequence[str], correct: Sequence[bool], problem: Sequence[int],
                      lengths: Sequence[int], phrases: Sequence[str] = VERIFY_PHRASES) -> dict[str, float]:
    """All the behaviour metrics of one batch of samples, as one flat dict."""
    revisions = [answer_revisions(t) for t in texts]
    return {**length_stats(lengths),
            "self_verify_rate": self_verify_rate(texts, phrases),
            "answer_revisions_mean": sum(revisions) / len(revisions),
            "revised_rate": sum(r > 0 for r in revisions) / len(revisions),
            **correct_diversity(texts, correct, problem),
            **accuracy_by_length(lengths, correct)}
