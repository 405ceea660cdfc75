"""GRPO family: group-relative advantages from outcome (or step) rewards (methods.md §1).

Every estimator reads `rollouts.group_ids` (B,) to find groups (rows need not be contiguous)
and returns float advantages (B, T) that are 0 where `rollouts.response_mask` is False.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from creditrl.methods.groups import group_index, group_normalize, group_spread, leave_one_out_mean
from creditrl.methods.registry import Method, register_advantage, register_method
from creditrl.rollouts import Rollouts


class GRPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eps: float = Field(1e-6, gt=0.0)
    scale_by_std: bool = True


class ProcessGRPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eps: float = Field(1e-6, gt=0.0)


def step_values_on_tokens(values: Tensor, step_ids: Tensor) -> Tensor:
    """Give every token the value of its step: values (B, S), step ids (B, T) -> (B, T).

    A token without a step (step id −1, or ≥ S) gets 0.
    """
    n_steps = values.shape[1]
    column = torch.where((step_ids >= 0) & (step_ids < n_steps), step_ids, n_steps)
    return torch.cat([values, values.new_zeros(len(values), 1)], dim=1).gather(1, column)


def _float_rewards(rollouts: Rollouts) -> Tensor:
    rewards = rollouts.rewards
    return rewards if rewards.is_floating_point() else rewards.float()


def _broadcast(row_adv: Tensor, mask: Tensor) -> Tensor:
    """Give every response token its row's advantage: (B,) -> (B, T), 0 off the mask."""
    return torch.where(mask.bool(), row_adv[:, None], 0.0)


@register_advantage("grpo", params=GRPOParams, group_relative=True)
def grpo(rollouts: Rollouts, params: GRPOParams) -> Tensor:
    """A_i = (R_i − mean_G R) / (std_G R + eps), std unbiased (DeepSeekMath, arXiv 2402.03300).

    `scale_by_std=False` drops the division (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783).
    A group of one, or one whose rewards all agree, gets A = 0.  Shapes: rewards (B,), group_ids (B,) -> (B, T).
    """
    rewards = _float_rewards(rollouts)
    index, counts = group_index(rollouts.group_ids)
    adv = group_normalize(rewards, index, len(counts), eps=params.eps, scale_by_std=params.scale_by_std)
    return _broadcast(adv, rollouts.response_mask)


@register_advantage("rloo", group_relative=True)
def rloo(rollouts: Rollouts, params: BaseModel) -> Tensor:
    """A_i = R_i − mean_{j≠i} R_j, the leave-one-out baseline (Ahmadian et al. 2024, arXiv 2402.14740).

    A group of one, or one whose rewards all agree, gets A = 0.  Shapes: rewards (B,), group_ids (B,) -> (B, T).
    """
    rewards = _float_rewards(rollouts)
    index, counts = group_index(rollouts.group_ids)
    spread = group_spread(rewards, index, len(counts))  # a group of one, or of equal rewards, gets 0
    adv = torch.where(spread[index], rewards - leave_one_out_mean(rewards, index, counts), 0.0)
    return _broadcast(adv, rollouts.response_mask)


@register_advantage("process_grpo", params=ProcessGRPOParams, group_relative=True)
def process_grpo(rollouts: Rollouts, params: ProcessGRPOParams) -> Tensor:
    """Process-supervised GRPO (DeepSeekMath §4.1.3, arXiv 2402.03300).

    Step rewards r (B, S), NaN where a response has no step j, are normalised over all valid
    steps of the group: r̃ = (r − mean) / (std + eps), std unbiased (a group with fewer than two
    valid steps, or whose step rewards all agree, gets 0).  A token of step s gets Σ_{j ≥ s} r̃_j
    of its own response (absent steps count 0); tokens of step −1 (padding) or of a step ≥ S get 0.
    Any outcome reward must already be folded into the step rewards (e.g. by the PRM stage).
    Shapes: step_rewards (B, S), step_ids (B, T) -> (B, T).
    """
    if rollouts.step_rewards is None:
        raise ValueError("process_grpo needs rollouts.step_rewards (B, S): per-step rewards, "
                         "NaN where a step is absent")
    step_rewards = rollouts.step_rewards
    step_rewards = step_rewards if step_rewards.is_floating_point() else step_rewards.float()
    index, counts = group_index(rollouts.group_ids)
    normed = group_normalize(step_rewards, index, len(counts), ~torch.isnan(step_rewards), eps=params.eps)
    suffix = normed.flip(1).cumsum(1).flip(1)  # suffix[b, j] = Σ_{k ≥ j} normed[b, k]
    adv = step_values_on_tokens(suffix, rollouts.step_ids)
    return torch.where(rollouts.response_mask.bool(), adv, 0.0)


# DAPO's recipe (arXiv 2503.14476), the base of the methods built on it; overlong shaping is switched on beside it
DAPO_DEFAULTS = {
    "reward.correct": 1.0,
    "reward.wrong": -1.0,
    "loss.eps_low": 0.2,
    "loss.eps_high": 0.28,
    "loss.agg": "token-mean",
    "rollout.dynamic_sampling": True,
    "rollout.max_num_gen_batches": 10,
}
DAPO_COMPARE_OVERRIDES = ("reward.overlong_max=96", "reward.overlong_buffer=16")  # shaping within a grid's 96 tokens


register_method(
    Method(
        name="grpo",
        advantage="grpo",
        defaults={"loss.agg": "seq-mean-token-mean"},
        summary="GRPO (DeepSeekMath, arXiv 2402.03300): group-normalised outcome reward on every token.",
    )
)
register_method(
    Method(
        name="dr_grpo",
        advantage="grpo",
        defaults={"method_params.scale_by_std": False, "loss.agg": "seq-mean-token-sum-norm"},
        summary=(
            "Dr. GRPO (arXiv 2503.20783): GRPO without the std division, losses summed over tokens and "
            "divided by a constant (set loss.norm_length, usually the max new tokens)."
        ),
    )
)
register_method(
    Method(
        name="dapo",
        advantage="grpo",
        defaults=dict(DAPO_DEFAULTS),
        overlong_shaping=True,
        compare_overrides=DAPO_COMPARE_OVERRIDES,
        summary=(
            "DAPO (arXiv 2503.14476): ±1 rewards, clip-higher, token-mean loss, dynamic sampling, overlong "
            "shaping (paper: L_max 20480, L_cache 4096; here by default L_max = sampling.max_new_tokens and a "
            "buffer of a fifth of it; reward.overlong_penalty=0 turns it off)."
        ),
    )
)
register_method(
    Method(
        name="rloo",
        advantage="rloo",
        defaults={"loss.agg": "token-mean"},
        summary="RLOO (arXiv 2402.14740): outcome reward minus the mean reward of the other samples of the prompt.",
    )
)
register_method(
    Method(
        name="process_grpo",
        advantage="process_grpo",
        defaults={"loss.agg": "seq-mean-token-mean"},
        summary="Process-supervised GRPO (DeepSeekMath §4.1.3): group-normalised step rewards, "
                "summed from each token's step on.",
        needs_step_rewards=True,
    )
)
