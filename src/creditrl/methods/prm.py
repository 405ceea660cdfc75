"""RL from a process reward model's step scores (methods.md §2): `prm_grpo` and `pure`.

Both take the trainer resource `prm` (`score_steps(rollouts) -> (B, S)`, see `creditrl.prm`)
and mix in the verifiable outcome reward R_i by default (`outcome_weight` w = 1): a policy
trained on PRM scores alone learns to please the PRM instead of solving the problem (PURE saw
this reward hacking within ~200 steps), so set w = 0 only to study that.

- `prm_grpo`: step rewards r_ij = s_ij, plus w·R_i on the last step of each response, fed to
  process-supervised GRPO (`process_grpo`: group-normalised, summed from the token's step on).
- `pure`: PURE min-form credit (Cheng et al. 2025, arXiv 2504.15275), with an RLOO baseline.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from creditrl.methods.groups import group_index, leave_one_out_mean
from creditrl.methods.grpo import ProcessGRPOParams, process_grpo, step_values_on_tokens
from creditrl.methods.registry import Method, register_advantage, register_method
from creditrl.rollouts import Rollouts


class PRMGRPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eps: float = Field(1e-6, gt=0.0)
    outcome_weight: float = Field(1.0, ge=0.0, description="w: weight of the outcome reward added at the last step")


class PUREParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_form: Literal["soft", "hard"] = "soft"
    temperature: float = Field(0.1, gt=0.0, description="T of the soft min-form")
    outcome_weight: float = Field(1.0, ge=0.0, description="w: weight of the outcome reward added to every return")


def _scores(prm, rollouts: Rollouts) -> Tensor:
    scores = prm.score_steps(rollouts)
    if scores.shape[0] != rollouts.batch_size or scores.dim() != 2:
        raise ValueError(f"the PRM returned step scores of shape {tuple(scores.shape)}, "
                         f"expected ({rollouts.batch_size}, S)")
    return scores.float()


def with_outcome(scores: Tensor, rollouts: Rollouts, weight: float) -> Tensor:
    """Step rewards (B, S): the PRM scores, with w·R_i added on each response's last step.

    A last step the PRM left unscored (NaN) gets w·R_i alone.  A response without steps gets
    nothing: it has no step to carry w·R_i, and an invented one would enter its group's step mean
    and std.
    """
    if weight == 0 or scores.shape[1] == 0:  # no steps anywhere in the batch: nothing to add w·R to
        return scores
    rows = torch.nonzero(rollouts.num_steps > 0).squeeze(1)
    last = (rollouts.num_steps[rows] - 1).clamp(max=scores.shape[1] - 1)
    out = scores.clone()
    outcome = weight * rollouts.rewards[rows].float()
    out[rows, last] = torch.nan_to_num(scores[rows, last], nan=0.0) + outcome
    return out


def outcome_weight_warning(cfg, params: PRMGRPOParams | PUREParams) -> str | None:
    """Training on PRM scores alone invites reward hacking (the policy learns to please the PRM)."""
    if params.outcome_weight == 0:
        return ("method_params.outcome_weight=0 trains on PRM scores alone; policies learn to exploit the PRM "
                "(reward hacking), so mix in the outcome reward")
    return None


@register_advantage("prm_grpo", params=PRMGRPOParams, needs=("prm",), group_relative=True,
                    warn=outcome_weight_warning)
def prm_grpo(rollouts: Rollouts, params: PRMGRPOParams, prm) -> Tensor:
    """Process-supervised GRPO on PRM step scores plus w·R_i at the last step.

    Shapes: scores (B, S), rewards (B,) -> step rewards (B, S) -> `process_grpo` -> (B, T).
    """
    step_rewards = with_outcome(_scores(prm, rollouts), rollouts, params.outcome_weight)
    return process_grpo(replace(rollouts, step_rewards=step_rewards), ProcessGRPOParams(eps=params.eps))


def min_form_returns(scores: Tensor, form: str, temperature: float) -> Tensor:
    """Step returns G (B, S) from step scores s (B, S), NaN where absent (absent steps get 0).

    hard: G_k = min_{j ≥ k} s_j.
    soft: PURE's transform s*_j = s_j · softmax_j(−s / T) over the response's steps, then
          G_k = Σ_{j ≥ k} s*_j; as T → 0 every step up to the worst one gets min_j s_j and the
          steps after it get 0.
    """
    valid = ~torch.isnan(scores)
    if form == "hard":
        suffix_min = torch.where(valid, scores, torch.inf).flip(1).cummin(1).values.flip(1)
        return torch.where(torch.isinf(suffix_min), 0.0, suffix_min)
    if form != "soft":
        raise ValueError(f"unknown min_form {form!r}; use 'soft' or 'hard'")
    weights = torch.softmax(torch.where(valid, -scores / temperature, -torch.inf), dim=1)
    transformed = torch.where(valid, weights * scores, 0.0)  # NaN rows (no step scored) become 0
    return transformed.flip(1).cumsum(1).flip(1)


@register_advantage("pure", params=PUREParams, needs=("prm",), group_relative=True, warn=outcome_weight_warning)
def pure(rollouts: Rollouts, params: PUREParams, prm) -> Tensor:
    """PURE: A_it = G_i,step(t) + w·R_i − b_i, with the RLOO baseline b_i = mean_{j≠i} V_j.

    V_j = G_j,0 + w·R_j is response j's return from its first step.  A group of one gets A = 0;
    tokens without a step (padding) get 0.  Shapes: scores (B, S), step_ids (B, T) -> (B, T).
    """
    returns = min_form_returns(_scores(prm, rollouts), params.min_form, params.temperature)
    n_steps = returns.shape[1]
    outcome = params.outcome_weight * rollouts.rewards.float()
    starts = returns[:, 0] + outcome
    index, counts = group_index(rollouts.group_ids)
    baseline = leave_one_out_mean(starts, index, counts)
    step_ids = rollouts.step_ids
    on_step = (step_ids >= 0) & (step_ids < n_steps)
    token_returns = step_values_on_tokens(returns, step_ids) + outcome[:, None]
    adv = torch.where(on_step & (counts[index, None] > 1), token_returns - baseline[:, None], 0.0)
    return torch.where(rollouts.response_mask.bool(), adv, 0.0)


register_method(
    Method(
        name="pure",
        advantage="pure",
        defaults={"loss.agg": "token-mean"},
        summary="PURE (arXiv 2504.15275): min-form returns of PRM step scores plus the outcome reward, RLOO baseline.",
    )
)
register_method(
    Method(
        name="prm",
        advantage="prm_grpo",
        defaults={"loss.agg": "seq-mean-token-mean"},
        summary="Process-supervised GRPO on a PRM's step scores, plus the outcome reward at the last step "
                "(Lightman et al., arXiv 2305.20050; GRPO process supervision as in DeepSeekMath, arXiv 2402.03300); "
                "`pure` is the min-form alternative.",
    )
)
