"""creditrl's methods inside verl (written against verl 0.9.1).

verl imports this module in every process when it is named in an environment variable:

    VERL_USE_EXTERNAL_MODULES=creditrl.integrations.verl python -m verl.trainer.main_ppo ...

Importing it registers, in verl's own registries:

- advantage estimators (`algorithm.adv_estimator=...`), verl's estimator signature
  `fn(token_level_rewards, response_mask, index, config, **kwargs) -> (advantages, returns)`:
  `creditrl_grpo`, `creditrl_rloo`, `creditrl_grpo_lambda`, `creditrl_process_grpo`, `creditrl_capo`.
  They use new names because verl's trainer calls its own `grpo` and `gae` directly, whatever
  the registry holds.  Each builds a `creditrl.rollouts.Rollouts` from verl's tensors and runs
  the project's advantage on it.
- policy losses (`actor_rollout_ref.actor.policy_loss.loss_mode=...`), verl's policy-loss
  signature: `creditrl_fipo`, `creditrl_grpo_lambda`, `creditrl_grpo_lambda_weight`.  Each applies
  the method's token weight (to A, under no_grad) and ratio transform (to Δ = log π − log π_old,
  with gradient) and hands A·f and Δ' to verl's own `vanilla` loss, which clips, dual-clips and
  aggregates exactly as creditrl's `policy_loss` does, but over verl's global batch (data
  parallel ranks and micro-batches), which only verl knows.
- GSPO, CISPO and SAPO are verl's own losses: `policy_loss.loss_mode=gspo` (the GSPO-token form of
  creditrl's `gspo` ratio transform), `cispo` and `sapo` (`tau_pos`, `tau_neg`) compute what creditrl's
  methods of those names compute on the same tensors, value and gradient, so they combine with the
  estimators above directly.  The 80/20 rule (`high_entropy`) cannot run here: verl hands a policy
  loss no entropy (its own `entropy_coeff` term is computed apart).
- a reward manager (`reward.reward_manager.name=creditrl_step_rewards`) for step rewards (PRM,
  CAPO): it cuts each response into steps with creditrl's step splitter, asks the user's
  `compute_score(..., steps=[...])` for one reward per step, and writes step j's reward on the
  last token of step j.

Not carried: `ktae` weighs each token by its token id, and verl 0.9.1's `compute_advantage` hands
an estimator no token ids (only its own GDPO gets the batch); `vineppo` and `spo` need Monte Carlo
continuations of response prefixes, and `denser` the policy's hidden states, which verl's trainer
does not produce between sampling and the advantage.

The dense-reward trap: verl's built-in estimators `grpo` (and `rloo`, `reinforce_plus_plus`, ...)
sum `token_level_rewards` over the response into one scalar, so step rewards given to them are
silently turned into an outcome reward.  Step rewards need `creditrl_process_grpo` or
`creditrl_capo`, which read each token's reward back as "the reward of the step ending here".

Method parameters (creditrl's `method_params`, published defaults otherwise) come from the
environment variable `CREDITRL_METHOD_PARAMS`, a JSON object keyed by creditrl method name,
e.g. `{"fipo": {"half_life": 64}, "grpo_lambda": {"lam": 0.95}}`: verl's configs are dataclasses
that refuse unknown keys, and every worker inherits the driver's environment on a local Ray
cluster.  Shapes: B responses, T padded response length (right-padded), S steps.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor
from verl.experimental.reward_loop.reward_manager import register as register_reward_manager
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.trainer.ppo.core_algos import get_policy_loss_fn, register_adv_est, register_policy_loss

from creditrl.methods import compute_advantages, loss_hooks, method_params_model, resolve_method
from creditrl.methods.capo import CAPOParams, Voting, capo_token_advantages, step_penalties
from creditrl.methods.loss import clamped_log_ratio, masked_mean, token_weights
from creditrl.rollouts import Rollouts
from creditrl.steps import split_steps, token_end_offsets, token_step_ids

PARAMS_ENV = "CREDITRL_METHOD_PARAMS"
SPLITTER_ENV = "CREDITRL_STEP_SPLITTER"
DEFAULT_SPLITTER = "math"

# A step whose reward is exactly 0 would be invisible in `token_level_rewards`; the reward manager
# writes this instead (the smallest normal float32, far below any reward's precision).
STEP_END_ZERO = float(torch.finfo(torch.float32).tiny)

ESTIMATORS = ["creditrl_grpo", "creditrl_rloo", "creditrl_grpo_lambda", "creditrl_process_grpo", "creditrl_capo"]
POLICY_LOSSES = ["creditrl_fipo", "creditrl_grpo_lambda", "creditrl_grpo_lambda_weight"]
REWARD_MANAGERS = ["creditrl_step_rewards"]


# ---------------------------------------------------------------- parameters and batches


def method_params(method: str) -> BaseModel:
    """The method's `method_params`: published defaults, updated by `CREDITRL_METHOD_PARAMS[method]`."""
    overrides = json.loads(os.environ.get(PARAMS_ENV) or "{}")
    if not isinstance(overrides, dict):
        raise ValueError(f"{PARAMS_ENV} must be a JSON object keyed by creditrl method name, got {overrides!r}")
    return method_params_model(method)(**overrides.get(method, {}))


def group_ids_from_index(index: Sequence[Any] | np.ndarray | None, device: torch.device) -> Tensor:
    """verl's group uid of each row (B,) -> creditrl's group ids (B,) long, numbered in order of appearance."""
    if index is None:
        raise ValueError("creditrl estimators need verl's group index (data.non_tensor_batch['uid']); got None")
    numbers: dict[Any, int] = {}
    return torch.tensor([numbers.setdefault(uid, len(numbers)) for uid in index], dtype=torch.long, device=device)


def verl_rollouts(
    rewards: Tensor,
    response_mask: Tensor,
    index: Sequence[Any] | np.ndarray | None,
    step_ids: Tensor | None = None,
    step_rewards: Tensor | None = None,
) -> Rollouts:
    """A `Rollouts` holding what verl's estimator is given; token ids and prompts are not.

    rewards (B,), response_mask (B, T), index (B,) uids; step_ids (B, T) (default: every response
    token in step 0), step_rewards (B, S).  `correct` is `rewards > 0`.
    """
    mask = response_mask.bool()
    n_rows, width = mask.shape
    device = mask.device
    return Rollouts(
        prompt_ids=torch.zeros(n_rows, 0, dtype=torch.long, device=device),
        prompt_mask=torch.zeros(n_rows, 0, dtype=torch.bool, device=device),
        response_ids=torch.zeros(n_rows, width, dtype=torch.long, device=device),
        response_mask=mask,
        group_ids=group_ids_from_index(index, device),
        step_ids=step_ids if step_ids is not None else torch.where(mask, 0, -1),
        rewards=rewards.float(),
        correct=rewards > 0,
        truncated=torch.zeros(n_rows, dtype=torch.bool, device=device),
        step_rewards=step_rewards,
    )


def steps_from_markers(token_level_rewards: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Read step rewards back from `token_level_rewards` laid out by `creditrl_step_rewards`.

    Every non-zero reward on a response token ends a step and is that step's reward; the tokens
    up to and including it (after the previous step end) form the step.  Tokens after a row's
    last step end belong to no step (id −1); a row without a non-zero reward has no step at all.
    Shapes: token_level_rewards, response_mask (B, T) -> step_ids (B, T) long, step_rewards (B, S)
    float, NaN where a response has no step j.
    """
    mask = response_mask.bool()
    ends = mask & (token_level_rewards != 0)
    # the step of token t = the number of step ends before t
    step_ids = torch.cumsum(ends.long(), dim=1) - ends.long()
    n_steps = ends.sum(dim=1, keepdim=True)
    step_ids = torch.where(mask & (step_ids < n_steps), step_ids, -1)
    width = int(n_steps.max()) if n_steps.numel() else 0
    step_rewards = torch.full((mask.shape[0], width), float("nan"), dtype=torch.float32, device=mask.device)
    rows, cols = ends.nonzero(as_tuple=True)
    step_rewards[rows, step_ids[rows, cols]] = token_level_rewards[rows, cols].float()
    return step_ids, step_rewards


def _refuse_kl_in_reward(config: Any, estimator: str) -> None:
    """Step-reward estimators read rewards token by token; a KL penalty on every token breaks that."""
    if config is not None and config.get("use_kl_in_reward", False):
        raise ValueError(f"{estimator} reads step rewards from token_level_rewards; algorithm.use_kl_in_reward=True "
                         "adds a KL penalty to every token and mixes them up. Use the actor's KL loss instead "
                         "(actor_rollout_ref.actor.use_kl_loss=True).")


# ---------------------------------------------------------------- advantage estimators


@register_adv_est("creditrl_grpo")
def creditrl_grpo(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """creditrl's `grpo` advantage: A_i = (R_i − mean_G R) / (std_G R + eps) on every response token.

    R_i = Σ_t token_level_rewards[i, t] (verl's outcome reward).  `algorithm.norm_adv_by_std_in_grpo=False`
    drops the std division (Dr. GRPO), as it does for verl's `grpo`.
    Shapes: token_level_rewards, response_mask (B, T), index (B,) -> advantages, returns (B, T).
    """
    rollouts = verl_rollouts(token_level_rewards.sum(dim=-1), response_mask, index)
    advantages = compute_advantages("grpo", rollouts, _scaled_by_std(method_params("grpo"), config))
    return advantages, advantages


def _scaled_by_std(params: Any, config: Any) -> Any:
    """The GRPO params with `algorithm.norm_adv_by_std_in_grpo=False` read as `scale_by_std=False`."""
    if config is not None and config.get("norm_adv_by_std_in_grpo", True) is False:
        return params.model_copy(update={"scale_by_std": False})
    return params


@register_adv_est("creditrl_rloo")
def creditrl_rloo(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """creditrl's `rloo` advantage: A_i = R_i − mean_{j≠i} R_j, R_i = Σ_t token_level_rewards[i, t].

    Shapes: token_level_rewards, response_mask (B, T), index (B,) -> advantages, returns (B, T).
    """
    rollouts = verl_rollouts(token_level_rewards.sum(dim=-1), response_mask, index)
    advantages = compute_advantages("rloo", rollouts, method_params("rloo"))
    return advantages, advantages


@register_adv_est("creditrl_grpo_lambda")
def creditrl_grpo_lambda(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """creditrl's `grpo_lambda` advantage: the GRPO advantage clamped below at `adv_clamp` (−0.1).

    Pair it with the policy loss `creditrl_grpo_lambda` (the traced ratio).  Reads
    `algorithm.norm_adv_by_std_in_grpo` as `creditrl_grpo` does.
    Shapes: token_level_rewards, response_mask (B, T), index (B,) -> advantages, returns (B, T).
    """
    rollouts = verl_rollouts(token_level_rewards.sum(dim=-1), response_mask, index)
    advantages = compute_advantages("grpo_lambda", rollouts, _scaled_by_std(method_params("grpo_lambda"), config))
    return advantages, advantages


@register_adv_est("creditrl_process_grpo")
def creditrl_process_grpo(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """creditrl's `process_grpo` advantage on step rewards written by `creditrl_step_rewards`.

    The step rewards (B, S) are group-normalised over all steps of the group; a token of step s
    gets Σ_{j ≥ s} of its response's normalised step rewards.  This is the `prm` method when the
    reward function returns PRM scores plus the outcome reward on the last step (`prm_step_rewards`).
    Shapes: token_level_rewards, response_mask (B, T), index (B,) -> advantages, returns (B, T).
    """
    _refuse_kl_in_reward(config, "creditrl_process_grpo")
    step_ids, step_rewards = steps_from_markers(token_level_rewards, response_mask)
    rollouts = verl_rollouts(token_level_rewards.sum(dim=-1), response_mask, index, step_ids, step_rewards)
    advantages = compute_advantages("process_grpo", rollouts, method_params("process_grpo"))
    return advantages, advantages


@register_adv_est("creditrl_capo")
def creditrl_capo(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """creditrl's CAPO advantage on step rewards written by `creditrl_step_rewards`.

    Each token's reward is the reward of its step, R_{i,t} = W_whole·r_v − W_process·penalty(step(t))
    as computed by the reward function (`capo_step_rewards`); A = (R − mean) / (std + eps), mean
    and unbiased std over all response tokens of the group.  creditrl's `capo_token_advantages`
    builds R from the verdict and step penalties; here the penalty of step j is −(step j's reward)
    and W_whole = 0, W_process = 1, which gives R_{i,t} = the step's reward.
    Shapes: token_level_rewards, response_mask (B, T), index (B,) -> advantages, returns (B, T).
    """
    _refuse_kl_in_reward(config, "creditrl_capo")
    step_ids, step_rewards = steps_from_markers(token_level_rewards, response_mask)
    mask = response_mask.bool() & (step_ids >= 0)
    params = CAPOParams(**{**method_params("capo").model_dump(), "w_whole": 0.0, "w_process": 1.0})
    no_verdict = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    advantages = capo_token_advantages(no_verdict, -torch.nan_to_num(step_rewards), step_ids, mask,
                                       group_ids_from_index(index, mask.device), params)
    return advantages, advantages


# ---------------------------------------------------------------- policy losses


def hooked_policy_loss(
    method: str,
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str,
    config: Any,
    rollout_is_weights: Tensor | None,
) -> tuple[Tensor, dict[str, Any]]:
    """verl's `vanilla` clipped loss with the creditrl method's token weight and ratio transform.

    Δ = clamp(log π − log π_old, ±20), as in `policy_loss`; A' = A·f(A, Δ) with f under no_grad (Δ detached);
    Δ' = transform(Δ), with gradient; verl's
    `vanilla` loss then runs on log_prob = Δ', old_log_prob = 0, advantages = A' (clip
    `clip_ratio_low/high`, dual clip `clip_ratio_c`, `loss_agg_mode` over verl's global batch).  Tokens
    the weight takes out of the loss (FIPO's dropped responses) leave the mask the loss sums over; verl's
    global token count, the token-mean's denominator, is taken from the batch before the loss and keeps them.
    Metrics: verl's, with `actor/ppo_kl` on the untransformed Δ, plus `actor/creditrl_weight_mean`.
    Shapes: all tensors (B, T) -> scalar loss.
    """
    _refuse_what_verl_computes_otherwise(method)
    ratio_transform, token_weight = loss_hooks(method, method_params(method))
    mask = response_mask.bool()
    delta = clamped_log_ratio(log_prob, old_log_prob, mask)
    weight, kept = token_weights(token_weight, advantages, delta, mask)
    transformed = ratio_transform(delta, mask) if ratio_transform is not None else delta
    loss, metrics = get_policy_loss_fn("vanilla")(
        old_log_prob=torch.zeros_like(transformed),
        log_prob=transformed,
        advantages=advantages * weight,
        response_mask=kept.to(response_mask.dtype),
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=rollout_is_weights,
    )
    with torch.no_grad():
        metrics["actor/ppo_kl"] = masked_mean(-delta, mask).item()
        metrics["actor/creditrl_weight_mean"] = masked_mean(weight.float(), mask).item()
    return loss, metrics


def _refuse_what_verl_computes_otherwise(method: str) -> None:
    """`hooked_policy_loss` hands the clipped surrogate to verl's `vanilla` and has no entropy to give."""
    resolved = resolve_method(method)
    if resolved.policy_loss is not None:
        raise ValueError(f"method {method!r} replaces the clipped surrogate with {resolved.policy_loss!r}; verl ships "
                         f"it: actor_rollout_ref.actor.policy_loss.loss_mode={resolved.policy_loss}")
    if resolved.needs_entropy:
        raise ValueError(f"method {method!r} reads the policy's per-token entropy, which verl does not hand to a "
                         "policy loss")


@register_policy_loss("creditrl_fipo")
def creditrl_fipo(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """FIPO: the clipped loss with each token's advantage scaled by clip(exp(discounted future Δ)).

    Needs π_θ ≠ π_old, i.e. several mini-batches (`ppo_mini_batch_size` < `data.train_batch_size`)
    or `ppo_epochs` > 1; otherwise every weight is 1.  Shapes: (B, T) -> scalar loss.
    """
    return hooked_policy_loss("fipo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                              rollout_is_weights)


@register_policy_loss("creditrl_grpo_lambda")
def creditrl_grpo_lambda_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """GRPO-λ (ε-trace): the clipped loss on the traced ratio exp(Σ_{k≤t} (γλ)^(t−k)·Δ_k).

    Pair it with the estimator `creditrl_grpo_lambda`.  Shapes: (B, T) -> scalar loss.
    """
    return hooked_policy_loss("grpo_lambda", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                              config, rollout_is_weights)


@register_policy_loss("creditrl_grpo_lambda_weight")
def creditrl_grpo_lambda_weight_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """GRPO-λ ε-weight [uncertain reading]: the plain ratio, with the trace coefficients as weights on A.

    Pair it with the estimator `creditrl_grpo_lambda`.  Shapes: (B, T) -> scalar loss.
    """
    return hooked_policy_loss("grpo_lambda_weight", old_log_prob, log_prob, advantages, response_mask,
                              loss_agg_mode, config, rollout_is_weights)


# ---------------------------------------------------------------- step rewards


def prm_step_rewards(step_scores: Sequence[float], outcome: float, outcome_weight: float = 1.0) -> list[float]:
    """Step rewards of the `prm` method: the PRM's step scores, with w·R added on the last step.

    Shapes: step_scores (S,) -> (S,).
    """
    rewards = [float(s) for s in step_scores]
    if rewards:
        rewards[-1] += outcome_weight * float(outcome)
    return rewards


def capo_step_rewards(
    verdicts: Sequence[set[int] | None],
    n_steps: int,
    correct: bool,
    voting: Voting = "intersection",
    w_whole: float = 2.0,
    w_process: float = 1.0,
) -> list[float]:
    """CAPO's reward of each step: W_whole·r_v − W_process·penalty_j, penalties voted from k critiques.

    `verdicts`: the wrong steps each critique names (None: no verdict); see `creditrl.methods.capo.step_penalties`.
    Shapes: -> (n_steps,).
    """
    penalties = step_penalties(verdicts, n_steps, voting)
    return [w_whole * float(correct) - w_process * float(p) for p in penalties]


def token_rewards_from_steps(step_rewards: Sequence[float], step_of_token: Sequence[int]) -> list[float]:
    """The layout the creditrl estimators read: step j's reward on the last token of step j, 0 elsewhere.

    A reward of exactly 0 is written as `STEP_END_ZERO` so that the step still ends there.  A step
    without a token of its own (it ends inside the next step's first token) adds its reward to the
    next step end (trailing ones: to the last one).  Shapes: step_rewards (S,), step_of_token (L,) -> (L,).
    """
    last_token = {step: t for t, step in enumerate(step_of_token)}  # later tokens overwrite earlier ones
    rewards = [0.0] * len(step_of_token)
    pending, last = 0.0, None
    for j, reward in enumerate(step_rewards):
        pending += float(reward)
        if j in last_token:
            last = last_token[j]
            rewards[last] = pending if pending != 0 else STEP_END_ZERO
            pending = 0.0
    if pending != 0 and rewards:  # trailing steps without tokens: add to the last step end
        last = len(rewards) - 1 if last is None else last
        rewards[last] = rewards[last] + pending or STEP_END_ZERO
    return rewards


@register_reward_manager("creditrl_step_rewards")
class CreditrlStepRewardManager(RewardManagerBase):
    """A reward manager that writes one reward per step on the step's last token.

    For each response it splits the decoded text into steps (creditrl splitter from
    `CREDITRL_STEP_SPLITTER`, default `math`) and calls the configured reward function as
    `compute_score(data_source=, solution_str=, ground_truth=, extra_info=, steps=[str, ...])`,
    which must return a dict with `score` (the outcome reward, logged) and `step_rewards` (one
    finite float per step); its other keys are logged (as floats, None where not a number).
    `run_single` returns the per-token rewards (L,) of the response; `assemble_rm_scores` pads
    them into verl's `rm_scores` (B, T).  Needs verl's legacy trainer (`trainer.use_v1=false`).
    """

    def __init__(self, config, tokenizer, compute_score, reward_router_address=None, reward_model_tokenizer=None):
        super().__init__(config, tokenizer, compute_score)
        # without a custom function verl substitutes its default scorer, and with a reward model it then
        # bypasses run_single altogether (one float per response from the model)
        if config.reward.custom_reward_function.path is None:
            raise ValueError("creditrl_step_rewards needs reward.custom_reward_function.path (a function returning "
                             "{'score': ..., 'step_rewards': [...]}); verl's default scorer gives no step rewards")
        reward_model = config.reward.get("reward_model") or {}
        if not reward_model.get("enable", False) or reward_model.get("enable_resource_pool", False):
            raise ValueError("creditrl_step_rewards writes per-token rewards, which only verl's colocated reward-model "
                             "path reads: set reward.reward_model.enable=true and "
                             "reward.reward_model.enable_resource_pool=false (the agent loop keeps one float per "
                             "response)")
        self.splitter = os.environ.get(SPLITTER_ENV) or DEFAULT_SPLITTER
        self.router_kwargs = {}
        if reward_router_address is not None:
            self.router_kwargs = {"reward_router_address": reward_router_address,
                                  "reward_model_tokenizer": reward_model_tokenizer}

    async def run_single(self, data) -> dict:
        item = data[-1:][0]  # multi-sequence outputs: only the last sequence is scored, as verl's naive manager does
        missing = [key for key in ("data_source", "reward_model") if key not in item.non_tensor_batch]
        if missing:
            raise ValueError(f"creditrl_step_rewards: the batch has no {missing}; verl 0.9.1's V1 trainer hands a "
                             "colocated reward model's manager only prompts and responses: set trainer.use_v1=false")
        response_ids = item.batch["responses"]
        n_valid = int(item.batch["attention_mask"][-response_ids.shape[-1]:].sum())
        ids = response_ids[:n_valid].tolist()
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(None, lambda: self.tokenizer.decode(ids, skip_special_tokens=True))
        spans = split_steps(text, self.splitter) or [(0, len(text))]
        score_kwargs = dict(data_source=item.non_tensor_batch["data_source"], solution_str=text,
                            ground_truth=item.non_tensor_batch["reward_model"]["ground_truth"],
                            extra_info=dict(item.non_tensor_batch.get("extra_info", None) or {}),
                            steps=[text[start:end] for start, end in spans], **self.router_kwargs)
        if inspect.iscoroutinefunction(self.compute_score):
            result = await self.compute_score(**score_kwargs)
        else:  # off the event loop, so that the batch's other responses are scored meanwhile
            result = await loop.run_in_executor(None, lambda: self.compute_score(**score_kwargs))
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, dict) or "step_rewards" not in result or "score" not in result:
            raise ValueError("creditrl_step_rewards: the reward function must return a dict with 'score' and "
                             f"'step_rewards' (one float per step), got {result!r}")
        step_rewards = [float(r) for r in result["step_rewards"]]
        if len(step_rewards) != len(spans):
            raise ValueError(f"creditrl_step_rewards: {len(spans)} steps but {len(step_rewards)} step rewards")
        if not all(np.isfinite(step_rewards)):
            raise ValueError(f"creditrl_step_rewards: step rewards must be finite, got {step_rewards}")
        offsets = await loop.run_in_executor(
            None, lambda: token_end_offsets(self.tokenizer, ids, skip_special_tokens=True))
        # the same keys for every response: verl takes the batch's keys from its first response
        extra = {key: _loggable(value) for key, value in result.items() if key != "step_rewards"}
        extra.setdefault("acc", extra["score"])  # verl's headline validation metric reads `acc`, else Σ token rewards
        extra["n_steps"] = len(spans)
        return {"reward_score": token_rewards_from_steps(step_rewards, token_step_ids(offsets, spans)),
                "reward_extra_info": extra}

    @classmethod
    def assemble_rm_scores(cls, data, scores: list[list[float]]) -> Tensor:
        """Per-token rewards of each response (B lists of length L_i) -> rm_scores (B, T), 0 on padding."""
        rm_scores = torch.zeros_like(data.batch["responses"], dtype=torch.float32)
        for row, token_rewards in enumerate(scores):
            rm_scores[row, : len(token_rewards)] = torch.tensor(token_rewards, dtype=torch.float32)
        return rm_scores


def _loggable(value: Any) -> float | None:
    """A reward function's extra value as a float for verl's logs (numpy and torch scalars too), else None."""
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
