"""The shared policy loss, checked against hand-worked numbers and a slow float64 reference loop."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from creditrl.methods.loss import LossConfig, aggregate, kl_penalty, policy_loss
from creditrl.policy.token_logprobs import token_entropy


def one_token(adv: float, ratio: float, cfg: LossConfig):
    """Loss, d loss / d logprob and metrics for a single token with the given advantage and ratio."""
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, metrics = policy_loss(logp, old, torch.tensor([[adv]], dtype=torch.float64),
                                torch.ones(1, 1, dtype=torch.bool), cfg)
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


# (A, r, hand-worked ℓ, dℓ/dΔ, clipped branch active, dual clip active) with ε_low 0.2, ε_high 0.28, c = 3.
HAND_CASES = [
    # A>0, r above 1+ε_high: max(−1.5, −1.28) = −1.28, clipped so no gradient
    (1.0, 1.5, -1.28, 0.0, True, False),
    # A>0, r below 1−ε_low: max(−0.5, −0.8) = −0.5, unclipped: dℓ/dΔ = −A·r = −0.5
    (1.0, 0.5, -0.5, -0.5, False, False),
    # A<0, r below 1−ε_low: max(0.5, 0.8) = 0.8, clipped
    (-1.0, 0.5, 0.8, 0.0, True, False),
    # A<0, r above 1+ε_high: max(1.5, 1.28) = 1.5, unclipped: dℓ/dΔ = 1.5
    (-1.0, 1.5, 1.5, 1.5, False, False),
    # A<0, r = 5: max(5, 1.28) = 5, then dual clip min(5, −A·c = 3) = 3, no gradient
    (-1.0, 5.0, 3.0, 0.0, False, True),
    # A = −0.5, r = 2.5: max(1.25, 0.64) = 1.25 < −A·c = 1.5, so no dual clip; gradient 1.25
    (-0.5, 2.5, 1.25, 1.25, False, False),
    # A = 2, r = 1.2 inside the clip range: −2.4, gradient −2.4
    (2.0, 1.2, -2.4, -2.4, False, False),
]


@pytest.mark.parametrize("adv,ratio,expected,grad,clipped,dual", HAND_CASES)
def test_single_token_hand_values(adv, ratio, expected, grad, clipped, dual):
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    loss, g, metrics = one_token(adv, ratio, cfg)
    assert loss == pytest.approx(expected, abs=1e-12)
    assert g == pytest.approx(grad, abs=1e-12)
    assert metrics["clip_frac"].item() == float(clipped)
    assert metrics["dual_clip_frac"].item() == float(dual)


def test_dual_clip_disabled():
    loss, _, metrics = one_token(-1.0, 5.0, LossConfig(eps_high=0.28, dual_clip=None))
    assert loss == pytest.approx(5.0)
    assert metrics["dual_clip_frac"].item() == 0.0


def test_batch_metrics_hand_values():
    advs = torch.tensor([[c[0] for c in HAND_CASES]], dtype=torch.float64)
    ratios = [c[1] for c in HAND_CASES]
    logp = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64)
    mask = torch.ones_like(advs, dtype=torch.bool)
    loss, m = policy_loss(logp, torch.zeros_like(logp), advs, mask, LossConfig(eps_high=0.28))
    n = len(HAND_CASES)
    assert loss.item() == pytest.approx(sum(c[2] for c in HAND_CASES) / n)
    assert m["pg_loss"].item() == pytest.approx(loss.item())
    assert m["clip_frac"].item() == pytest.approx(2 / n)
    assert m["dual_clip_frac"].item() == pytest.approx(1 / n)
    assert m["ratio_mean"].item() == pytest.approx(sum(ratios) / n)
    # approx_kl is the k3 estimate of KL(π_old‖π): r − 1 − log r per token
    assert m["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / n)
    assert m["weight_mean"].item() == 1.0
    assert "kl" not in m and "entropy" not in m


def test_aggregation_modes_on_ragged_mask():
    nan = float("nan")
    loss_mat = torch.tensor([[1.0, 2.0, 3.0, nan], [4.0, 5.0, nan, nan], [nan, nan, nan, nan]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # token-mean: (1+2+3+4+5)/5 = 3
    assert aggregate(loss_mat, mask, "token-mean").item() == pytest.approx(3.0)
    # seq-mean-token-mean: rows 2 and 4.5; the empty row is left out: 3.25
    assert aggregate(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx(3.25)
    # seq-mean-token-sum-norm with L_max = 4: 15 / (3 rows · 4) = 1.25
    assert aggregate(loss_mat, mask, "seq-mean-token-sum-norm", norm_length=4).item() == pytest.approx(1.25)


def test_norm_length_missing_is_a_clear_error():
    with pytest.raises(ValueError, match="norm_length"):
        aggregate(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), "seq-mean-token-sum-norm")
    cfg = LossConfig(agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="norm_length"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), cfg)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_empty_mask_gives_zero_not_nan(agg):
    logp = torch.randn(3, 5, requires_grad=True)
    cfg = LossConfig(agg=agg, norm_length=5, kl_coef=0.1, entropy_coef=0.01)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    loss, metrics = policy_loss(logp, torch.randn(3, 5), torch.randn(3, 5), mask, cfg, ref_logprobs=torch.randn(3, 5),
                                entropy=torch.rand(3, 5))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.equal(logp.grad, torch.zeros_like(logp))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_nan_off_the_mask_reaches_neither_the_loss_nor_the_gradient(agg):
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    logp = torch.randn(2, 5, requires_grad=True)
    old, adv, ref = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    cfg = LossConfig(agg=agg, norm_length=5, kl_coef=0.1)
    clean, _ = policy_loss(logp, old, adv, mask, cfg, ref_logprobs=ref)
    clean_grad, = torch.autograd.grad(clean, logp)
    for which in range(3):  # one input at a time (a NaN log-ratio would hide the others' NaN behind its clamp)
        inputs = [old.clone(), adv.clone(), ref.clone()]
        inputs[which][~mask] = float("nan")
        dirty, metrics = policy_loss(logp, inputs[0], inputs[1], mask, cfg, ref_logprobs=inputs[2])
        dirty_grad, = torch.autograd.grad(dirty, logp)
        torch.testing.assert_close(dirty, clean)
        torch.testing.assert_close(dirty_grad, clean_grad)  # finite, and zero off the mask
        assert all(torch.isfinite(v) for v in metrics.values())


def test_kl_estimators_closed_forms():
    logp = torch.tensor([-1.0, 0.0, -30.0, 0.0])
    ref = torch.tensor([-2.0, 0.0, 0.0, -30.0])
    # x = log π − log π_ref = [1, 0, −30 → −20, 30 → 20]
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, 0.0, -20.0, 20.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 0.0, 200.0, 200.0]))
    # k3 = e^{−x} + x − 1: e^{−1} = 0.36787944; x = ±20 both exceed the ±10 clamp
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([0.36787944, 0.0, 10.0, 10.0]))


def test_kl_estimators_are_unbiased_for_kl():
    # Exact expectation over a categorical π: E_π[k1] = E_π[k3] = KL(π‖π_ref) = Σ π log(π/π_ref).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    for est in ("k1", "k3"):
        assert (p * kl_penalty(p.log(), q.log(), est)).sum().item() == pytest.approx(exact, rel=1e-12)


def test_kl_requires_reference():
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool),
                    LossConfig(kl_coef=0.1))


def reference_loss(logp, old, adv, mask, cfg, ref=None, ent=None, weight=None):
    """Plain-Python float64 loops over every (b, t): the loss as written in methods.md §0."""
    B, T = len(logp), len(logp[0])

    def agg(values):
        if cfg.agg == "token-mean":
            total = sum(values[b][t] for b in range(B) for t in range(T) if mask[b][t])
            count = sum(mask[b][t] for b in range(B) for t in range(T))
            return total / count if count else 0.0
        if cfg.agg == "seq-mean-token-mean":
            rows = []
            for b in range(B):
                toks = [values[b][t] for t in range(T) if mask[b][t]]
                if toks:
                    rows.append(sum(toks) / len(toks))
            return sum(rows) / len(rows) if rows else 0.0
        total = sum(values[b][t] for b in range(B) for t in range(T) if mask[b][t])
        return total / (B * cfg.norm_length)

    per_token = [[0.0] * T for _ in range(B)]
    kl = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            d = min(max(logp[b][t] - old[b][t], -20.0), 20.0)
            r = math.exp(d)
            a = adv[b][t] * (weight[b][t] if weight is not None else 1.0)
            r_clip = min(max(r, 1 - cfg.eps_low), 1 + cfg.eps_high)
            ell = max(-a * r, -a * r_clip)
            if cfg.dual_clip is not None and a < 0:
                ell = min(ell, -a * cfg.dual_clip)
            per_token[b][t] = ell
            if ref is not None:
                x = min(max(logp[b][t] - ref[b][t], -20.0), 20.0)
                kl[b][t] = min(max(math.exp(-x) + x - 1, -10.0), 10.0)
    total = agg(per_token)
    if cfg.kl_coef > 0:
        total += cfg.kl_coef * agg(kl)
    if ent is not None and cfg.entropy_coef > 0:
        total -= cfg.entropy_coef * agg(ent)
    return total


def random_batch(seed: int, B: int = 5, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6
    old[0, 0] = logp[0, 0] - 3.0  # a ratio of e^3 ≈ 20: dual clip territory
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, 1, 4, 0, 7])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    return logp, old, adv, mask, ref, ent


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_matches_reference_loop(seed, agg):
    logp, old, adv, mask, ref, ent = random_batch(seed)
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, agg=agg, norm_length=12, kl_coef=0.05,
                     entropy_coef=0.01)
    loss, _ = policy_loss(logp, old, adv, mask, cfg, ref_logprobs=ref, entropy=ent)
    expected = reference_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), cfg, ref.tolist(), ent.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_token_weight_matches_reference_loop():
    logp, old, adv, mask, _, _ = random_batch(3)
    cfg = LossConfig(eps_high=0.28)
    weight = lambda a, d, m: 1.0 + d.abs()  # noqa: E731
    loss, metrics = policy_loss(logp, old, adv, mask, cfg, token_weight=weight)
    w = (1.0 + (logp - old).abs()).tolist()
    assert loss.item() == pytest.approx(reference_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), cfg,
                                                       weight=w), rel=1e-10)
    expected_mean = sum(w[b][t] for b in range(5) for t in range(9) if mask[b, t]) / mask.sum().item()
    assert metrics["weight_mean"].item() == pytest.approx(expected_mean)


def test_identity_hooks_equal_no_hooks():
    logp, old, adv, mask, _, _ = random_batch(4)
    cfg = LossConfig(eps_high=0.28)
    a = logp.clone().requires_grad_()
    b = logp.clone().requires_grad_()
    plain, _ = policy_loss(a, old, adv, mask, cfg)
    hooked, _ = policy_loss(b, old, adv, mask, cfg, ratio_transform=lambda d, m: d,
                            token_weight=lambda A, d, m: torch.ones_like(A))
    plain.backward()
    hooked.backward()
    assert hooked.item() == plain.item()
    assert torch.equal(a.grad, b.grad)


def test_token_weight_gets_no_gradient():
    logp, old, adv, mask, _, _ = random_batch(5)
    cfg = LossConfig(eps_high=0.28)
    seen = {}

    def weight(A, d, m):
        seen["requires_grad"] = d.requires_grad
        seen["grad_enabled"] = torch.is_grad_enabled()
        return torch.exp(d)

    a = logp.clone().requires_grad_()
    loss, _ = policy_loss(a, old, adv, mask, cfg, token_weight=weight)
    loss.backward()
    assert seen == {"requires_grad": False, "grad_enabled": False}
    # The same loss with A·f precomputed as a constant has the same gradient.
    b = logp.clone().requires_grad_()
    const, _ = policy_loss(b, old, adv * torch.exp(logp - old), mask, cfg)
    const.backward()
    assert loss.item() == pytest.approx(const.item(), rel=1e-12)
    assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def test_ratio_transform_carries_the_gradient():
    # Δ' = 2Δ is the same as evaluating the plain loss at log π' = old + 2Δ, whose gradient
    # with respect to log π is twice the plain gradient at log π'.
    logp, old, adv, mask, _, _ = random_batch(6)
    cfg = LossConfig(eps_high=0.28, dual_clip=None)
    a = logp.clone().requires_grad_()
    hooked, metrics = policy_loss(a, old, adv, mask, cfg, ratio_transform=lambda d, m: 2 * d)
    hooked.backward()
    b = (old + 2 * (logp - old)).requires_grad_()
    plain, plain_metrics = policy_loss(b, old, adv, mask, cfg)
    plain.backward()
    assert hooked.item() == pytest.approx(plain.item(), rel=1e-12)
    assert torch.allclose(a.grad, 2 * b.grad, rtol=1e-10)
    assert metrics["ratio_mean"].item() == pytest.approx(plain_metrics["ratio_mean"].item())


def test_kl_and_entropy_metrics():
    logp = torch.tensor([[-1.0, -2.0, -5.0]])
    ref = torch.tensor([[-2.0, -2.0, 0.0]])
    ent = torch.tensor([[0.5, 1.5, 100.0]])
    mask = torch.tensor([[True, True, False]])
    _, m = policy_loss(logp, logp, torch.zeros(1, 3), mask, LossConfig(kl_coef=0.1), ref_logprobs=ref, entropy=ent)
    assert m["kl"].item() == pytest.approx((math.exp(-1) + 1 - 1 + 0.0) / 2)  # k3 at x = 1 and x = 0
    assert m["entropy"].item() == pytest.approx(1.0)


def test_token_entropy():
    # uniform over V: log V
    assert torch.allclose(token_entropy(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    logits = torch.randn(4, 5, 11, dtype=torch.float64)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(token_entropy(logits), expected, rtol=1e-12)
    # huge logits stay finite; −inf logits are allowed: [0, 0, −inf] has entropy log 2
    assert torch.isfinite(token_entropy(torch.tensor([[[1e4, -1e4, 3e4]]]))).all()
    masked = token_entropy(torch.tensor([[[0.0, 0.0, float("-inf")]]]))
    assert masked.item() == pytest.approx(math.log(2))
    # half precision is computed in float32
    assert token_entropy(torch.zeros(1, 1, 4, dtype=torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize(
    "bad",
    [{"eps_low": -0.1}, {"eps_low": 1.01}, {"eps_high": -0.1}, {"dual_clip": 1.0}, {"norm_length": 0},
     {"kl_coef": -1.0}, {"agg": "mean"}, {"kl_estimator": "k4"}, {"clip": 0.2}],
)
def test_loss_config_rejects(bad):
    with pytest.raises(ValidationError):
        LossConfig(**bad)
