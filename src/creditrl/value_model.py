"""The resource `value_model`: a learned value V(s_t) of each response token's state, trained with the policy.

V(s_t) is a linear head on the last hidden state (after the final norm) at the position that
predicts response token t, i.e. the state s_t = prompt + response[:t] (the positions verl's
critic reads).  The head sits on a separate copy of the policy (`value_model.shared=false`, the
PPO baseline of VinePPO and verl's critic) or on the policy's own hidden states
(`shared=true`: no second model; the value loss trains the head only, on detached features).
The head starts at zero, so the first values are 0 and the first returns are the rewards-to-go.

Per rollout batch the advantage calls `values(rollouts)` (no gradient) and `set_targets(values,
returns)`; the trainer then calls `update(rollouts)`: `train.ppo_epochs` passes over the batch in
`train.n_minibatches` minibatches of the clipped value loss, AdamW on the value model's own
parameters.  `state_dict` holds everything a resumed run needs.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from creditrl.config import TrainConfig, ValueModelConfig
from creditrl.policy.transformers_backend import TransformersPolicy, evaluation_mode
from creditrl.rollouts import Rollouts, pad_cols, pad_right, trimmed


def value_loss(predicted: Tensor, returns: Tensor, old_values: Tensor, mask: Tensor, clip: float
               ) -> tuple[Tensor, Tensor]:
    """½ · token-mean over the mask of max((V − G)², (clip(V, V_old − c, V_old + c) − G)²), and the fraction of
    tokens where the clipped term is the larger (verl's `compute_value_loss`, token-mean).  All (B, T)."""
    clipped = old_values + (predicted - old_values).clamp(-clip, clip)
    plain, limited = (predicted - returns).square(), (clipped - returns).square()
    weights = mask.to(predicted.dtype)
    denominator = weights.sum().clamp(min=1)
    loss = 0.5 * (torch.maximum(plain, limited) * weights).sum() / denominator
    clip_frac = ((limited > plain).to(predicted.dtype) * weights).sum() / denominator
    return loss, clip_frac


def response_states(decoder: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                    response_mask: Tensor) -> Tensor:
    """(B, T, D) last hidden states (after the final norm) at the positions plen − 1 + t that predict response
    token t.  Each row's prompt and response sit side by side from position 0, right-padded (causal attention
    needs no mask)."""
    lengths = response_mask.sum(1).tolist()
    rows = [torch.cat([p[m.bool()], r[:n]]) for p, m, r, n in zip(prompt_ids, prompt_mask, response_ids, lengths)]
    packed = pad_right(rows, 0)
    positions = torch.arange(packed.shape[1], device=packed.device).expand_as(packed)
    states = decoder(input_ids=packed, position_ids=positions, use_cache=False).last_hidden_state
    where = (prompt_mask.sum(1, keepdim=True) - 1 + torch.arange(response_ids.shape[1], device=packed.device))
    where = where.clamp(0, packed.shape[1] - 1)
    return states.gather(1, where[..., None].expand(-1, -1, states.shape[-1]))


class ValueModel:
    """V(s_t) for every response token, and its training (see the module docstring)."""

    def __init__(self, policy: TransformersPolicy, cfg: ValueModelConfig, train: TrainConfig):
        self.policy, self.cfg = policy, cfg
        self.epochs, self.n_minibatches = train.ppo_epochs, train.n_minibatches
        self.batch_size = train.logprob_batch_size
        # float32 even for a bf16 policy: an AdamW step of lr 1e-5 would mostly round away in bf16
        self.trunk = None if cfg.shared else copy.deepcopy(policy.model).float().requires_grad_(True)
        self.head = nn.Linear(policy.model.config.hidden_size, 1, device=policy.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay, fused=True)
        self.updates = 0  # value updates so far (one per rollout batch)
        self.targets: tuple[Tensor, Tensor] | None = None  # (old values, returns) of the batch to fit next
        self.reset(seed=0)

    def parameters(self) -> list[nn.Parameter]:
        """What the value loss trains: the head, and the copy of the policy when there is one."""
        return [*self.head.parameters(), *(self.trunk.parameters() if self.trunk is not None else ())]

    @property
    def warming_up(self) -> bool:
        """True for the first `warmup_steps` batches: the value model trains, the policy waits."""
        return self.updates < self.cfg.warmup_steps

    def reset(self, seed: int) -> None:
        """The seed of this step's minibatch order, and zeroed forward counts (the trainer calls it every step)."""
        self.seed, self.forwards = seed, 0

    def metrics(self) -> dict[str, float]:
        """Its cost: sequences through it for the advantage, its trainable parameters, and their memory with
        their gradients and AdamW's two moments (float32: 16 bytes a parameter)."""
        trainable = sum(p.numel() for p in self.parameters())
        return {"value_forwards": float(self.forwards), "value_params": float(trainable),
                "value_memory_mb": 16 * trainable / 2**20}

    def _predict(self, sub: Rollouts) -> Tensor:
        """(b, T') values of a trimmed sub-batch on the policy's device, with a gradient into what trains."""
        if self.trunk is None:
            with torch.no_grad():
                states = response_states(self.policy.model.get_decoder(), sub.prompt_ids, sub.prompt_mask,
                                         sub.response_ids, sub.response_mask)
        else:
            states = response_states(self.trunk.get_decoder(), sub.prompt_ids, sub.prompt_mask, sub.response_ids,
                                     sub.response_mask)
        return self.head(states.float()).squeeze(-1)

    @torch.no_grad()
    def values(self, rollouts: Rollouts) -> Tensor:
        """(B, T) float32 V(s_t) of every response token, 0 off the response mask, in chunks of rows."""
        width, parts = rollouts.response_ids.shape[1], []
        with evaluation_mode(self.trunk if self.trunk is not None else self.policy.model):
            for rows in torch.arange(rollouts.batch_size).split(self.batch_size):
                sub = trimmed(rollouts.select(rows)).to(self.policy.device)
                parts.append(pad_cols(self._predict(sub).cpu(), width))
                self.forwards += len(rows)
        values = torch.cat(parts) if parts else torch.zeros(0, width)
        return values.masked_fill(~rollouts.response_mask.bool(), 0.0)

    def set_targets(self, values: Tensor, returns: Tensor) -> None:
        """The batch's old values V_old (B, T), the clipping centre, and returns G (B, T), the regression target."""
        self.targets = (values.detach().float().cpu(), returns.detach().float().cpu())

    def update(self, rollouts: Rollouts) -> dict[str, float]:
        """Fit the targets the advantage set on this batch; returns the step's value-loss metrics."""
        if self.targets is None:
            raise RuntimeError("value_model.update: no targets for this batch (the advantage sets them)")
        old_values, returns = self.targets
        generator = torch.Generator().manual_seed(self.seed)
        sums, n, forwards = {"value_loss": 0.0, "value_clip_frac": 0.0, "value_grad_norm": 0.0}, 0, 0
        if self.trunk is not None:
            self.trunk.train()
        for _ in range(self.epochs):
            order = torch.randperm(rollouts.batch_size, generator=generator)
            for rows in order.tensor_split(min(self.n_minibatches, rollouts.batch_size)):
                sub = trimmed(rollouts.select(rows)).to(self.policy.device)
                width = sub.response_ids.shape[1]
                predicted = self._predict(sub)
                loss, clip_frac = value_loss(predicted, returns[rows, :width].to(predicted.device),
                                             old_values[rows, :width].to(predicted.device), sub.response_mask,
                                             self.cfg.cliprange_value)
                forwards += len(rows)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.cfg.grad_clip or math.inf)
                if not torch.isfinite(norm):
                    continue
                self.optimizer.step()
                n += 1
                for key, value in (("value_loss", loss), ("value_clip_frac", clip_frac), ("value_grad_norm", norm)):
                    sums[key] += float(value.detach())
        self.updates += 1
        self.targets = None
        mask = rollouts.response_mask.bool()
        return {**{k: v / max(n, 1) for k, v in sums.items()}, "value_updates": float(n),
                "value_update_forwards": float(forwards), "resource_forwards": float(self.forwards + forwards),
                "value_mean": old_values[mask].mean().item(),
                "value_explained_var": _explained_variance(old_values[mask], returns[mask])}

    def state_dict(self) -> dict:
        return {"trunk": self.trunk.state_dict() if self.trunk is not None else {}, "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if self.trunk is not None:
            self.trunk.load_state_dict(state["trunk"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])


def _explained_variance(values: Tensor, returns: Tensor) -> float:
    """1 − Var(G − V) / Var(G): how much of the returns' spread the old values explained."""
    if returns.numel() < 2:
        return float("nan")
    return (1 - (returns - values).var() / returns.var().clamp(min=1e-8)).item()
