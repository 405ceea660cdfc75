"""Generative critics for CAPO (methods.md §5): a frozen LLM names the wrong steps of a solution.

`StepCritic` is the trainer resource the `capo` advantage needs (as `critic`): it builds the
critic prompt of every response from the rollout's own step spans, asks a backend (`Critic`)
for k critiques of each distinct prompt, and parses each into a verdict (a set of 0-based wrong
steps, or None for no verdict).  Backends: `TransformersCritic`, `OpenAICompatibleCritic`.
On the lab, `OracleLabCritic` answers the same question from the verifier's step labels.
"""

from __future__ import annotations

from typing import Callable

from creditrl.config import CriticConfig
from creditrl.critics.backends import (
    Critic,
    CriticStats,
    OpenAICompatibleCritic,
    TransformersCritic,
    build_critic,
)
from creditrl.critics.oracle import OracleLabCritic
from creditrl.critics.prompt import build_prompt, parse_wrong_steps, step_texts
from creditrl.rollouts import Rollouts


class StepCritic:
    """Verdicts of k critiques on every response of a rollout batch, and their cost.

    `decode` is the policy tokenizer's (ids -> text, special tokens skipped), used to cut the
    step texts.  `seed` (re-set by `reset`, once per training step) seeds each backend call.
    """

    def __init__(self, critic: Critic, decode: Callable[[list[int]], str], seed: int = 0):
        self.critic, self.decode = critic, decode
        self.reset(seed)

    def reset(self, seed: int) -> None:
        """A new seed and zeroed counters."""
        self.seed = seed
        self._calls = 0
        self.critic.stats.reset()

    def metrics(self) -> dict[str, float]:
        """The cost since the last `reset`: `critic_calls`, `critic_failures`, `critic_unparsed`, ..."""
        return self.critic.stats.metrics()

    def prompts(self, rollouts: Rollouts) -> list[str]:
        """The critic prompt of each row: its problem, reference answer and numbered steps."""
        if rollouts.problems is None:
            raise ValueError("capo needs rollouts.problems (row-aligned problems: the question and reference answer)")
        out = []
        for b in range(rollouts.batch_size):
            mask = rollouts.response_mask[b].bool()
            steps = step_texts(rollouts.response_ids[b][mask].tolist(), rollouts.step_ids[b][mask].tolist(),
                               self.decode)
            out.append(build_prompt(rollouts.problems[b].prompt, rollouts.problems[b].answer, steps))
        return out

    def wrong_steps(self, rollouts: Rollouts, k: int) -> list[list[set[int] | None]]:
        """k verdicts per row (B lists of k): 0-based wrong steps, or None (no critique, or no verdict).

        Rows with the same prompt (identical responses to one problem) share one set of critiques.
        """
        prompts = self.prompts(rollouts)
        n_steps = dict(zip(prompts, rollouts.num_steps.tolist()))
        critiques = self.critic.critique(list(n_steps), k, seed=self.seed + self._calls)
        self._calls += 1
        parsed = {}
        for prompt, texts in zip(n_steps, critiques):
            parsed[prompt] = [parse_wrong_steps(text, n_steps[prompt]) for text in texts]
            self.critic.stats.unparsed += sum(t is not None and v is None for t, v in zip(texts, parsed[prompt]))
        verdicts = [parsed[prompt] for prompt in prompts]
        self.critic.stats.no_verdict += sum(all(v is None for v in row) for row in verdicts)
        return verdicts


def build_step_critic(cfg: CriticConfig, decode: Callable[[list[int]], str]) -> StepCritic | OracleLabCritic:
    """The trainer resource `critic` that the config section names (`decode`: the policy tokenizer's)."""
    if cfg.backend == "oracle":
        return OracleLabCritic(cfg.recall, cfg.precision, cfg.seed)
    return StepCritic(build_critic(cfg), decode)


__all__ = ["Critic", "CriticStats", "OpenAICompatibleCritic", "OracleLabCritic", "StepCritic", "TransformersCritic",
           "build_critic", "build_step_critic",
           "build_prompt", "parse_wrong_steps", "step_texts"]
