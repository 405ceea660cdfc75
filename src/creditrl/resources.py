"""What an advantage needs besides the rollouts, built from a run's config.

An advantage registers the resources it needs by name (`register_advantage(..., needs=...)`):

    value_estimator   Monte Carlo values from continuations of the policy   (VinePPO)
    critic            k verdicts on each response's wrong steps              (CAPO)
    prm               step scores of a process reward model                  (prm_grpo, PURE)
    hidden_states     the policy's hidden states, whole groups at a time     (DenseR)
    value_model       a learned value V(s_t) of each response token's state  (PPO)
    implicit_prm      β·log π_φ/π_ref per token, π_φ trained on outcomes     (PRIME)

A resource that is trained alongside the policy (`TrainedResource`) has its own optimizer: the
trainer calls its `update(rollouts)` once per rollout batch, after the advantage, holds the
policy's update while it is `warming_up`, and saves its `state_dict` in every checkpoint.

The trainer, `creditrl credit` and the compare report's credit table all build them here, so a
method sees the same resource wherever it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from creditrl.config import MethodSpec, RunConfig
from creditrl.critics import build_step_critic
from creditrl.hidden_states import PolicyHiddenStates
from creditrl.implicit_prm import ImplicitPRM
from creditrl.methods import Method, resolve_method
from creditrl.prm import build_prm
from creditrl.rollouts import Rollouts
from creditrl.value_estimation import MonteCarloValues
from creditrl.value_model import ValueModel

BUILDERS: dict[str, Callable[[RunConfig, Any, Any], object]] = {
    "value_estimator": lambda cfg, policy, task: MonteCarloValues(policy, task, cfg.sampling, cfg.reward,
                                                                  seed=cfg.train.seed),
    "critic": lambda cfg, policy, task: build_step_critic(cfg.critic, policy.decode),
    "prm": lambda cfg, policy, task: build_prm(cfg.prm, policy.decode, policy.tokenizer.get_vocab()),
    "hidden_states": lambda cfg, policy, task: PolicyHiddenStates(policy, cfg.sampling.temperature,
                                                                  cfg.train.logprob_batch_size,
                                                                  cfg.train.length_buckets),
    "value_model": lambda cfg, policy, task: ValueModel(policy, cfg.value_model, cfg.train),
    "implicit_prm": lambda cfg, policy, task: ImplicitPRM(policy, cfg.implicit_prm, cfg.train),
}


@runtime_checkable
class TrainedResource(Protocol):
    """A resource with parameters of its own, trained on each rollout batch after the advantage has read it."""

    @property
    def warming_up(self) -> bool:
        """True while the policy should wait for it (its own warm-up steps)."""

    def update(self, rollouts: Rollouts) -> dict[str, float]:
        """Train on the batch; returns the update's metrics, with `resource_forwards`: the sequences put
        through its models' forwards this step (scoring and update), counted by `creditrl compare`."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def resources_needed(methods: Iterable[Method | MethodSpec | str]) -> list[str]:
    """The resource names the methods' advantages need, in a stable order."""
    needed = {n for m in methods for n in resolve_method(m).needs}
    return [name for name in BUILDERS if name in needed]


def build_resources(methods: Iterable[Method | MethodSpec | str], cfg: RunConfig, policy, task) -> dict[str, object]:
    """One instance of each resource the methods need, made from `cfg` for this policy and task."""
    return {name: BUILDERS[name](cfg, policy, task) for name in resources_needed(methods)}
