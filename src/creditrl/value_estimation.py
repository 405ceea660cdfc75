"""Monte Carlo values of prompt+prefix states: V̂(s) = mean outcome reward of K continuations of s.

A state is a prompt and a prefix of a response, both as token ids (cut at token boundaries,
never re-tokenized).  `MonteCarloValues` samples K continuations of every distinct state with
the policy backend, has the task verify prefix + continuation, and averages the run's outcome
rewards; a continuation that runs out of tokens counts 0.  Identical states (same prompt ids,
same prefix ids) anywhere in one call are estimated once.  The estimator counts the cost it
causes (tokens, generate calls, states, seconds) until its next `reset`.  VinePPO (methods.md
§3) uses it; the transformers backend has no prefix cache, so each continuation re-reads its state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

from creditrl.config import SamplingConfig
from creditrl.policy.transformers_backend import TransformersPolicy
from creditrl.rewards import RewardConfig, outcome_rewards
from creditrl.tasks.base import Problem, Task


@dataclass(frozen=True)
class PrefixState:
    """A prompt and a prefix of a response to it, as token ids; `problem` verifies continuations."""

    prompt_ids: tuple[int, ...]
    prefix_ids: tuple[int, ...]
    problem: Problem


class ValueEstimator(Protocol):
    """What a method that needs `value_estimator` calls: values (N,) of N states."""

    def estimate(self, states: Sequence[PrefixState], k: int, temperature: float | None = None,
                 top_p: float | None = None, max_tokens: int | None = None) -> Tensor: ...


class MonteCarloValues:
    """V̂(s) from K continuations sampled with the policy backend at s (see the module docstring).

    `sampling` is the run's: its temperature and top-p are the default for continuations (so
    V̂ is the value of the policy that sampled the rollouts), its stop strings and generate batch
    size are kept, and its max_new_tokens bounds a whole response.  `seed` (re-set by `reset`)
    makes every `estimate` reproducible.
    """

    def __init__(self, policy: TransformersPolicy, task: Task, sampling: SamplingConfig, reward: RewardConfig,
                 seed: int = 0):
        self.policy, self.task, self.sampling, self.reward = policy, task, sampling, reward
        self.reset(seed)

    def reset(self, seed: int) -> None:
        """A new seed and zeroed cost counters (the trainer calls it once per step)."""
        self.seed = seed
        self.generated_tokens = 0
        self.generate_calls = 0
        self.states_estimated = 0
        self.states_deduplicated = 0
        self.seconds = 0.0
        self._samples = 0

    def metrics(self) -> dict[str, float]:
        """The cost since the last `reset`, under the trainer's metric names."""
        return {"extra_generated_tokens": float(self.generated_tokens),
                "extra_generate_calls": float(self.generate_calls),
                "states_estimated": float(self.states_estimated),
                "states_deduplicated": float(self.states_deduplicated),
                "time_value_estimation": self.seconds}

    def estimate(self, states: Sequence[PrefixState], k: int, temperature: float | None = None,
                 top_p: float | None = None, max_tokens: int | None = None) -> Tensor:
        """V̂(s) = (1/K) Σ_k R(prefix + c_k), c_k ~ π(· | prompt + prefix), for each state: (N,) float32.

        R is the run's outcome reward of the whole response prefix + c_k (its length counts the
        prefix), and 0 when c_k is longer than its budget: `max_tokens`, else the run's
        max_new_tokens minus the prefix length.  All states are sampled in one call with the
        largest budget and each continuation is judged against its own (the same law as a
        separate call per budget).  Temperature and top-p default to the run's sampling.
        """
        start = time.perf_counter()
        first: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        unique: list[PrefixState] = []
        index = []
        for state in states:
            key = (state.prompt_ids, state.prefix_ids)
            if key not in first:
                first[key] = len(unique)
                unique.append(state)
            index.append(first[key])
        values = torch.zeros(len(unique))
        if unique:
            budgets = [max(self.sampling.max_new_tokens - len(s.prefix_ids), 1) if max_tokens is None else max_tokens
                       for s in unique]
            cfg = self.sampling.model_copy(update={
                "temperature": self.sampling.temperature if temperature is None else temperature,
                "top_p": self.sampling.top_p if top_p is None else top_p, "max_new_tokens": max(budgets)})
            prompts = [list(s.prompt_ids + s.prefix_ids) for s in unique]
            gen = self.policy.sample(prompts, k, cfg, seed=self.seed + self._samples)
            correct, format_ok, lengths, truncated = [], [], [], []
            for row, continuation in enumerate(gen.response_ids):
                state, budget = unique[row // k], budgets[row // k]
                verdict = self.task.verify(state.problem,
                                           self.policy.decode(list(state.prefix_ids) + continuation[:budget]))
                correct.append(verdict.correct)
                format_ok.append(verdict.format_ok)
                lengths.append(len(state.prefix_ids) + min(len(continuation), budget))
                truncated.append(gen.truncated[row] or len(continuation) > budget)
            rewards = outcome_rewards(torch.tensor(correct), torch.tensor(lengths), torch.tensor(format_ok),
                                      self.reward)
            values = torch.where(torch.tensor(truncated), 0.0, rewards).view(len(unique), k).mean(dim=1)
            self._samples += 1
            self.generated_tokens += sum(len(c) for c in gen.response_ids)
            self.generate_calls += gen.calls
        self.states_estimated += len(unique)
        self.states_deduplicated += len(states) - len(unique)
        self.seconds += time.perf_counter() - start
        return values[torch.tensor(index, dtype=torch.long)]
