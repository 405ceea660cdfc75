"""Float32 master weights for a model held in bfloat16 (Micikevicius et al. 2018, arXiv 1710.03740).

    forward and backward on the bf16 weights:   g = ∇L(w_bf16)
    AdamW on float32 masters:                   w32 ← AdamW(w32, float32(g))
    the weights of the next forward:            w_bf16 ← round_bf16(w32)

A bf16 number keeps 8 significant bits, so an update smaller than about 2⁻⁹·|w| rounds away;
at RL learning rates (1e-6) nearly every AdamW update is that small, and AdamW stepping the
bf16 weights themselves would leave them where they are.  The float32 masters accumulate the
updates until they show in the rounded weights.  A parameter already in float32 (a model kept
in float32; LoRA adapters, which peft keeps in float32 over a bf16 model) is its own master,
so for a float32 model every method here is a no-op.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MasterWeights:
    """The float32 copies the optimizer steps, one per trainable parameter of `model`."""

    def __init__(self, model: nn.Module):
        trainable = [(name, weight) for name, weight in model.named_parameters() if weight.requires_grad]
        self.names = [name for name, _ in trainable]
        self.weights = [weight for _, weight in trainable]
        self.masters = [w if w.dtype == torch.float32 else w.detach().float().requires_grad_() for w in self.weights]
        # the pairs that need copies, by the weight's dtype: one multi-tensor copy per dtype (a list of
        # mixed dtypes takes the slow path, and was wrong in some torch releases)
        self._by_dtype: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
        for weight, master in zip(self.weights, self.masters):
            if master is weight:
                continue
            weights, masters = self._by_dtype.setdefault(weight.dtype, ([], []))
            weights.append(weight)
            masters.append(master)

    def parameters(self) -> list[Tensor]:
        """What the optimizer steps."""
        return self.masters

    def take_gradients(self, add: bool = False) -> None:
        """Move each weight's gradient, in float32, to its master (call after `backward`).  With `add`, a
        master that holds a gradient already (an earlier micro-batch of the same step) gets it added in
        float32, and one whose weight got no gradient keeps its own."""
        for weights, masters in self._by_dtype.values():
            if add:
                for weight, master in zip(weights, masters):
                    if weight.grad is not None and master.grad is not None:
                        master.grad.add_(weight.grad)
            pairs = [(w, m) for w, m in zip(weights, masters)
                     if w.grad is not None and not (add and m.grad is not None)]
            for weight, master in zip(weights, masters):
                if not add or master.grad is None:
                    master.grad = None if weight.grad is None else torch.empty_like(master)
            if pairs:  # a few multi-tensor kernels where one cast per parameter made hundreds of launches
                torch._foreach_copy_([m.grad for _, m in pairs], [w.grad for w, _ in pairs])
            for weight in weights:
                weight.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        """Round the masters into the weights (call after the optimizer's step)."""
        for weights, masters in self._by_dtype.values():
            torch._foreach_copy_(weights, masters)

    def state_dict(self) -> dict[str, Tensor]:
        """The masters that are not the weights themselves, by parameter name (empty for a float32 model)."""
        return {name: master.detach() for name, weight, master in zip(self.names, self.weights, self.masters)
                if master is not weight}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], source: str = "master weights") -> None:
        """Set the masters from `state_dict()`'s output and round them into the weights."""
        masters = self.state_dict()
        if set(state) != set(masters):
            missing, unexpected = sorted(set(masters) - set(state)), sorted(set(state) - set(masters))
            raise ValueError(f"{source}: does not match the model's low-precision parameters "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        for name, tensor in state.items():
            masters[name].copy_(tensor)  # the detached view shares the master's storage
        self.write_back()


def descend(loss: Tensor, optimizer: torch.optim.Optimizer, masters: MasterWeights, max_norm: float | None) -> Tensor:
    """One optimizer step of the trainer, on the weights' float32 masters.

    g = ∇L(w_bf16) moved to the masters, clipped to ‖g‖ ≤ max_norm (None or 0: no clipping), then
    `optimizer` steps the masters and they are rounded back into the weights.  Returns ‖g‖ before
    clipping; when it is not finite, nothing is stepped and the gradients are dropped.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    masters.take_gradients()
    return apply_gradients(optimizer, masters, max_norm)


def apply_gradients(optimizer: torch.optim.Optimizer, masters: MasterWeights, max_norm: float | None) -> Tensor:
    """The step of `descend` once the masters hold g (after one or several backward + `take_gradients`):
    clip to ‖g‖ ≤ max_norm, step, round into the weights.  Returns ‖g‖ before clipping; when it is not
    finite, nothing is stepped and the gradients are dropped."""
    norm = torch.nn.utils.clip_grad_norm_(masters.parameters(), max_norm or float("inf"))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return norm
    optimizer.step()
    masters.write_back()
    return norm
