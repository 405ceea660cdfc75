"""CAPO: token rewards from a generative critic's step verdicts (Xie et al., arXiv 2508.02298; methods.md §5).

A frozen LLM reads the question, the reference answer and the numbered steps of each response
and names the wrong steps; k critiques are voted per step.  The critic comes from the trainer
(`critic`: a `creditrl.critics.StepCritic` over an LLM, or the lab's `OracleLabCritic`); an LLM
critic costs k generations per distinct response.
Published findings: W_process = 1 is best in the ablation with W_whole = 2 (0.1 → 28.8, 1 → 29.4,
2 → 28.5, 5 → 27.4); `intersection` voting is best for small policies (1B–3B), `majority` /
`union` for 7B; n = 16 rollouts per prompt; a 70B-class instruct critic.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from creditrl.critics import OracleLabCritic, StepCritic
from creditrl.methods.groups import group_index, group_normalize
from creditrl.methods.grpo import step_values_on_tokens
from creditrl.methods.registry import Method, register_advantage, register_method
from creditrl.rollouts import Rollouts

Voting = Literal["intersection", "majority", "union", "average"]


class CAPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(4, ge=1, description="critiques per response (paper: 4)")
    voting: Voting = Field("intersection", description="how k verdicts flag a step (paper: intersection for "
                                                       "small policies, majority / union for 7B)")
    w_whole: float = Field(2.0, description="W_whole, weight of the verifier's verdict r_v ∈ {0, 1} (paper: 2)")
    w_process: float = Field(1.0, ge=0.0, description="W_process, penalty on a flagged step's tokens (paper: 1)")
    std_normalize: bool = Field(True, description="[uncertain] divide by the group's token std after centring")
    eps: float = Field(1e-6, gt=0.0)


def step_penalties(verdicts: Sequence[set[int] | None], n_steps: int, voting: Voting) -> Tensor:
    """Penalty in [0, 1] of each of a response's steps from its k verdicts: (n_steps,) float32.

    Only the m critiques with a verdict vote (None = no verdict); with m = 0 no step is flagged.
    c_j = number of them naming step j: intersection 1[c_j = m], majority 1[c_j > m/2],
    union 1[c_j ≥ 1], average c_j / m — [uncertain semantics] the penalty scaled by the fraction
    of critiques that flag the step.
    """
    valid = [v for v in verdicts if v is not None]
    counts = torch.zeros(n_steps)
    for verdict in valid:
        counts[[j for j in verdict if 0 <= j < n_steps]] += 1
    m = len(valid)
    if m == 0:
        return counts
    if voting == "intersection":
        return (counts == m).float()
    if voting == "majority":
        return (counts > m / 2).float()
    if voting == "union":
        return (counts >= 1).float()
    return counts / m


def capo_token_advantages(correct: Tensor, penalties: Tensor, step_ids: Tensor, mask: Tensor, group_ids: Tensor,
                          params: CAPOParams) -> Tensor:
    """R_{i,t} = W_whole·r_v(o_i) − W_process·penalty_i(step(t)), normalised over the group's tokens.

    A = (R − mean) / (std + eps), mean and unbiased std over all response tokens of the group
    (without `std_normalize`: A = R − mean).  A group whose token rewards all agree (one token included) gets 0.
    Shapes: correct (B,) bool, penalties (B, S), step_ids (B, T), mask (B, T), group_ids (B,) -> (B, T).
    """
    mask = mask.bool()
    penalty = step_values_on_tokens(penalties, step_ids)
    rewards = torch.where(mask, params.w_whole * correct.float()[:, None] - params.w_process * penalty, 0.0)
    index, counts = group_index(group_ids)
    return group_normalize(rewards, index, len(counts), mask, eps=params.eps, scale_by_std=params.std_normalize)


@register_advantage("capo", params=CAPOParams, needs=("critic",), group_relative=True)
def capo(rollouts: Rollouts, params: CAPOParams, critic: StepCritic | OracleLabCritic) -> Tensor:
    """CAPO advantages (Xie et al., arXiv 2508.02298): k critiques per response, voted per step.

    r_v is `rollouts.correct` (the verifier's verdict, not the shaped reward).  A group holding a
    response that no critique judged gets no step penalties (outcome credit only).  Shapes:
    step_ids (B, T), correct (B,) -> (B, T), 0 off the response mask.
    """
    verdicts = critic.wrong_steps(rollouts, params.k)
    n_steps = rollouts.num_steps.tolist()
    width = max(n_steps, default=0)
    penalties = torch.zeros(rollouts.batch_size, width)
    for b, (row, n) in enumerate(zip(verdicts, n_steps)):
        penalties[b, :n] = step_penalties(row, n, params.voting)
    # a response no critique judged (the critic failed, or its verdicts did not parse) would look flawless beside
    # its critiqued siblings: its whole group goes without the process term, on the verdict r_v alone
    unjudged = torch.tensor([all(v is None for v in row) and n > 0 for row, n in zip(verdicts, n_steps)])
    group_ids = rollouts.group_ids.cpu()
    penalties[torch.isin(group_ids, group_ids[unjudged])] = 0.0
    device = rollouts.response_mask.device
    return capo_token_advantages(rollouts.correct, penalties.to(device), rollouts.step_ids, rollouts.response_mask,
                                 rollouts.group_ids, params)


register_method(
    Method(
        name="capo",
        advantage="capo",
        defaults={"loss.agg": "seq-mean-token-mean"},
        summary=(
            "CAPO (arXiv 2508.02298): a frozen LLM critic names each response's wrong steps (k = 4 critiques, "
            "voted); token reward 2·r_v − 1·[step flagged], normalised over the group's tokens.  The default "
            "critic is the lab's oracle (critic.recall, critic.precision); set the `critic` section for a local "
            "model or an OpenAI-compatible endpoint.  The paper uses n = 16 rollouts."
        ),
    )
)
