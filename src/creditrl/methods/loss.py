"""The one policy loss every method shares (methods.md §0).

Per token ℓ = surrogate(r, A') with r = exp(Δ') and A' = A·f; the default surrogate is PPO's clipped
one, ℓ = max(−A'·r, −A'·clip(r, 1−ε_low, 1+ε_high)), with a dual clip ℓ = min(ℓ, −A'·c) where A' < 0.
A method changes the loss only through three hooks:

- a ratio transform, `(Δ, mask) -> Δ'` with Δ = log π − log π_old (B, T); the gradient flows
  through it (GRPO-λ's traced log-ratio, GSPO's sequence ratio);
- a token weight, `(A, Δ.detach(), mask) -> f` (B, T), evaluated under `torch.no_grad()`
  (FIPO's future-KL influence); it may also return `(f, keep)`, keep (B, T) bool, to take tokens
  out of the surrogate altogether, its aggregation's denominator included (FIPO's dropped responses;
  the KL and entropy terms and the metrics still cover every response token).  A weight with the
  attribute `needs_entropy = True` is called `(A, Δ, mask, H)` with the policy's per-token entropy
  H (B, T), detached (the 80/20 rule's high-entropy tokens);
- a surrogate, `(Δ', log π, A', cfg) -> Surrogate` (B, T), the per-token loss in place of the
  clipped one (CISPO's clipped stop-gradient weight, SAPO's soft gate).

The first two default to the identity (Δ' = Δ, f = 1).  Δ is clamped to ±20 once, before any hook, and
every piece sees the clamped Δ (the future-KL sum, filter and safety rule of FIPO, GRPO-λ's trace, the
ratio), as FIPO's official code does; the ratio clamps Δ' again, since a transform may leave that range
(a trace sums Δs).  A clamped token gets no gradient, as under verl's clamp.  Shapes: B rows, T padded
response tokens; `mask` is the response mask (True on real tokens) and every mean below is over it.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

from creditrl.config import Aggregation, LossConfig
from creditrl.microbatch import MinibatchTotals


class Surrogate(NamedTuple):
    """A surrogate's per-token loss (B, T), the ratio it used (B, T) and (B, T) bool flags, each logged
    as its token mean under its name (`clip_frac`: tokens where the clip took effect)."""

    loss: Tensor
    ratio: Tensor
    flags: dict[str, Tensor]


RatioTransform = Callable[[Tensor, Tensor], Tensor]
TokenWeight = Callable[..., "Tensor | tuple[Tensor, Tensor]"]
PolicySurrogate = Callable[[Tensor, Tensor, Tensor, LossConfig], Surrogate]


LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over the True entries of `mask`; 0 when there are none."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def aggregate(loss_mat: Tensor, mask: Tensor, agg: Aggregation, norm_length: int | None = None,
              totals: MinibatchTotals | None = None) -> Tensor:
    """Reduce per-token losses (B, T) to a scalar.

    - `token-mean`: Σ ℓ·m / Σ m over the whole batch (DAPO).
    - `seq-mean-token-mean`: mean over rows of Σ_t ℓ·m / Σ_t m (GRPO); rows without any token
      are left out of the mean over rows.
    - `seq-mean-token-sum-norm`: Σ ℓ·m / (B·norm_length) with a constant norm_length (Dr. GRPO).

    Masked entries never contribute (not even NaN there); a batch without tokens gives 0.  With
    `totals` (a micro-batch of a minibatch) the denominators are the minibatch's, so the
    micro-batches' results add up to the minibatch's.
    """
    mask = mask.bool()
    summed = torch.where(mask, loss_mat, 0.0)
    lengths = mask.sum(dim=1)
    if agg == "token-mean":
        tokens = lengths.sum() if totals is None else torch.tensor(totals.tokens)
        return summed.sum() / tokens.clamp(min=1)
    if agg == "seq-mean-token-mean":
        rows = (lengths > 0).sum() if totals is None else torch.tensor(totals.rows_with_tokens)
        return (summed.sum(dim=1) / lengths.clamp(min=1)).sum() / rows.clamp(min=1)
    if agg == "seq-mean-token-sum-norm":
        if norm_length is None:
            raise ValueError("loss.agg 'seq-mean-token-sum-norm' needs loss.norm_length "
                             "(the constant L_max, e.g. the max new tokens)")
        return summed.sum() / (max(loss_mat.shape[0] if totals is None else totals.rows, 1) * norm_length)
    raise ValueError(f"unknown aggregation {agg!r}; expected token-mean, seq-mean-token-mean "
                     "or seq-mean-token-sum-norm")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: Literal["k1", "k2", "k3"]) -> Tensor:
    """Per-token estimate (B, T) of KL(π‖π_ref) from tokens sampled from π (Schulman's k1/k2/k3).

    With x = log π − log π_ref clamped to ±20: k1 = x, k2 = ½x², k3 = exp(−x) + x − 1 clamped to ±10.
    """
    x = (logprobs - ref_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x.square()
    if estimator == "k3":
        return (torch.exp(-x) + x - 1.0).clamp(-K3_CLAMP, K3_CLAMP)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2 or k3")


def clamped_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Δ = clamp(log π − log π_old, ±20) on the mask, 0 off it (B, T): the one Δ every loss piece reads."""
    return torch.where(mask, logprobs - old_logprobs, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def importance_ratio(log_ratio: Tensor) -> Tensor:
    """r = exp(clamp(Δ', ±20)) (B, T)."""
    return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def clipped_surrogate(log_ratio: Tensor, logprobs: Tensor, advantages: Tensor, cfg: LossConfig) -> Surrogate:
    """PPO's clipped surrogate (Schulman et al. 2017) with clip-higher (DAPO) and dual clip (Ye et al. 2020).

    ℓ = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)), then ℓ = min(ℓ, −A·c) where A < 0 (c = `dual_clip`).
    Flags: `clip_frac` (the clipped branch is the larger one), `dual_clip_frac`.  Shapes: (B, T) each.
    """
    ratio = importance_ratio(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss_mat = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(advantages, dtype=torch.bool)
    if cfg.dual_clip is not None:
        bound = -advantages * cfg.dual_clip
        dual_active = (advantages < 0) & (loss_mat > bound)
        loss_mat = torch.where(advantages < 0, torch.minimum(loss_mat, bound), loss_mat)
    return Surrogate(loss_mat, ratio, {"clip_frac": clipped > unclipped, "dual_clip_frac": dual_active})


def token_weights(token_weight: TokenWeight | None, advantages: Tensor, delta: Tensor, mask: Tensor,
                  entropy: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(f, the mask of the tokens that stay in the loss): the token weight's output under no_grad, Δ detached,
    with the entropy when it `needs_entropy`; f = 1 and the mask as given without one.  Shapes: (B, T) each."""
    if token_weight is None:
        return torch.ones_like(advantages), mask
    inputs = [advantages, delta.detach(), mask]
    if getattr(token_weight, "needs_entropy", False):
        if entropy is None:
            raise ValueError("the token weight reads the policy's per-token entropy: pass entropy= to policy_loss")
        inputs.append(torch.where(mask, entropy.detach(), 0.0))
    with torch.no_grad():
        out = token_weight(*inputs)
    weight, keep = out if isinstance(out, tuple) else (out, None)
    return weight, mask if keep is None else mask & keep


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    ratio_transform: RatioTransform | None = None,
    token_weight: TokenWeight | None = None,
    surrogate: PolicySurrogate | None = None,
    totals: MinibatchTotals | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The surrogate (default `clipped_surrogate`) on r = exp(Δ') and A·f, aggregated, with KL and entropy terms.

    All tensors are (B, T).  Returns the scalar loss and detached scalar metrics:
    `pg_loss` (aggregated surrogate), the surrogate's flags as token means (the clipped one's
    `clip_frac` and `dual_clip_frac`), `ratio_mean` (of the transformed ratio), `approx_kl`
    (mean of k3 = r − 1 − Δ on the untransformed Δ: an unbiased estimate of KL(π_old‖π) from
    π_old's samples), `weight_mean` (of f), and `kl` / `entropy` (token means) when given.
    `totals`: the minibatch's, when these rows are one micro-batch of it (see `aggregate`).
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape):
        raise ValueError(
            f"policy_loss: shapes differ: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, "
            f"advantages {tuple(advantages.shape)}, mask {tuple(mask.shape)}"
        )
    mask = mask.bool()
    # off the mask every input is replaced, not just left out: a NaN there would still reach the
    # gradient (0 · NaN) through the masked aggregation's backward
    delta = clamped_log_ratio(logprobs, old_logprobs, mask)
    delta_t = ratio_transform(delta, mask) if ratio_transform is not None else delta
    # kept: the tokens the surrogate sums over
    weight, kept = token_weights(token_weight, advantages, delta, mask, entropy)
    if totals is not None and not torch.equal(kept, mask):
        raise ValueError("train.max_tokens_per_microbatch: the token weight took tokens out of the loss (FIPO's "
                         "method_params.drop_exploded_responses), so the minibatch's token count is known only "
                         "after every micro-batch's forward; set method_params.drop_exploded_responses=false or "
                         "leave train.max_tokens_per_microbatch unset")
    adv = torch.where(kept, advantages * weight, 0.0)
    terms = (surrogate or clipped_surrogate)(delta_t, torch.where(mask, logprobs, 0.0), adv, cfg)

    pg_loss = aggregate(terms.loss, kept, cfg.agg, cfg.norm_length, totals)
    loss = pg_loss
    metrics: dict[str, Tensor] = {}
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("loss.kl_coef > 0 needs ref_logprobs (log-probs of the frozen reference policy)")
        kl = kl_penalty(logprobs, torch.where(mask, ref_logprobs, logprobs.detach()), cfg.kl_estimator)
        loss = loss + cfg.kl_coef * aggregate(kl, mask, cfg.agg, cfg.norm_length, totals)
        metrics["kl"] = masked_mean(kl.detach(), mask)
    if entropy is not None:
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * aggregate(entropy, mask, cfg.agg, cfg.norm_length, totals)
        metrics["entropy"] = masked_mean(entropy.detach(), mask)

    with torch.no_grad():
        raw = delta.detach()  # the untransformed Δ
        metrics.update(
            pg_loss=pg_loss.detach(),
            **{name: masked_mean(flag.float(), mask) for name, flag in terms.flags.items()},
            ratio_mean=masked_mean(terms.ratio.detach(), mask),
            approx_kl=masked_mean(torch.exp(raw) - 1.0 - raw, mask),
            weight_mean=masked_mean(weight.float(), mask),
        )
    return loss, metrics
