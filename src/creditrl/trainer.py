"""The training loop: sample → reward → advantage → clipped-surrogate updates, resumable.

    for step in 1..steps:
        rollouts   = collect(P prompts × G samples)            # + more rounds under dynamic sampling
        A          = method.advantage(rollouts, **resources)     # (B, T), the one place advantages are made
        old logp   = OldLogprobs: REUSE (1 epoch × 1 minibatch), SAMPLED (the sampler's), or RECOMPUTE
        resource.update(rollouts) for trained resources        # a value model; the policy waits while one warms up
        for epoch in ppo_epochs, minibatch in n_minibatches:
            loss   = policy_loss(logp, old logp, A, hooks)      # the method's ratio transform, weight, surrogate
            AdamW step (clipped gradients), lr schedule
        log metrics; checkpoint every N steps; evaluate every M steps

All randomness is derived from (seed, step), and the data position is saved with each
checkpoint, so `resume=True` after a kill reproduces an uninterrupted run's weights on CPU.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import resource
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors import SafetensorError

from creditrl.checkpoint import (
    latest_checkpoint,
    load_master_weights,
    load_optimizer_state,
    load_resource_states,
    load_trainer_state,
    save_checkpoint,
)
from creditrl.collect import collect_rollouts
from creditrl.config import RunConfig, TrainConfig, save_config
from creditrl.configure import check_config
from creditrl.evaluate import evaluate, evaluation_seed, evaluation_steps, progress_task
from creditrl.jsonl import read_jsonl, truncate_jsonl
from creditrl.master_weights import MasterWeights, apply_gradients
from creditrl.methods import compute_advantages, loss_hooks, loss_surrogate, resolve_method
from creditrl.methods.groups import group_spread
from creditrl.methods.loss import masked_mean, policy_loss
from creditrl.microbatch import MinibatchTotals, combine_metrics, micro_batches, pack_rows
from creditrl.policy.loading import load_configured_policy
from creditrl.policy.lora import apply_lora, is_lora, load_adapter_state, merged
from creditrl.policy.transformers_backend import evaluation_mode
from creditrl.resources import TrainedResource, build_resources
from creditrl.rollouts import Rollouts, concat, pad_cols, trimmed
from creditrl.sinks import Sink, build_sinks
from creditrl.tasks import build_task


class OldLogprobs(Enum):
    """Where the update's π_old log-probs come from."""

    REUSE = "reuse"  # one epoch of one minibatch: π_old = π_θ at the update, whose own log-probs (detached) serve
    SAMPLED = "sampled"  # the sampler's per-token log-probs (the kv-cache engine gives them)
    RECOMPUTE = "recompute"  # a no-grad forward before the update


def old_logprob_source(train: TrainConfig, sampled: bool) -> OldLogprobs:
    """REUSE when the update is on-policy; else the sampler's log-probs when it gave them and
    `train.recompute_old_logprobs` is off; else RECOMPUTE."""
    if train.ppo_epochs == 1 and train.n_minibatches == 1:
        return OldLogprobs.REUSE
    if sampled and not train.recompute_old_logprobs:
        return OldLogprobs.SAMPLED
    return OldLogprobs.RECOMPUTE


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite updates in a row); the message says why."""


@dataclass
class StepOutcome:
    metrics: dict[str, float]
    bad: str | None = None  # why the update was skipped, if it was


class Trainer:
    def __init__(self, cfg: RunConfig, console: Console | None = None, show_progress: bool = True,
                 on_step: Callable[[int], None] | None = None):
        self.cfg = cfg
        self.console = console or Console()
        self.show_progress = show_progress
        self.on_step = on_step  # called with the step number after each step is logged (e.g. an outer progress bar)
        self.run_dir = cfg.run_dir()
        check_config(cfg)  # a config built in Python gets the checks load_config makes
        self.method = resolve_method(cfg.method)
        self.task = build_task(cfg.task)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.policy = load_configured_policy(cfg.model)
        self.reference = None
        if cfg.loss.kl_coef > 0:
            self.reference = copy.deepcopy(self.policy.model).eval().requires_grad_(False)
        if cfg.model.lora is not None:
            with torch.random.fork_rng():  # the adapters' initial values follow train.seed, not the process's history
                torch.manual_seed(self._seed(zlib.crc32(b"lora")))
                self.policy.model = apply_lora(self.policy.model, cfg.model.lora)
        if cfg.train.gradient_checkpointing:
            self.policy.enable_activation_checkpointing()
        self.ratio_transform, self.token_weight = loss_hooks(self.method, cfg.method_params)
        self.surrogate = loss_surrogate(self.method, cfg.method_params)
        for warning in self.method.warnings(cfg):
            self.console.print(f"[yellow]warning: {warning}[/yellow]")
        # Resources an advantage may need from the trainer, built only when it needs them; each has
        # reset(seed), called every step, and metrics(), its cost counters for the step's log.
        self.resources = build_resources([self.method], cfg, self.policy, self.task)
        # those with parameters of their own (a value model): updated every batch, saved with every checkpoint
        self.trained = {n: r for n, r in self.resources.items() if isinstance(r, TrainedResource)}
        self.train_problems = self.task.train_problems()
        self.eval_problems = self.task.eval_problems()
        self.position = 0  # problems consumed so far from the seeded stream
        self.step = 0
        self.bad_in_a_row = 0
        self.skipped_updates = 0
        self.sinks: list[Sink] = []
        self.started = time.time()  # when this process's segment of the run began training
        self.earlier_seconds = 0.0  # wall time of the segments before a resume, up to its checkpoint
        self._build_optimizer()

    # ---- set-up -------------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        t = self.cfg.train
        # the trainable parameters (the adapters, under LoRA), as float32 masters when the model is bf16
        self.masters = MasterWeights(self.policy.model)
        # the fused kernel: one pass over all parameters (4-5× faster than the per-tensor loop on a CPU)
        self.optimizer = torch.optim.AdamW(self.masters.parameters(), lr=t.lr, betas=t.betas,
                                           weight_decay=t.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _resume(self) -> bool:
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            return False
        check_same_run(self.run_dir / "config.yaml", self.cfg)
        if is_lora(self.policy.model):
            load_adapter_state(self.policy.model, ckpt)
        else:
            self._load_weights(ckpt)
        self.masters.load_state_dict(load_master_weights(ckpt), source=str(ckpt))
        load_optimizer_state(ckpt, self.optimizer, self.scheduler)
        try:
            for name, state in load_resource_states(ckpt, list(self.trained)).items():
                self.trained[name].load_state_dict(state)
        except ValueError as err:
            raise TrainingStopped(str(err)) from None
        trainer_state = load_trainer_state(ckpt)
        self.step, self.position = trainer_state["step"], trainer_state["position"]
        self.skipped_updates = trainer_state.get("skipped_updates", 0)
        self.bad_in_a_row = trainer_state.get("bad_in_a_row", 0)
        self.earlier_seconds = trainer_state.get("wall_seconds", 0.0)
        truncate_jsonl(self.run_dir / "metrics.jsonl", self.step)
        truncate_jsonl(self.run_dir / "eval.jsonl", self.step)
        self.console.print(f"resumed from {ckpt} (step {self.step})")
        return True

    def _load_weights(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(ckpt / "model.safetensors")
        missing, unexpected = self.policy.model.load_state_dict(state, strict=False)
        tied = set(getattr(self.policy.model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
        if unexpected or set(missing) - tied:
            raise TrainingStopped(f"{ckpt}: checkpoint does not match the model "
                                  f"(missing {missing}, unexpected {unexpected})")
        self.policy.model.tie_weights()

    # ---- data ---------------------------------------------------------------------------------
    def _take(self, n: int):
        """The next n problems of a stream that reshuffles the training set every epoch."""
        out, size = [], len(self.train_problems)
        for _ in range(n):
            epoch, index = divmod(self.position, size)
            out.append(self.train_problems[_epoch_order(size, self.cfg.train.seed, epoch)[index]])
            self.position += 1
        return out

    def _seed(self, *parts: int) -> int:
        return hash((self.cfg.train.seed, *parts)) % (2**31)

    def collect(self) -> tuple[Rollouts, dict[str, float]]:
        """One rollout batch; under dynamic sampling, groups whose rewards all agree are replaced."""
        r, p = self.cfg.rollout, self.cfg.rollout.prompts_per_step
        kept: list[Rollouts] = []
        n_groups, rounds, sampled = 0, 0, 0
        while True:
            batch = collect_rollouts(self.policy, self.task, self._take(p), r.group_size, self.cfg.sampling,
                                     self.cfg.reward, seed=self._seed(self.step, rounds), first_group_id=rounds * p)
            rounds += 1
            sampled += batch.batch_size
            if not r.dynamic_sampling:
                return batch, {"gen_rounds": 1.0}
            informative = _groups_with_spread(batch)
            batch = batch.select(torch.isin(batch.group_ids, informative).nonzero().squeeze(1))
            kept.append(batch)
            n_groups += len(informative)
            if n_groups >= p or rounds >= r.max_num_gen_batches:
                break
        merged = concat(kept)
        first = torch.unique(merged.group_ids)[:p] if n_groups else merged.group_ids[:0]
        merged = merged.select(torch.isin(merged.group_ids, first).nonzero().squeeze(1))
        return merged, {"gen_rounds": float(rounds), "sampled_responses": float(sampled),
                        "kept_groups": float(len(first))}

    # ---- one step -----------------------------------------------------------------------------
    def train_step(self) -> StepOutcome:
        """One step: sample, score, advantages, update.  The lr schedule moves on whether or not the step
        updated (a skipped step still counts in `train.steps`); the logged lr is the one this step used."""
        lr = self.scheduler.get_last_lr()[0]
        outcome = self._sample_and_update()
        self.scheduler.step()
        outcome.metrics["lr"] = lr
        return outcome

    def _sample_and_update(self) -> StepOutcome:
        t0, cpu0 = time.perf_counter(), time.process_time()  # process CPU time: every thread, no waiting for a core
        rollouts, extra = self.collect()
        t_sample = time.perf_counter() - t0
        metrics = {**extra, **_rollout_metrics(rollouts)}
        if rollouts.batch_size == 0:
            return StepOutcome(metrics, bad="no rollout group had reward spread")
        for name, resource_ in self.resources.items():
            resource_.reset(seed=self._seed(self.step, zlib.crc32(name.encode())))
        t1 = time.perf_counter()
        advantages = compute_advantages(self.method, rollouts, self.cfg.method_params, **self.resources)
        t_adv = time.perf_counter() - t1
        t2 = time.perf_counter()
        source = old_logprob_source(self.cfg.train, sampled=rollouts.old_logprobs is not None)
        scored = self._score_old(rollouts, source)
        t_score = time.perf_counter() - t2
        # sequences through a no-grad forward besides sampling and the update: old log-probs (or the hidden
        # states' forward that gave them), the KL reference
        metrics["scoring_forwards"] = float(scored)
        for resource_ in self.resources.values():
            metrics.update(resource_.metrics())
        mask = rollouts.response_mask
        metrics.update(adv_mean=masked_mean(advantages, mask).item(),
                       adv_abs_mean=masked_mean(advantages.abs(), mask).item(),
                       adv_max=advantages[mask].max().item() if mask.any() else 0.0,
                       adv_min=advantages[mask].min().item() if mask.any() else 0.0)
        if not torch.isfinite(advantages[mask]).all():
            return StepOutcome(metrics, bad="non-finite advantages")
        t3 = time.perf_counter()
        policy_waits = any(r.warming_up for r in self.trained.values())
        for resource_ in self.trained.values():
            metrics.update(resource_.update(rollouts))
        if policy_waits:
            metrics["updates"] = 0.0
        bad = None if policy_waits else self._update(rollouts, advantages, metrics, source)
        t_update = time.perf_counter() - t3
        elapsed = time.perf_counter() - t0
        metrics.update(time_sample=t_sample, time_score=t_score, time_advantage=t_adv, time_update=t_update,
                       time_step=elapsed, tokens_per_s=mask.sum().item() / elapsed,
                       cpu_step=time.process_time() - cpu0, load_avg=os.getloadavg()[0],
                       # the process's peak so far (Linux reports KiB)
                       peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return StepOutcome(metrics, bad)

    @torch.no_grad()
    def _score_old(self, rollouts: Rollouts, source: OldLogprobs) -> int:
        """Fill `rollouts.old_logprobs` when `source` is RECOMPUTE, and `ref_logprobs` under a KL penalty, from
        no-grad forwards of `train.logprob_batch_size` rows; the old log-probs come from the hidden states'
        forward when an advantage already ran it on this batch.  Returns the sequences put through a forward
        (the hidden states' included)."""
        hidden = self.resources.get("hidden_states")
        scored = hidden.forwards if hidden is not None else 0
        if source is OldLogprobs.RECOMPUTE and hidden is not None and hidden.logprobs is not None:
            rollouts.old_logprobs = hidden.logprobs
        elif source is OldLogprobs.RECOMPUTE:
            rollouts.old_logprobs = self._logprobs(self.policy, rollouts)
            scored += rollouts.batch_size
        if self.reference is not None:
            ref_policy = copy.copy(self.policy)  # the policy's scoring settings over the frozen reference model
            ref_policy.model = self.reference
            rollouts.ref_logprobs = self._logprobs(ref_policy, rollouts)
            scored += rollouts.batch_size
        return scored

    def _logprobs(self, policy, rollouts: Rollouts) -> torch.Tensor:
        """(B, T) log-probs of the responses under `policy`, in chunks of rows (`train.logprob_batch_size`
        rows, or micro-batches under `train.max_tokens_per_microbatch`), as the sampler samples (eval mode: no
        dropout; the sampling temperature)."""
        width, t = rollouts.response_ids.shape[1], self.cfg.train
        if t.max_tokens_per_microbatch is None:
            chunks = list(torch.arange(rollouts.batch_size).split(t.logprob_batch_size))
        else:
            chunks = pack_rows(rollouts.prompt_mask.sum(1), rollouts.response_mask.sum(1), t.max_tokens_per_microbatch)
        parts = []
        with evaluation_mode(self.policy.model):
            for rows in chunks:
                sub = trimmed(rollouts.select(rows)).to(self.policy.device)
                scores = policy.score(sub.prompt_ids, sub.prompt_mask, sub.response_ids, sub.response_mask,
                                      self.cfg.sampling.temperature, buckets=t.length_buckets)
                parts.append(pad_cols(scores.logprobs.cpu(), width))
        return torch.cat(parts)[torch.argsort(torch.cat(chunks))]  # back in the batch's row order

    def _update(self, rollouts: Rollouts, advantages: torch.Tensor, metrics: dict, source: OldLogprobs
                ) -> str | None:
        t = self.cfg.train
        generator = torch.Generator().manual_seed(self._seed(self.step, 99991))
        sums: dict[str, float] = {}
        n_updates = 0
        bad = None
        self.policy.model.train()
        # the logged entropy comes from the sampler when it gave one; an entropy bonus needs its gradient, and a
        # token weight reading the entropy needs the current policy's
        bonus = self.cfg.loss.entropy_coef > 0
        with_entropy = bonus or self.method.needs_entropy
        for _ in range(t.ppo_epochs):
            order = torch.randperm(rollouts.batch_size, generator=generator)
            for rows in order.tensor_split(min(t.n_minibatches, rollouts.batch_size)):  # sizes differ by ≤ 1
                # one forward and backward per micro-batch, their gradients summed, one step per minibatch
                budget = t.max_tokens_per_microbatch
                totals = None if budget is None else MinibatchTotals.of(rollouts.response_mask[rows])
                self.optimizer.zero_grad(set_to_none=True)
                parts, finite = [], True
                for micro in micro_batches(rollouts, rows, budget):
                    sub = trimmed(rollouts.select(micro)).to(self.policy.device)
                    adv = advantages[micro][:, : sub.response_ids.shape[1]].to(self.policy.device)
                    scores = self.policy.score(sub.prompt_ids, sub.prompt_mask, sub.response_ids, sub.response_mask,
                                               self.cfg.sampling.temperature,
                                               with_entropy=with_entropy or sub.old_entropy is None, entropy_grad=bonus,
                                               buckets=t.length_buckets)
                    old = scores.logprobs.detach() if source is OldLogprobs.REUSE else sub.old_logprobs
                    loss, m = policy_loss(scores.logprobs, old, adv, sub.response_mask, self.cfg.loss,
                                          ref_logprobs=sub.ref_logprobs,
                                          entropy=scores.entropy if scores.entropy is not None else sub.old_entropy,
                                          ratio_transform=self.ratio_transform, token_weight=self.token_weight,
                                          surrogate=self.surrogate, totals=totals)
                    finite = bool(torch.isfinite(loss))
                    if not finite:
                        break
                    loss.backward()
                    self.masters.take_gradients(add=True)
                    parts.append(({**m, "loss": loss.detach()}, int(rollouts.response_mask[micro].sum())))
                if not finite:
                    self.optimizer.zero_grad(set_to_none=True)
                    bad = "non-finite loss"
                    continue
                norm = apply_gradients(self.optimizer, self.masters, t.grad_clip)
                if not torch.isfinite(norm):
                    bad = "non-finite gradient norm"
                    continue
                n_updates += 1
                self.policy.updates += 1
                minibatch = combine_metrics(parts, summed=("pg_loss", "loss"))
                for key, value in {**minibatch, "grad_norm": norm}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        metrics.update({k: v / max(n_updates, 1) for k, v in sums.items()})
        metrics["updates"] = float(n_updates)
        return bad if n_updates == 0 else None

    # ---- the run ------------------------------------------------------------------------------
    def evaluate(self, progress: Progress | None = None) -> dict[str, float]:
        """The held-out evaluation, shown as a task on `progress` (the training bar's display) or on a display
        of its own."""
        e = self.cfg.eval
        display = progress or self._progress()
        with display if progress is None else nullcontext(), \
                progress_task(display, "evaluating", evaluation_steps(self.eval_problems, e.greedy)) as advance:
            return evaluate(self.policy, self.task, self.eval_problems, e.k, self.cfg.sampling,
                            seed=evaluation_seed(self.cfg.train.seed), greedy=e.greedy, behaviour=e.behaviour,
                            verify_phrases=e.verify_phrases, progress=advance)

    def train(self, resume: bool = False, overwrite: bool = False) -> dict:
        """Run to `train.steps`.  `resume`: continue from the run folder's last complete checkpoint;
        `overwrite`: start afresh in a folder that holds an earlier run (otherwise that is an error)."""
        try:
            return self._train(resume, overwrite)
        finally:
            for sink in self.sinks:
                sink.close()
            self.sinks = []

    def _train(self, resume: bool, overwrite: bool) -> dict:
        cfg = self.cfg
        _check_writable(self.run_dir)
        resumed = resume and self._resume()
        if resume and not resumed:
            # killed before its first checkpoint: nothing was saved, so the run starts over
            self.console.print(f"no complete checkpoint in {self.run_dir / 'checkpoints'}: starting from step 0")
        if not resumed:
            self._clear_earlier_run(overwrite or (resume and _same_or_no_config(self.run_dir / "config.yaml", cfg)))
        save_config(cfg, self.run_dir / "config.yaml")
        self.started = time.time()
        self.sinks = build_sinks(["jsonl", *cfg.output.report_to], self.run_dir, self.run_dir.name,
                                 cfg.model_dump(mode="json"), first_step=self.step + 1)
        evals = read_jsonl(self.run_dir / "eval.jsonl")
        if cfg.eval.before and not evals and self.step == 0:
            self.console.print("evaluating the starting policy ...")
            evals.append(self._log_eval(0))
        with self._progress() as progress:
            bar = progress.add_task("training", total=cfg.train.steps, completed=self.step, stats="")
            while self.step < cfg.train.steps:
                outcome = self.train_step()
                self.step += 1
                self._count_bad(outcome)
                self._to_sinks("train", outcome.metrics, self.step)
                self._stop_if_too_many_bad(outcome)
                progress.update(bar, completed=self.step, stats=_bar_stats(outcome.metrics, evals))
                if self.on_step is not None:
                    self.on_step(self.step)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                    evals.append(self._log_eval(self.step, progress))
                if self.step % cfg.output.checkpoint_every == 0 or self.step == cfg.train.steps:
                    self._checkpoint()
        if not evals or evals[-1]["step"] != self.step:
            self.console.print("evaluating the trained policy ...")
            evals.append(self._log_eval(self.step))
        final_dir = self.run_dir / "final"
        if is_lora(self.policy.model):  # a plain model folder: the adapters folded into the weights
            self.policy.model = merged(self.policy.model)
        try:
            self.policy.model.save_pretrained(final_dir, safe_serialization=True)
            self.policy.tokenizer.save_pretrained(final_dir)
        except (OSError, SafetensorError) as err:
            raise TrainingStopped(f"cannot write the final model to {final_dir} ({err}); the last checkpoint is "
                                  f"{latest_checkpoint(self.run_dir / 'checkpoints')}: free the space and run again "
                                  "with --resume") from None
        segment = time.time() - self.started
        summary = {"method": cfg.method_name, "steps": self.step, "wall_seconds": round(segment, 1),
                   # the segments before a resume, up to the checkpoint it resumed from, and this one
                   "total_wall_seconds": round(self.earlier_seconds + segment, 1),
                   "eval_seed": evaluation_seed(cfg.train.seed),
                   "before": evals[0] if evals[0]["step"] == 0 else None,  # None with eval.before=false
                   "after": evals[-1], "skipped_updates": self.skipped_updates,
                   "run_dir": str(self.run_dir), "final_model": str(final_dir)}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _clear_earlier_run(self, overwrite: bool) -> None:
        earlier = [self.run_dir / n for n in ("checkpoints", "final", "metrics.jsonl", "eval.jsonl", "summary.json",
                                              "tensorboard") if (self.run_dir / n).exists()]
        if earlier and not overwrite:
            raise TrainingStopped(f"{self.run_dir} holds an earlier run ({', '.join(p.name for p in earlier)}): "
                                  "continue it with --resume, start afresh with --overwrite, or set output.dir")
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _count_bad(self, outcome: StepOutcome) -> None:
        outcome.metrics["skipped"] = float(outcome.bad is not None)
        if outcome.bad is None:
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        self.skipped_updates += 1
        self.console.print(f"[yellow]step {self.step}: update skipped ({outcome.bad})[/yellow]")

    def _stop_if_too_many_bad(self, outcome: StepOutcome) -> None:
        if outcome.bad is not None and self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingStopped(f"stopping at step {self.step}: {self.bad_in_a_row} skipped updates in a row, "
                                  f"the last because of {outcome.bad} (limit train.max_bad_steps="
                                  f"{self.cfg.train.max_bad_steps}); the last good checkpoint is in "
                                  f"{self.run_dir / 'checkpoints'}")

    def _log_eval(self, step: int, progress: Progress | None = None) -> dict:
        metrics = self.evaluate(progress)
        record = {"step": step, **metrics}
        self._to_sinks("eval", metrics, step)
        return record

    def _to_sinks(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(prefix, metrics, step)

    def _checkpoint(self) -> None:
        """Save the step's checkpoint; a write that fails (a full disk) stops the run, the last complete one intact."""
        folder = self.run_dir / "checkpoints"
        try:
            save_checkpoint(folder, self.step, self.policy.model, self.policy.tokenizer, self.optimizer, self.scheduler,
                            {"position": self.position, "skipped_updates": self.skipped_updates,
                             "bad_in_a_row": self.bad_in_a_row,
                             "wall_seconds": self.earlier_seconds + time.time() - self.started},
                            keep=self.cfg.output.keep_checkpoints, master_weights=self.masters.state_dict(),
                            resource_states={name: r.state_dict() for name, r in self.trained.items()})
        except (OSError, SafetensorError) as err:  # safetensors reports its own failed writes as SafetensorError
            shutil.rmtree(folder / f"step-{self.step:06d}.tmp", ignore_errors=True)
            last = latest_checkpoint(folder)
            why = f"{err.filename or folder}: {err.strerror or err}" if isinstance(err, OSError) else f"{folder}: {err}"
            raise TrainingStopped(f"stopping at step {self.step}: cannot write its checkpoint "
                                  f"({why}); the last complete checkpoint is "
                                  f"{last if last else 'none'}; free the space and continue with --resume") from None

    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                        console=self.console, disable=not self.show_progress)


# Settings a resumed run may change: how long it runs, how it is evaluated, where it writes, how it reaches a critic.
RESUMABLE_CHANGES = ("train.steps", "train.threads", "eval.", "output.", "critic.timeout_s", "critic.max_retries",
                     "critic.concurrency", "critic.cache_path")


def check_same_run(saved: Path, cfg: RunConfig) -> None:
    """A resumed run must be the run that was checkpointed (it may only run longer or log differently)."""
    if not saved.exists():
        return
    before, now = _flatten(yaml.safe_load(saved.read_text())), _flatten(cfg.model_dump(mode="json"))
    # a setting added to creditrl after the run was saved is unchanged while it holds its default (the task's
    # and the method's sections depend on which task and method, so they are compared as saved)
    saved_sections = {k[:i] for k in before for i, c in enumerate(k) if c == "."}  # an empty default dict is one
    before = {**{k: v for k, v in _defaults().items() if k not in before and k not in saved_sections
                 and not k.startswith(("task.", "method_params", "method."))}, **before}
    changed = sorted(k for k in before.keys() | now.keys()
                     if not _same_value(before.get(k), now.get(k)) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        raise TrainingStopped(f"cannot resume: the configuration differs from {saved} in "
                              + ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed))


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    """Every setting's default, flattened to dotted keys."""
    return _flatten(RunConfig().model_dump(mode="json"))


def _same_value(a: Any, b: Any) -> bool:
    """Equal config values, a NaN (a deliberate `.nan` setting) equal to itself."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _same_or_no_config(saved: Path, cfg: RunConfig) -> bool:
    try:
        check_same_run(saved, cfg)
    except TrainingStopped:
        return False
    return True


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The seeded order of one epoch over the training set (kept: a step takes many problems from it)."""
    order = list(range(size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def _groups_with_spread(rollouts: Rollouts) -> torch.Tensor:
    """Group ids whose rewards are not all equal; a NaN reward counts as spread, so that it reaches the advantages
    and stops the step instead of vanishing with its group under dynamic sampling."""
    ids, index = torch.unique(rollouts.group_ids, return_inverse=True)
    return ids[group_spread(rollouts.rewards, index, len(ids))]


def _rollout_metrics(r: Rollouts) -> dict[str, float]:
    if r.batch_size == 0:
        return {"responses": 0.0}
    spread = _groups_with_spread(r)
    failures = {f"failure/{reason}": count / r.batch_size
                for reason, count in Counter(f for f in r.failures or () if f is not None).items()}
    return {**failures, "responses": float(r.batch_size), "reward": r.rewards.mean().item(),
            "accuracy": r.correct.float().mean().item(),
            "response_length": r.response_lengths.float().mean().item(), "truncated": r.truncated.float().mean().item(),
            "zero_spread_groups": 1.0 - len(spread) / len(torch.unique(r.group_ids))}


def _bar_stats(m: dict[str, float], evals: list[dict]) -> str:
    parts = []
    if "reward" in m:
        parts.append(f"reward {m['reward']:.2f}  acc {m['accuracy']:.2f}  len {m['response_length']:.0f}")
    if evals:
        parts.append(f"eval at step {evals[-1]['step']}: avg@k {evals[-1].get('avg@k', float('nan')):.3f}")
    return "  ".join(parts)


def _check_writable(folder: Path) -> None:
    """Make the run folder, and prove a file can be written there, before any training."""
    probe = folder / ".write-test"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise TrainingStopped(f"cannot write to the run folder {folder}: {err.strerror}") from None
