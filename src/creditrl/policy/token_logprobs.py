"""Log-probs of chosen tokens from final hidden states, without the batch's full float32 logits.

    z_k = (W h_k + b) / τ
    log π(y_k | y_<k) = z_k[y_k] − logsumexp(z_k)
    H_k = logsumexp(z_k) − Σ_v softmax(z_k)_v · z_k[v]

computed over chunks of positions, so at most one chunk of (positions × vocabulary) float32
logits is alive at a time: for a 152k vocabulary that is what lets 16 × 2048 tokens fit on a GPU
at all (the whole batch's logits alone would take 18.5 GiB).

When the head is a linear layer (the usual output projection), the chunks go through one
autograd function that keeps only the hidden states and logsumexps for the backward and rebuilds
each chunk's logits there, with the gradient written out by hand (the fused linear log-softmax of Liger
Kernel and Cut Cross-Entropy, here in plain torch):

    ∂/∂z_k[v]:   g_k · (1[v = y_k] − p_k[v])  −  e_k · p_k[v] · (z_k[v] − logsumexp(z_k) + H_k)

for upstream gradients g (log-probs) and e (entropies, only with an entropy bonus), divided by
τ, then through W.  With `keep_logits` the forward's chunks of logits stay alive for the
backward instead of being rebuilt there: three matmuls through the head instead of four, for
positions × vocabulary values held from the forward to the backward.  Any other head (a
callable) runs its chunks under `torch.utils.checkpoint`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from creditrl.policy.compiling import compile_dynamic


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy (B, T) of the next-token distributions given by logits (B, T, V).

    H = logsumexp(z) − Σ softmax(z)·z, computed in at least float32; −inf logits are allowed.
    """
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    probs = torch.softmax(z, dim=-1)
    finite_z = z.masked_fill(torch.isneginf(z), 0.0)
    return torch.logsumexp(z, dim=-1) - (probs * finite_z).sum(dim=-1)


def chosen_token_logprobs(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, temperature: float = 1.0,
                          with_entropy: bool = False, entropy_grad: bool = False,
                          chunk_elements: int = 2 ** 26, compiled: bool = False,
                          keep_logits: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-position log-prob of `targets` (N,) given `hidden` (N, D), and optionally the entropy (N,).

    `head` maps hidden states to logits (the model's output projection).  `chunk_elements` bounds
    one chunk's logits (positions × vocabulary); the entropy carries gradients only with
    `entropy_grad`.  Temperature 0 (greedy sampling) scores at temperature 1.  `compiled` fuses a
    linear head's passes over the logits with torch.compile; `keep_logits` keeps a linear head's
    logits (N × vocabulary, in the matmuls' dtype) from the forward for the backward instead of
    rebuilding them there.
    """
    vocab = head.out_features if isinstance(head, torch.nn.Linear) else head(hidden[:1]).shape[-1]
    per_chunk = max(1, chunk_elements // vocab)
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    divisor = temperature if temperature > 0 else 1.0
    if isinstance(head, torch.nn.Linear):
        # the matmuls' dtype: autocast's when it is on, else the weight's; the weight is cast once for all
        # chunks (as autocast's own cache would), and its gradient flows back through the cast
        on = torch.is_autocast_enabled(hidden.device.type)
        dtype = torch.get_autocast_dtype(hidden.device.type) if on else head.weight.dtype
        weight, bias = head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)
        # grad mode is off inside forward (and needs_input_grad ignores it): keep only where a backward can come
        keep = keep_logits and torch.is_grad_enabled()
        logprobs, entropy = ProjectedLogprobs.apply(hidden, weight, bias, targets, divisor, with_entropy, entropy_grad,
                                                    compiled, per_chunk, keep)
        return logprobs, entropy if with_entropy else None
    results = _checkpointed_chunks(list(zip(hidden.split(per_chunk), targets.split(per_chunk))), head, divisor,
                                   with_entropy, entropy_grad)
    logprobs = torch.cat([lp for lp, _ in results])
    entropy = torch.cat([e for _, e in results]) if with_entropy else None
    return logprobs, entropy


class ProjectedLogprobs(torch.autograd.Function):
    """(log π(y | h), H) for hidden states h (N, D) through the projection (W, b), `per_chunk` positions at a time.

    Matmuls run in W's dtype (h is cast to it), the logits' statistics in float32.  On a GPU each
    pass over the (n, vocabulary) logits costs about as much as the projection, so the passes
    are few and in place (`_log_normalizer`, `_logits_gradient`), or fused into one kernel
    each when `compiled` (torch.compile).  The backward adds each chunk's ∂W into one buffer
    inside the matmul (`addmm_`), where one autograd node per chunk would leave autograd a
    separate (vocabulary × D) addition per chunk; that buffer is in W's dtype, so in bf16 each chunk
    adds one rounding (relative error of ∂W against float64: 0.29% unchunked, 0.57% over 128
    chunks, on random 8192 × 256 data), a float32 buffer costing a (vocabulary × D) read and write
    more per chunk.  Gradients are formed only for the inputs that
    need them (a frozen head under LoRA gets none).  H is empty without `with_entropy`.  With
    `keep_logits`, when gradients are wanted, the backward takes each chunk's logits from the
    forward instead of projecting again.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, divisor: float,
                with_entropy: bool, entropy_grad: bool, compiled: bool, per_chunk: int,
                keep_logits: bool = False) -> tuple[Tensor, Tensor]:
        log_normalizer = _kernels(compiled)[0]
        keep = keep_logits and any(ctx.needs_input_grad[:3])
        lse, entropy, chosen, kept = [], [], [], []
        for rows in _chunks(len(hidden), per_chunk):
            logits = _logits(hidden[rows], weight, bias)
            chunk_lse, chunk_entropy = log_normalizer(logits, divisor, with_entropy)
            lse.append(chunk_lse)
            entropy.append(chunk_entropy)
            chosen.append(logits.gather(-1, targets[rows, None]).squeeze(-1).to(chunk_lse.dtype) / divisor)
            if keep:
                kept.append(logits)
        lse, entropy = torch.cat(lse), torch.cat(entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, *kept)
        ctx.divisor, ctx.entropy_grad, ctx.compiled, ctx.per_chunk = (divisor, with_entropy and entropy_grad,
                                                                      compiled, per_chunk)
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return torch.cat(chosen) - lse, entropy

    @staticmethod
    def backward(ctx, grad_logprob: Tensor, grad_entropy: Tensor | None):
        hidden, weight, bias, targets, lse, entropy, *kept = ctx.saved_tensors
        # z = logits / τ: every gradient through z carries 1/τ
        g = grad_logprob / ctx.divisor
        e = grad_entropy / ctx.divisor if ctx.entropy_grad and grad_entropy is not None else None
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if needs_bias else None
        logits_gradient = _kernels(ctx.compiled)[1]
        for i, rows in enumerate(_chunks(len(hidden), ctx.per_chunk)):
            h = hidden[rows].to(weight.dtype)  # cast once for both of the chunk's matmuls with W
            logits = kept[i] if kept else _logits(h, weight, bias)
            grad_logits = logits_gradient(logits, lse[rows], entropy[rows], targets[rows], g[rows],
                                          None if e is None else e[rows], ctx.divisor)  # entropy: empty, or N
            if needs_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if needs_weight:
                grad_weight.addmm_(grad_logits.T, h)
            if needs_bias:
                grad_bias += grad_logits.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _chunks(n: int, per_chunk: int) -> list[slice]:
    """Consecutive row ranges of at most `per_chunk` rows covering n rows."""
    return [slice(start, start + per_chunk) for start in range(0, n, per_chunk)]


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """W h + b in W's dtype, with autocast off."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.to(weight.dtype) @ weight.T
        return logits + bias if bias is not None else logits


def _log_normalizer(logits: Tensor, divisor: float, with_entropy: bool) -> tuple[Tensor, Tensor]:
    """(logsumexp z, H) per row, z = logits / τ in at least float32; H is empty without `with_entropy`."""
    z = _scaled(logits, divisor)
    if not with_entropy:
        return torch.logsumexp(z, dim=-1), z.new_zeros(0)
    top = z.amax(-1, keepdim=True)
    exps = (z - top).exp_()
    total = exps.sum(-1)
    lse = top.squeeze(-1) + total.log()
    with torch.autocast(z.device.type, enabled=False):  # autocast would run the batched dot in bf16
        return lse, lse - (exps[:, None, :] @ z[:, :, None]).view(-1) / total  # H = lse − Σ p·z


def _logits_gradient(logits: Tensor, lse: Tensor, entropy: Tensor, targets: Tensor, g: Tensor, e: Tensor | None,
                     divisor: float) -> Tensor:
    """∂/∂logits in the logits' dtype: g·(1[v = y] − p) − e·p·(log p + H), with g and e already divided by τ."""
    grad = _scaled(logits, divisor).sub_(lse[:, None])  # log p
    if e is not None:
        p = grad.exp()
        grad.add_(entropy[:, None]).mul_(-e[:, None]).sub_(g[:, None]).mul_(p)  # −p·(g + e·(log p + H))
    else:
        grad.exp_().mul_(-g[:, None])  # −g·p
    grad.scatter_add_(-1, targets[:, None], g[:, None])  # + g at the chosen token
    return grad.to(logits.dtype)


def _logits_gradient_pointwise(logits: Tensor, lse: Tensor, entropy: Tensor, targets: Tensor, g: Tensor,
                               e: Tensor | None, divisor: float) -> Tensor:
    """`_logits_gradient` as one pointwise expression, the chosen token found by comparing indices: what
    torch.compile fuses into a single kernel that writes the logits' dtype (a scatter would split it in
    two, with a float32 gradient written and read between them).  Eager, it would make more passes."""
    log_p = _scaled(logits, divisor) - lse[:, None]
    p = log_p.exp()
    chosen = torch.arange(logits.shape[-1], device=logits.device) == targets[:, None]
    grad = g[:, None] * (chosen.to(p.dtype) - p)
    if e is not None:
        grad = grad - e[:, None] * p * (log_p + entropy[:, None])
    return grad.to(logits.dtype)


def _scaled(logits: Tensor, divisor: float) -> Tensor:
    """z = logits / τ as a fresh tensor in at least float32 (float64 stays float64)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    return z.div_(divisor) if divisor != 1.0 else z


@functools.cache
def _kernels(compiled: bool) -> tuple[Callable, Callable]:
    """The two passes over a chunk's logits, eager (in place) or through torch.compile (pointwise;
    dynamic shapes: the last chunk and every bucket differ)."""
    if not compiled:
        return _log_normalizer, _logits_gradient
    return compile_dynamic(_log_normalizer), compile_dynamic(_logits_gradient_pointwise)


def _checkpointed_chunks(chunks, head: Callable[[Tensor], Tensor], divisor: float, with_entropy: bool,
                         entropy_grad: bool) -> list[tuple[Tensor, Tensor]]:
    """Any head: each chunk's logits dropped after its forward and rebuilt in the backward."""

    def one_chunk(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = head(h).float()
        if divisor != 1.0:
            logits = logits / divisor
        logprob = logits.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            entropy = token_entropy(logits) if with_entropy else logprob.new_zeros(())
        return logprob, entropy

    recompute = torch.is_grad_enabled() and len(chunks) > 1
    return [checkpoint(one_chunk, h, y, use_reentrant=False) if recompute else one_chunk(h, y) for h, y in chunks]
