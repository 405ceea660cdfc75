"""The resource `implicit_prm`: PRIME's implicit process reward model (Cui et al. 2025, arXiv 2502.01456).

A copy π_φ of the policy, trained online from outcome labels only, against a frozen copy π_ref
of the starting policy.  Its process reward for response token t is

    r_t = β · (log π_φ(o_t | o_<t) − log π_ref(o_t | o_<t))

and it is trained by cross-entropy on the whole response: BCE(σ(β · Σ_t q_t), correct), with
q_t = log π_φ/π_ref (loss type `ce` of the PRIME recipe for verl).  One pass over the batch in
`train.n_minibatches` minibatches, in row order, one AdamW step each.  With
`implicit_prm.update=before` (the recipe's default) the advantage trains the PRM on the batch and
then scores the batch with it (`process_rewards`); with `after` it scores first and the trainer's
`update` trains it.  π_ref's log-probs are computed once per batch.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from creditrl.config import ImplicitPRMConfig, TrainConfig
from creditrl.policy.transformers_backend import TransformersPolicy, evaluation_mode
from creditrl.rollouts import Rollouts, pad_cols, trimmed


def implicit_prm_loss(q: Tensor, correct: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Mean over rows of BCE(σ(β · Σ_t q_t m_t), correct): q (B, T), correct (B,) in [0, 1], mask (B, T)."""
    scores = torch.sigmoid(beta * (q * mask).sum(1))
    return torch.nn.functional.binary_cross_entropy(scores, correct.to(scores.dtype))


class ImplicitPRM:
    """β · log π_φ/π_ref per response token, and π_φ's training (see the module docstring)."""

    def __init__(self, policy: TransformersPolicy, cfg: ImplicitPRMConfig, train: TrainConfig):
        self.cfg, self.n_minibatches, self.batch_size = cfg, train.n_minibatches, train.logprob_batch_size
        self.buckets = train.length_buckets
        # float32 copies even of a bf16 policy (an AdamW step of lr 1e-6 would round away in bf16)
        self.scorer = copy.copy(policy)  # the policy's scoring settings over π_φ
        self.scorer.model = copy.deepcopy(policy.model).float().requires_grad_(True)
        self.reference = copy.copy(policy)  # and over π_ref, frozen
        self.reference.model = copy.deepcopy(policy.model).float().eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.scorer.model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay, fused=True)
        self.updates = 0
        self.warming_up = False  # the policy never waits for it
        self.reset(seed=0)

    def reset(self, seed: int) -> None:
        """Forget the last batch (its reference log-probs, whether it trained on it); zero the forward counts."""
        self.forwards = 0
        self._batch: Rollouts | None = None  # the batch `_ref_logprobs` and `_trained` are about
        self._ref_logprobs: Tensor | None = None
        self._trained: dict[str, float] | None = None  # the update's metrics, once it trained on `_batch`

    def metrics(self) -> dict[str, float]:
        """Its size: π_φ's parameters, and the memory of π_φ with gradients and AdamW's moments (16 bytes a
        float32 parameter) plus π_ref (4)."""
        n = sum(p.numel() for p in self.scorer.model.parameters())
        return {"implicit_prm_params": float(n), "implicit_prm_memory_mb": 20 * n / 2**20}

    def _logprobs(self, policy: TransformersPolicy, rollouts: Rollouts) -> Tensor:
        """(b, T') log-probs of a trimmed sub-batch's responses at temperature 1, on the policy's device."""
        return policy.score(rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids, rollouts.response_mask,
                            1.0, buckets=self.buckets).logprobs

    def _on(self, rollouts: Rollouts) -> None:
        """Make `rollouts` the current batch, with its π_ref log-probs (B, T) from no-grad forwards."""
        if self._batch is rollouts:
            return
        self._batch, self._trained = rollouts, None
        width, parts = rollouts.response_ids.shape[1], []
        with torch.no_grad():
            for rows in torch.arange(rollouts.batch_size).split(self.batch_size):
                sub = trimmed(rollouts.select(rows)).to(self.reference.device)
                parts.append(pad_cols(self._logprobs(self.reference, sub).cpu(), width))
                self.forwards += len(rows)
        self._ref_logprobs = torch.cat(parts) if parts else torch.zeros(0, width)

    @torch.no_grad()
    def log_ratios(self, rollouts: Rollouts) -> Tensor:
        """(B, T) q_t = log π_φ − log π_ref of every response token under the PRM as it is now, 0 off the mask."""
        self._on(rollouts)
        width, parts = rollouts.response_ids.shape[1], []
        with evaluation_mode(self.scorer.model):
            for rows in torch.arange(rollouts.batch_size).split(self.batch_size):
                sub = trimmed(rollouts.select(rows)).to(self.scorer.device)
                parts.append(pad_cols(self._logprobs(self.scorer, sub).cpu(), width))
                self.forwards += len(rows)
        q = torch.cat(parts) - self._ref_logprobs if parts else torch.zeros(0, width)
        return q.masked_fill(~rollouts.response_mask.bool(), 0.0)

    def process_rewards(self, rollouts: Rollouts) -> Tensor:
        """(B, T) r_t = β · q_t; under `update=before` the PRM first trains on the batch."""
        if self.cfg.update == "before":
            self.update(rollouts)
        return self.cfg.beta_train * self.log_ratios(rollouts)

    def update(self, rollouts: Rollouts) -> dict[str, float]:
        """One pass of the CE loss over the batch (once per batch: a second call returns the first's metrics)."""
        self._on(rollouts)
        if self._trained is None:
            self._trained = self._fit(rollouts)
        return {**self._trained, "resource_forwards": float(self.forwards)}

    def _fit(self, rollouts: Rollouts) -> dict[str, float]:
        sums, n, forwards = {"implicit_prm_loss": 0.0, "implicit_prm_grad_norm": 0.0}, 0, 0
        self.scorer.model.train()
        for rows in torch.arange(rollouts.batch_size).tensor_split(min(self.n_minibatches, rollouts.batch_size)):
            sub = trimmed(rollouts.select(rows)).to(self.scorer.device)
            width = sub.response_ids.shape[1]
            q = self._logprobs(self.scorer, sub) - self._ref_logprobs[rows, :width].to(self.scorer.device)
            loss = implicit_prm_loss(q, sub.correct.float(), sub.response_mask, self.cfg.beta_train)
            forwards += len(rows)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.scorer.model.parameters(), self.cfg.grad_clip)
            if not torch.isfinite(norm):
                continue
            self.optimizer.step()
            n += 1
            sums["implicit_prm_loss"] += float(loss.detach())
            sums["implicit_prm_grad_norm"] += float(norm)
        self.updates += 1
        self.forwards += forwards
        return {**{k: v / max(n, 1) for k, v in sums.items()}, "implicit_prm_updates": float(n)}

    def state_dict(self) -> dict:
        return {"model": self.scorer.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.scorer.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
