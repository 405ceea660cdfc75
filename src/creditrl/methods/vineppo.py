"""VinePPO: PPO without a critic, with Monte Carlo values of step prefixes (methods.md §3).

The values come from the trainer's `value_estimator` (`creditrl.value_estimation`), which
samples K continuations of each state from the policy; the continuations only give values and
are never trained on: the advantage has the rollout batch's shape (B, T).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from creditrl.methods.grpo import step_values_on_tokens
from creditrl.methods.loss import masked_mean
from creditrl.methods.registry import Method, register_advantage, register_method
from creditrl.rollouts import Rollouts
from creditrl.value_estimation import PrefixState, ValueEstimator


class VinePPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(9, ge=1, description="continuations per state (paper: 9; ablations 1, 3, 16)")
    temperature: float | None = Field(None, ge=0.0, description="continuations' temperature "
                                                                "(None: sampling.temperature; paper: 0.6 for both)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="continuations' top-p "
                                                                  "(None: sampling.top_p; paper: 0.9 for both)")
    max_steps: int = Field(25, ge=1, description="states estimated per response, s_0 .. s_{max_steps−1}; later ones "
                                                 "are filled backward (the official code's "
                                                 "max_step_for_value_estimation = M estimates s_0 .. s_M: "
                                                 "M = max_steps − 1)")
    max_continuation_tokens: int | None = Field(None, ge=1,
                                                description="None: sampling.max_new_tokens minus the prefix length")
    whiten: bool = True
    eps: float = Field(1e-8, gt=0.0)


def _prefix_states(rollouts: Rollouts, max_steps: int) -> tuple[list[PrefixState], list[int], list[int]]:
    """s_j = prompt + the response tokens of steps < j, for j < min(#steps, max_steps) of every row.

    Step ids are non-decreasing along a response, so s_j's prefix is a head of the response
    tokens.  Returns the states and the row and step j of each.
    """
    if rollouts.problems is None:
        raise ValueError("vineppo needs rollouts.problems (row-aligned problems, to verify continuations)")
    states, rows, steps = [], [], []
    for b in range(rollouts.batch_size):
        prompt = tuple(rollouts.prompt_ids[b][rollouts.prompt_mask[b].bool()].tolist())
        mask = rollouts.response_mask[b].bool()
        tokens, step_ids = rollouts.response_ids[b][mask].tolist(), rollouts.step_ids[b][mask]
        for j in range(min(int(rollouts.num_steps[b]), max_steps)):
            states.append(PrefixState(prompt, tuple(tokens[: int((step_ids < j).sum())]), rollouts.problems[b]))
            rows.append(b)
            steps.append(j)
    return states, rows, steps


@register_advantage("vineppo", params=VinePPOParams, needs=("value_estimator",))
def vineppo(rollouts: Rollouts, params: VinePPOParams, value_estimator: ValueEstimator) -> Tensor:
    """A_j = r_j + V̂(s_{j+1}) − V̂(s_j) on every token of step j (Kazemnejad et al., arXiv 2410.01679).

    γ = 1; r_j = R on a response's last step n−1, 0 elsewhere, with R = 0 for a response cut off at
    the length limit (as its continuations score, and as the official code scores both); V(s_n) = 0
    (terminal).  V̂(s_j) is
    the mean outcome reward of K continuations of s_j, for the first `max_steps` states of each
    response; beyond them V_j = r_j + V_{j+1}, i.e. V_j = R (the response's own return), so steps
    j ≥ max_steps get A_j = 0 and step max_steps − 1 gets R − V̂.  Identical states across the
    batch are estimated once (by the estimator).  With `whiten`, A ← (A − mean)·(var + eps)^−½,
    mean and unbiased var over all response tokens of the batch.
    Shapes: step_ids (B, T), rewards (B,) -> (B, T).
    """
    states, rows, steps = _prefix_states(rollouts, params.max_steps)
    estimates = value_estimator.estimate(states, params.k, params.temperature, params.top_p,
                                         params.max_continuation_tokens)
    rewards = rollouts.rewards if rollouts.rewards.is_floating_point() else rollouts.rewards.float()
    rewards = torch.where(rollouts.truncated.to(rewards.device), 0.0, rewards)  # V̂ scores a truncation 0 too
    n_steps = rollouts.num_steps.to(rewards.device)
    width = int(n_steps.max()) if rollouts.batch_size else 0
    j = torch.arange(width + 1, device=rewards.device)[None, :]  # (1, S+1)
    estimated = rewards.new_zeros(rollouts.batch_size, width + 1)
    estimated[rows, steps] = estimates.to(estimated)
    values = torch.where(j < n_steps[:, None].clamp(max=params.max_steps), estimated,
                         torch.where(j < n_steps[:, None], rewards[:, None], 0.0))
    step_rewards = torch.where(j[:, :-1] == n_steps[:, None] - 1, rewards[:, None], 0.0)
    step_adv = step_rewards + values[:, 1:] - values[:, :-1]
    mask = rollouts.response_mask.bool()
    adv = torch.where(mask, step_values_on_tokens(step_adv, rollouts.step_ids), 0.0)
    if params.whiten:
        n = mask.sum()
        mean = masked_mean(adv, mask)
        var = masked_mean((adv - mean).square(), mask) * n / (n - 1).clamp(min=1)
        adv = torch.where(mask, (adv - mean) * torch.rsqrt(var + params.eps), 0.0)
    return adv


register_method(
    Method(
        name="vineppo",
        advantage="vineppo",
        # K = 3 continuations for at most 4 states per response (one of the paper's ablations): K = 9 makes a step
        # ~8× a GRPO step on the lab, ~3× with the cut; a grid's own `method_params.k=9` restores it
        compare_overrides=("method_params.k=3", "method_params.max_steps=4"),
        summary=(
            "VinePPO (arXiv 2410.01679): step advantages from Monte Carlo values of K = 9 continuations per "
            "prefix state, whitened; about #steps × K extra generations per response.  The paper samples at "
            "temperature 0.6, top-p 0.9 and trains 2 epochs with KL 1e-4: set those in the recipe."
        ),
    )
)
