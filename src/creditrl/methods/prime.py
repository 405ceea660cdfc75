"""PRIME: process reinforcement through implicit rewards (Cui et al. 2025, arXiv 2502.01456).

Dense rewards without step labels: an implicit PRM (the trainer's `implicit_prm`,
`creditrl.implicit_prm`), initialised from the policy and trained online on outcome labels, gives
every token the reward β·log π_φ/π_ref.  The advantage follows the PRIME recipe for verl
(`recipe/prime`, `compute_rloo_advantage_return`): process and outcome rewards each get a
leave-one-out baseline within the prompt's group, are weighted (5 and 5), summed, turned into
returns-to-go (γ = 1) and whitened over the batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from creditrl.implicit_prm import ImplicitPRM
from creditrl.methods.ppo import masked_whiten, outcome_token_rewards
from creditrl.methods.registry import Method, register_advantage, register_method
from creditrl.rollouts import Rollouts


class PRIMEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reward_dpo_coef: float = Field(5.0, ge=0.0, description="weight of the implicit process rewards "
                                                            "(algorithm.reward_dpo_coef)")
    reward_gt_coef: float = Field(5.0, ge=0.0, description="weight of the outcome reward (algorithm.reward_gt_coef)")
    prime_norm: Literal["batch_norm", "none"] = Field(
        "batch_norm", description="batch_norm: divide the process rewards by the batch's largest |return-to-go|")


def token_process_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """(B, T) the process rewards on each response's tokens but its last, as the recipe's `prime_granularity:
    token` places them (the last token's implicit reward is left out; the outcome reward sits there)."""
    lengths = mask.sum(1, keepdim=True)
    before_last = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths - 1
    return torch.where(before_last, rewards, 0.0)


def batch_normalised(rewards: Tensor) -> Tensor:
    """rewards / (max over the batch of |Σ_{k ≥ t} r_k| + 1e-6): the recipe's `prime_norm: batch_norm`."""
    to_go = rewards.flip(1).cumsum(1).flip(1)
    return rewards / (to_go.abs().max() + 1e-6)


def leave_one_out(rewards: Tensor, mask: Tensor, group_ids: Tensor) -> Tensor:
    """(B, T) RLOO on token rewards: with m_i the mean of row i's rewards over its masked tokens and n its group's
    size, r_t · n/(n−1) − Σ_{j in group} m_j/(n−1) on masked tokens, 0 elsewhere (for one reward per row, on one
    token, that is r_i − mean_{j≠i} r_j)."""
    mask = mask.bool()
    counts = mask.sum(1).clamp(min=1)
    row_means = torch.where(mask, rewards, 0.0).sum(1) / counts
    _, group = torch.unique(group_ids, return_inverse=True)
    sizes = torch.bincount(group).to(rewards.dtype)[group]  # (B,) n of each row's group
    group_sums = torch.zeros(int(group.max()) + 1 if len(group) else 0, dtype=rewards.dtype).index_add_(
        0, group, row_means)[group]
    baseline = (group_sums / (sizes - 1))[:, None]
    return torch.where(mask, rewards * (sizes / (sizes - 1))[:, None] - baseline, 0.0)


@register_advantage("prime", params=PRIMEParams, needs=("implicit_prm",), group_relative=True)
def prime(rollouts: Rollouts, params: PRIMEParams, implicit_prm: ImplicitPRM) -> Tensor:
    """A = whiten(Σ_{k ≥ t} [c_p · RLOO(r^p)_k + c_o · RLOO(r^o)_k]) over the batch's response tokens.

    r^p_t = β·log π_φ/π_ref on every response token but the last (batch-normalised by default); r^o = the outcome
    reward R on the last token (the run's reward; the recipe's is the verifier's 0/1, the same on the lab);
    RLOO per group of the prompt (`leave_one_out`); c_p = reward_dpo_coef, c_o = reward_gt_coef.
    Shapes: rewards (B,), process rewards (B, T) -> (B, T).
    """
    mask = rollouts.response_mask.bool()
    process = token_process_rewards(implicit_prm.process_rewards(rollouts), mask)
    if params.prime_norm == "batch_norm":
        process = batch_normalised(process)
    outcome = outcome_token_rewards(rollouts).to(process.dtype)
    last_token = torch.arange(mask.shape[1])[None, :] == rollouts.response_lengths[:, None] - 1
    total = (params.reward_dpo_coef * leave_one_out(process, mask, rollouts.group_ids)
             + params.reward_gt_coef * leave_one_out(outcome, last_token, rollouts.group_ids))
    returns = (total * mask).flip(1).cumsum(1).flip(1)
    return masked_whiten(returns, mask)


register_method(
    Method(
        name="prime",
        advantage="prime",
        defaults={"loss.agg": "token-mean", "loss.entropy_coef": 0.001},
        # the recipe trains its PRM at 2× the actor's lr (1e-6 vs 5e-7); the lab's policy lr is 1e-4
        compare_overrides=("implicit_prm.lr=2e-4",),
        summary=(
            "PRIME (arXiv 2502.01456): an implicit PRM, a copy of the policy trained online by cross-entropy on "
            "outcome labels, gives each token β·log π_φ/π_ref (β = 0.05); process and outcome rewards get "
            "leave-one-out baselines, weights 5 and 5, returns-to-go, whitened.  Costs a second trained model and "
            "a frozen reference (implicit_prm.* sets its lr and update order).  The recipe also filters prompts "
            "to group accuracy in [0.2, 0.8] and samples 4 responses per prompt: set those in the recipe."
        ),
    )
)
