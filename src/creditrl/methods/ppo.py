"""PPO with GAE and a learned value model (Schulman et al. 2017, arXiv 1707.06347; GAE: arXiv 1506.02438).

The classic answer to credit assignment, and the baseline VinePPO was measured against: a value
model V(s_t), trained alongside the policy (the trainer's `value_model`, `creditrl.value_model`),
turns the outcome reward into per-token advantages by temporal differences.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from creditrl.methods.loss import masked_mean
from creditrl.methods.registry import Method, register_advantage, register_method
from creditrl.rollouts import Rollouts
from creditrl.value_model import ValueModel


class PPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gamma: float = Field(1.0, ge=0.0, le=1.0, description="discount γ (verl algorithm.gamma)")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE λ (TRL's PPO default; verl's algorithm.lam is 1.0)")
    whiten: bool = Field(True, description="whiten the advantages over the batch's response tokens (verl's "
                                           "masked_whiten, inside its GAE)")


def outcome_token_rewards(rollouts: Rollouts) -> Tensor:
    """(B, T) the outcome reward R on each response's last token, 0 elsewhere (verl's token-level scores)."""
    rewards = rollouts.rewards if rollouts.rewards.is_floating_point() else rollouts.rewards.float()
    last = (rollouts.response_lengths - 1).clamp(min=0)
    token_rewards = torch.zeros(rollouts.response_mask.shape, dtype=rewards.dtype)
    token_rewards[torch.arange(rollouts.batch_size), last] = rewards
    return token_rewards * rollouts.response_mask


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation by a reverse scan over response tokens; (B, T) -> (A, G), both (B, T).

        δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   G_t = A_t + V_t

    where t+1 is the next response token (V and A are 0 after the last one); positions off the mask
    are skipped: they carry the next V and A backwards unchanged (as verl's `compute_gae_advantage_return`).
    """
    mask = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        here = delta + gamma * lam * next_advantage
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        next_advantage = torch.where(mask[:, t], here, next_advantage)
        advantages[:, t] = next_advantage
    return advantages, advantages + values


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean)·(var + eps)^−½, the mean and unbiased variance over the masked entries of the whole batch."""
    mask = mask.bool()
    n = mask.sum()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask) * n / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps)


@register_advantage("ppo", params=PPOParams, needs=("value_model",))
def ppo(rollouts: Rollouts, params: PPOParams, value_model: ValueModel) -> Tensor:
    """GAE advantages from the value model's V(s_t) and the outcome reward on the last token, whitened.

    Also hands the value model its regression targets G_t = A_t + V_t (before whitening) and the old
    values V_t that clip its next update.  Shapes: rewards (B,), values (B, T) -> (B, T).
    """
    mask = rollouts.response_mask.bool()
    values = value_model.values(rollouts)
    advantages, returns = gae(outcome_token_rewards(rollouts), values, mask, params.gamma, params.lam)
    value_model.set_targets(values, returns)
    return masked_whiten(advantages, mask) if params.whiten else advantages


register_method(
    Method(
        name="ppo",
        advantage="ppo",
        defaults={"loss.agg": "token-mean"},
        # verl trains its critic at 10× the actor's lr (1e-5 vs 1e-6); the lab's policy lr is 1e-4
        compare_overrides=("value_model.lr=1e-3",),
        summary=(
            "PPO with GAE (arXiv 1707.06347, 1506.02438): a value model trained alongside the policy (a copy of it "
            "with a value head; value_model.* sets its lr, clipping and warm-up) turns the outcome reward into "
            "per-token advantages, γ = 1, λ = 0.95, whitened.  Costs a second model: its forwards and parameters "
            "are in the step metrics (value_*)."
        ),
    )
)
