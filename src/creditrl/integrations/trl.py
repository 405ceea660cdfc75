"""Run a creditrl method inside TRL's `GRPOTrainer` (written against TRL 1.16).

`CreditGRPOTrainer` keeps everything of TRL's trainer (data loading, generation, reward
functions, old / reference log-probs, buffering over `steps_per_generation` and
`num_iterations`, optimizer, logging) and changes two things:

- `_generate_and_score_completions` builds a `creditrl.rollouts.Rollouts` batch from what TRL
  generated and scored, and replaces TRL's sequence advantages (B,) with the method's per-token
  advantages (B, T) from `creditrl.methods.compute_advantages`;
- `_compute_loss` computes the loss with creditrl's `policy_loss`, passing the method's ratio
  transform, token weight and policy loss (`creditrl.methods.loss_hooks`, `loss_surrogate`), with a
  `LossConfig` mapped from TRL's arguments (`epsilon` / `epsilon_high` -> clip, `delta` -> dual clip,
  `beta` -> k3 KL coefficient, `loss_type` -> aggregation, normalised for gradient accumulation as TRL
  does).

TRL's own GSPO, CISPO, SAPO and 80/20 options are creditrl methods here, refused as TRL options with
the method to use: `importance_sampling_level="sequence"` is `method="gspo"`, `loss_type="cispo"` is
`method="cispo"` with `loss_type="dapo"` (TRL's `epsilon_high` is the weight's cap 1 + ε_high there, so
TRL's 5.0 is `epsilon=1.0, epsilon_high=4.0` here), `loss_type="sapo"` is `method="sapo"` with
`loss_type="grpo"` (temperatures in `method_params`), and `top_entropy_quantile=ρ` is
`method="high_entropy"` with `method_params={"rho": ρ}`; each also composes with any other advantage.

Under accelerate with several processes (DDP, DeepSpeed) each process generates its slice of the
generation batch, and a group may straddle two processes.  The adapter gathers the whole batch
(every process's rows, in process order, as TRL gathers the rewards), computes the advantages
on it on every process, and keeps its own rows; the loss is normalised so that the gradients,
averaged across processes, are those of the whole batch; the loss metrics are reduced across
processes as TRL reduces its own.

Shapes: B completions in the local batch, N = B × processes in the whole one (prompt-major: the
`num_generations` completions of a prompt are contiguous), T padded completion length.
Text-only, no tools.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import torch
from accelerate.utils import gather_object
from pydantic import BaseModel
from torch import Tensor
from trl import GRPOTrainer

from creditrl.collect import aligned_step_labels, response_steps
from creditrl.config import LossConfig
from creditrl.methods import (
    Method,
    compute_advantages,
    get_method,
    loss_hooks,
    loss_surrogate,
    method_params_model,
    on_policy_warning,
)
from creditrl.methods.loss import policy_loss
from creditrl.rollouts import Rollouts, pad_right
from creditrl.steps import split_steps
from creditrl.tasks.base import Problem, Task

# TRL loss_type -> creditrl aggregation.  "dapo" is token-mean over the whole generation batch: the
# loss is rescaled from the local token mean to TRL's global token count (see `_loss_scale`).
AGGREGATION = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
               "dapo": "token-mean"}

# TRL options that are creditrl methods: what to pass instead.
AS_METHODS = {
    "importance_sampling_level='sequence'": "method='gspo' (GSPO's sequence ratio, GSPO-token form) with "
                                            "importance_sampling_level='token'",
    "loss_type='cispo'": "method='cispo' with loss_type='dapo', epsilon=1.0 and epsilon_high=4.0 (the weight's cap "
                         "1 + epsilon_high = TRL's 5.0)",
    "loss_type='sapo'": "method='sapo' with loss_type='grpo' (temperatures: method_params tau_pos, tau_neg)",
    "top_entropy_quantile < 1": "method='high_entropy' (or a method with token_weight='high_entropy') with "
                                "method_params={'rho': top_entropy_quantile}",
}

# Resources no TRL run can hand to an advantage.
UNAVAILABLE = {
    "value_estimator": ("its Monte Carlo values come from K continuations of response prefixes, sampled by "
                        "creditrl's own policy backend (creditrl.value_estimation.MonteCarloValues); TRL's "
                        "generation only samples whole completions of dataset prompts"),
    "hidden_states": ("it reads the policy's hidden states (B, T, D) from the old-log-prob forward; TRL's "
                      "GRPOTrainer computes only log-probs there"),
    "value_model": ("the value model trains alongside the policy (its update after every rollout batch, its "
                    "state in every checkpoint) and TRL's training loop and checkpoints know nothing of it: it "
                    "would never learn, and a resumed run would lose it"),
    "implicit_prm": ("the implicit PRM trains alongside the policy (its update on every rollout batch, its "
                     "state in every checkpoint) and TRL's training loop and checkpoints know nothing of it: it "
                     "would never learn, and a resumed run would lose it"),
}


class CreditGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with a creditrl method's advantages, ratio transform and token weight.

    Args (keyword-only; everything else goes to `GRPOTrainer`):
        method: a registered method name (`creditrl.methods.known_methods()`) or a `Method`.
        method_params: the method's `method_params` (dict or model; None: published defaults).
        resources: what the method's advantage needs, by name (e.g. `{"critic": OracleLabCritic()}`
            for CAPO, `{"prm": ...}` for `prm` / `pure`).
        task, problem_of: a creditrl `Task` and a function from a dataset row to its `Problem`.
            With both, each completion is judged by `task.verify(problem, text)`, which gives
            `rollouts.correct`, `rollouts.step_labels` (B, S) and `rollouts.step_rewards` (B, S), and
            `rollouts.problems`; the steps are cut with `task.step_splitter`.  Without them,
            `correct` is `reward > 0`, there are no step labels, and steps are cut with `step_splitter`.
        step_splitter: a splitter name of `creditrl.steps.SPLITTERS`, used when no task is given.
    """

    def __init__(self, *args: Any, method: str | Method = "fipo",
                 method_params: BaseModel | Mapping[str, Any] | None = None,
                 resources: Mapping[str, object] | None = None, task: Task | None = None,
                 problem_of: Callable[[dict], Problem] | None = None, step_splitter: str = "newline",
                 **kwargs: Any):
        self.method = get_method(method) if isinstance(method, str) else method
        if not isinstance(method_params, BaseModel):
            method_params = method_params_model(self.method)(**(method_params or {}))
        self.method_params = method_params
        self.resources = dict(resources or {})
        _check_method(self.method, self.resources)
        if (task is None) != (problem_of is None):
            raise ValueError("give both task and problem_of (a function from a dataset row to its creditrl Problem), "
                             "or neither")
        if self.method.needs_step_rewards and task is None:
            raise ValueError(f"method {self.method.name!r} needs step rewards: give task and problem_of, with a "
                             "verifier that labels steps (e.g. the lab task)")
        self.task, self.problem_of = task, problem_of
        self.step_splitter = task.step_splitter if task is not None else step_splitter
        split_steps("", self.step_splitter)  # an unknown splitter fails here, not at the first batch
        self.ratio_transform, self.token_weight = loss_hooks(self.method, self.method_params)
        self.surrogate = loss_surrogate(self.method, self.method_params)
        super().__init__(*args, **kwargs)
        self._check_trl_options()
        self.loss_config = LossConfig(eps_low=self.epsilon_low, eps_high=self.epsilon_high, dual_clip=self.args.delta,
                                      agg=AGGREGATION[self.loss_type], norm_length=self.max_completion_length,
                                      kl_coef=self.beta, kl_estimator="k3")
        self._rewards_per_func: Tensor | None = None
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self.method.needs_off_policy and self.args.gradient_accumulation_steps % generate_every == 0:
            # the optimizer never steps between generating a batch and training on it (TRL then keeps no old
            # log-probs): raise num_iterations or steps_per_generation
            warnings.warn(on_policy_warning(self.method, "gradient_accumulation_steps a multiple of "
                                                         "steps_per_generation × num_iterations"),
                          UserWarning, stacklevel=2)

    def _check_trl_options(self) -> None:
        """Refuse the GRPOConfig options whose loss terms `policy_loss` does not compute."""
        args = self.args
        native = {"importance_sampling_level='sequence'": args.importance_sampling_level != "token",
                  "loss_type='cispo'": self.loss_type == "cispo", "loss_type='sapo'": self.loss_type == "sapo",
                  "top_entropy_quantile < 1": args.top_entropy_quantile < 1.0}
        for option, on in native.items():
            if on:
                raise ValueError(f"CreditGRPOTrainer does not take TRL's {option}: it is a creditrl method here; "
                                 f"pass {AS_METHODS[option]}")
        if self.loss_type not in AGGREGATION:
            raise ValueError(f"CreditGRPOTrainer supports loss_type {', '.join(AGGREGATION)} (the clipped surrogate); "
                             f"got {self.loss_type!r}")
        unsupported = {
            "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
            "use_vllm": args.use_vllm,
            "entropy_coef / adaptive entropy": self._entropy_bonus_enabled,
            "use_bias_correction_kl=True with beta != 0 (creditrl's KL term is the plain k3 estimator: set "
            "use_bias_correction_kl=False)": bool(args.use_bias_correction_kl and self.beta != 0.0),
            "a router auxiliary loss (MoE)": self.aux_loss_enabled,
            "tools or environments": bool(self.tools) or self.environment_factories is not None,
            "rollout_func (its env_mask would not reach the loss)": self.rollout_func is not None,
            "vision-language models (the loss's forward would not get the images)": self._is_vlm,
            f"delta < 1 + epsilon_high (TRL's delta then also caps positive-advantage ratios; creditrl's dual clip "
            f"bounds negative-advantage terms only): delta={args.delta}":
                args.delta is not None and args.delta < 1 + self.epsilon_high,
        }
        refused = [name for name, on in unsupported.items() if on]
        if refused:
            raise ValueError(f"CreditGRPOTrainer does not support {', '.join(refused)}")
        if args.scale_rewards != "group" or args.multi_objective_aggregation != "sum_then_normalize":
            warnings.warn("CreditGRPOTrainer ignores scale_rewards and multi_objective_aggregation: the method's "
                          "advantage reads the weighted sum of the rewards and its own method_params decide the "
                          "normalisation (e.g. method='dr_grpo' or method_params={'scale_by_std': False})",
                          UserWarning, stacklevel=3)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list) -> Tensor:
        """TRL's rewards (B, n_reward_funcs), kept for the rollout batch."""
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict[str, Any]:
        """TRL's batch with `advantages` (B, T) from the method, computed on the whole generation batch
        (N rows) and sliced to this process's rows; the logged advantages are the N rows'."""
        batch = super()._generate_and_score_completions(inputs)
        all_inputs, all_batch = self._gather_generation_batch(inputs, batch)
        rollouts = self.build_rollouts(all_inputs, all_batch)
        advantages = compute_advantages(self.method, rollouts, self.method_params, **self.resources)
        unscorable = torch.isnan(self._rewards_per_func).all(dim=1)  # every reward function returned None
        advantages = advantages.masked_fill(unscorable[:, None].to(advantages.device), 0.0)  # as TRL: no signal
        self._log_token_advantages(advantages, rollouts.response_mask)
        first = self.accelerator.process_index * len(inputs)
        batch["advantages"] = advantages[first:first + len(inputs), :batch["completion_ids"].shape[1]]
        return batch

    def _gather_generation_batch(self, inputs: list[dict], batch: Mapping[str, Any]
                                 ) -> tuple[list[dict], dict[str, Tensor]]:
        """The dataset rows and the token tensors of every process, concatenated in process order (the
        order of TRL's gathered rewards): prompts padded on the left to the longest prompt (N, Tp'),
        completions on the right to the longest completion (N, T')."""
        if self.accelerator.num_processes == 1:
            return inputs, dict(batch)
        pad_id = self._tokenizer.pad_token_id
        pads = {"prompt_ids": pad_id, "prompt_mask": 0, "completion_ids": pad_id, "completion_mask": 0}
        gathered = {name: self.accelerator.gather(self.accelerator.pad_across_processes(
            batch[name], dim=1, pad_index=pad, pad_first=name.startswith("prompt"))) for name, pad in pads.items()}
        return gather_object(inputs), gathered

    def build_rollouts(self, inputs: list[dict], batch: Mapping[str, Any]) -> Rollouts:
        """The creditrl batch of the whole generation batch (`_gather_generation_batch`): ids and masks
        (N, Tp) / (N, T), weighted rewards (N,), group ids (N,) from `num_generations`, step ids (N, T) and,
        with a task, verdicts and step labels (N, S)."""
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        mask = batch["completion_mask"].bool()
        rows = len(inputs)
        tokenizer = self._tokenizer
        detokenizer = SimpleNamespace(tokenizer=tokenizer, eos_ids=self.eos_token_ids,
                                      decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        ids = [batch["completion_ids"][b][mask[b]].tolist() for b in range(rows)]
        texts, step_rows = zip(*(response_steps(detokenizer, row, self.step_splitter) for row in ids))
        rewards = (self._rewards_per_func * self.reward_weights.to(self._rewards_per_func.device)).nansum(dim=1)
        device = mask.device
        step_ids = pad_right([torch.tensor(s, dtype=torch.long) for s in step_rows], -1, width=mask.shape[1])
        # a completion no reward function scored is a group of its own, out of its siblings' statistics (as TRL's
        # NaN-aware baseline leaves it out); its advantage is set to 0 afterwards
        unscorable = torch.isnan(self._rewards_per_func).all(dim=1).to(device)
        row = torch.arange(rows, device=device)
        rollouts = Rollouts(
            prompt_ids=batch["prompt_ids"], prompt_mask=batch["prompt_mask"].bool(),
            response_ids=batch["completion_ids"], response_mask=mask,
            group_ids=torch.where(unscorable, rows + row, row // group_size),
            step_ids=step_ids.to(device),
            rewards=rewards.to(device), correct=rewards.to(device) > 0,
            truncated=torch.tensor([not row or row[-1] not in self.eos_token_ids for row in ids], device=device),
            response_texts=list(texts), problem_index=(torch.arange(rows) // group_size).tolist(),
        )
        if self.task is not None:
            rollouts = self._with_verdicts(rollouts, [self.problem_of(x) for x in inputs], step_rows)
        return rollouts

    def _with_verdicts(self, rollouts: Rollouts, problems: list[Problem], step_rows: tuple[list[int], ...]) -> Rollouts:
        """`correct` (B,), `step_labels` (B, S), `step_rewards` (B, S) and `problems` from the task's verifier."""
        verdicts = [self.task.verify(p, text) for p, text in zip(problems, rollouts.response_texts)]
        device = rollouts.rewards.device
        correct = torch.tensor([v.correct for v in verdicts], device=device)
        rollouts = replace(rollouts, problems=problems, correct=correct)
        if any(v.step_correct is None for v in verdicts):
            return rollouts
        n_steps = [max(s) + 1 if s else 0 for s in step_rows]
        labels = pad_right([aligned_step_labels(v.step_correct, n) for v, n in zip(verdicts, n_steps)], -1,
                           width=max(max(n_steps, default=0), 1)).to(device)
        return replace(rollouts, step_labels=labels, step_rewards=torch.where(labels >= 0, labels.float(), torch.nan))

    def _log_token_advantages(self, advantages: Tensor, mask: Tensor) -> None:
        """Replace TRL's logged sequence advantages of this batch by the per-token ones actually used:
        the `advantage` column gets each completion's mean over its tokens, the `token_advantages`
        column every token's advantage."""
        logged = self._logs["advantages"]
        for _ in range(min(advantages.shape[0], len(logged))):  # an eval batch can outgrow the deque's maxlen
            logged.pop()
        lengths = mask.sum(dim=1)
        logged.extend((advantages.sum(dim=1) / lengths.clamp(min=1)).tolist())
        self._logs["extra"]["token_advantages"].extend(
            [row[:n].tolist() for row, n in zip(advantages, lengths.tolist())])

    def _compute_loss(self, model, inputs: dict[str, Any]) -> Tensor:
        """creditrl's `policy_loss` on the per-token advantages, with the method's hooks."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        mask = inputs["completion_mask"].bool()
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1), completion_ids.shape[1],
            compute_entropy=True)
        old_logps = inputs.get("old_per_token_logps")
        kept = {"mask": mask}  # the tokens the surrogate sums over: fewer when the token weight drops some (FIPO)

        def weight_keeping_track(advantages: Tensor, delta: Tensor, weight_mask: Tensor, *entropy: Tensor):
            out = self.token_weight(advantages, delta, weight_mask, *entropy)
            if isinstance(out, tuple):
                kept["mask"] = weight_mask & out[1]
            return out

        weight_keeping_track.needs_entropy = getattr(self.token_weight, "needs_entropy", False)

        loss, metrics = policy_loss(
            logps, logps.detach() if old_logps is None else old_logps, inputs["advantages"], mask, self.loss_config,
            ref_logprobs=inputs.get("ref_per_token_logps"), entropy=entropies, ratio_transform=self.ratio_transform,
            token_weight=None if self.token_weight is None else weight_keeping_track, surrogate=self.surrogate)
        mode = "train" if self.model.training else "eval"
        self._log_loss_metrics(mode, metrics, mask, kept["mask"])
        return loss * self._loss_scale(inputs, kept["mask"], mode)

    def _loss_scale(self, inputs: dict[str, Any], mask: Tensor, mode: str) -> Tensor | float:
        """TRL's normalisation: divide by the accumulation steps, or ("dapo") count tokens over the
        whole generation batch instead of the local one; "grpo" averages over every row, an empty one
        (a truncated completion under `mask_truncated_completions`) included, where creditrl's
        seq-mean-token-mean averages over the rows that have tokens.  `mask`: the tokens the surrogate
        summed over (without the ones a token weight dropped, which TRL's global counts keep)."""
        if self.loss_type == "grpo":
            rows_with_tokens = mask.any(dim=1).sum() / mask.shape[0]
            return rows_with_tokens / (self.current_gradient_accumulation_steps if mode == "train" else 1)
        if self.loss_type == "dapo":  # per process: DDP then averages the gradients over the processes
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return mask.sum().clamp(min=1) / normalizer
        return 1.0 / self.current_gradient_accumulation_steps if mode == "train" else 1.0

    def _log_loss_metrics(self, mode: str, metrics: Mapping[str, Tensor], mask: Tensor, kept: Tensor) -> None:
        """Log the loss metrics of the batch across processes, under TRL's names where they mean the same
        (`entropy`, `kl`, `clip_ratio/region_mean`), else `creditrl/*`.  Each process's value is weighted by
        what it averages over: its response tokens `mask` (B, T) for the token means, and for `pg_loss` its
        aggregation's denominator over the surrogate's tokens `kept` (B, T); the weighted sums are summed
        over the processes, so the value is the one of all processes' rows in one batch."""
        names = {"entropy": "entropy", "kl": "kl", "clip_frac": "clip_ratio/region_mean"}
        keys = sorted(metrics)
        weights = {key: mask.sum() for key in keys} | {"pg_loss": aggregation_size(kept, self.loss_config.agg)}
        local = torch.stack([torch.stack([metrics[key].float() * weights[key], weights[key].float()])
                             for key in keys])
        totals = self.accelerator.reduce(local, reduction="sum").tolist()
        for key, (total, count) in zip(keys, totals):
            self._metrics[mode][names.get(key, f"creditrl/{key}")].append(total / max(count, 1.0))


def aggregation_size(mask: Tensor, agg: str) -> Tensor:
    """What `creditrl.methods.loss.aggregate` divides the summed losses by, short of constants: the tokens
    of `mask` (B, T) for token-mean, its rows with a token for seq-mean-token-mean, every row for
    seq-mean-token-sum-norm."""
    if agg == "token-mean":
        return mask.sum()
    if agg == "seq-mean-token-mean":
        return mask.any(dim=1).sum()
    return torch.tensor(mask.shape[0], device=mask.device)


def _check_method(method: Method, resources: Mapping[str, object]) -> None:
    """Raise for a method TRL cannot feed: hidden states, value estimates, or a missing resource."""
    for name in method.needs:
        if name in UNAVAILABLE:
            raise ValueError(f"method {method.name!r} needs a {name}: {UNAVAILABLE[name]}, so it cannot run "
                             "through TRL")
        if resources.get(name) is None:
            raise ValueError(f"method {method.name!r} needs resources={{{name!r}: ...}} (see creditrl.resources)")
