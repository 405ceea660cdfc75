"""FIPO's influence weights against slow float64 loops written here, hand-worked numbers and a short training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from factories import make_rollouts as rollouts

from creditrl.configure import load_config
from creditrl.methods import Method, compute_advantages, get_method, loss_hooks, resolve_method
from creditrl.methods.fipo import FIPOParams, discounted_cumsum, fipo_weight
from creditrl.methods.loss import LossConfig, policy_loss
from creditrl.trainer import Trainer


# ---- independent references ------------------------------------------------------------------
def ref_discounted(x: list[list[float]], decay: float, reverse: bool) -> list[list[float]]:
    """y_t = Σ_{k≤t} decay^(t−k) x_k (or Σ_{k≥t} decay^(k−t) x_k), a double loop per row."""
    out = []
    for row in x:
        n = len(row)
        if reverse:
            out.append([sum(decay ** (k - t) * row[k] for k in range(t, n)) for t in range(n)])
        else:
            out.append([sum(decay ** (t - k) * row[k] for k in range(t + 1)) for t in range(n)])
    return out


def ref_fipo(adv, delta, mask, tau=32.0, c=10.0, mode="high_only", rho_low=0.2, rho_high=0.2, safety=10.0, drop=True):
    """methods.md §7 read literally, with loops over b, t, k in Python floats (float64): the weights, and
    which tokens stay in the loss (a dropped response leaves it, as in the official code)."""
    gamma = 2.0 ** (-1.0 / tau)
    low = 1.0 if mode == "high_only" else 1.0 - rho_low
    out, keep = [], []
    for b in range(len(delta)):
        n = len(delta[b])
        row = []
        for t in range(n):
            future = 0.0
            for k in range(t, n):
                if mask[b][k] and math.exp(delta[b][k]) <= c:
                    future += gamma ** (k - t) * delta[b][k]
            f = min(max(math.exp(future), low), 1.0 + rho_high)
            if adv[b][t] < 0 and math.exp(delta[b][t]) > safety:
                f = min(max(f, 0.8), 1.0)
            row.append(f)
        exploded = sum(1 for k in range(n) if mask[b][k] and adv[b][k] < 0 and math.exp(delta[b][k]) > c)
        if drop and exploded > 1:
            row = [0.0] * n
        out.append(row)
        keep.append([not (drop and exploded > 1)] * n)
    return out, keep


def fipo_f(adv, delta, mask, params):
    """FIPO's weight f alone (with responses that may be dropped it comes back with the keep mask)."""
    out = fipo_weight(adv, delta, mask, params)
    return out[0] if isinstance(out, tuple) else out


def random_case(seed: int, B: int, T: int, holes: bool = True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if holes:  # masked positions inside a response still count as distance
        mask &= torch.rand(B, T, generator=g) > 0.1
    delta = 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    spikes = torch.rand(B, T, generator=g) < 0.05
    delta = torch.where(spikes, 2.0 + 2.0 * torch.rand(B, T, generator=g, dtype=torch.float64), delta)  # r in e^2..e^4
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    return adv, delta, mask


def on_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0)


# ---- the scan --------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [0.0, 0.3, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,chunk", [(1, 2), (5, 2), (37, 4), (64, 8), (70, 256)])
def test_discounted_cumsum_matches_double_loop(decay, reverse, T, chunk):
    x = torch.randn(3, T, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    expected = torch.tensor(ref_discounted(x.tolist(), decay, reverse), dtype=torch.float64)
    torch.testing.assert_close(discounted_cumsum(x, decay, reverse, chunk), expected, rtol=1e-12, atol=1e-12)


def test_discounted_cumsum_empty_and_bad_chunk():
    assert discounted_cumsum(torch.zeros(2, 0), 0.5).shape == (2, 0)
    with pytest.raises(ValueError, match="chunk"):
        discounted_cumsum(torch.zeros(2, 4), 0.5, chunk=1)


# ---- the weight against the loop reference ---------------------------------------------------
@pytest.mark.parametrize(
    "seed,B,T,params",
    [
        (0, 4, 40, FIPOParams()),
        (1, 3, 300, FIPOParams(half_life=8.0)),  # crosses a 256-token chunk
        (2, 5, 33, FIPOParams(half_life=1.0, clip_mode="symmetric")),
        (3, 2, 64, FIPOParams(half_life=1024.0, clip_mode="symmetric", rho_low=0.5, rho_high=0.7,
                              safety_threshold=3.0)),
        (4, 6, 20, FIPOParams(filter_threshold=20.0, drop_exploded_responses=False)),
    ],
)
def test_weight_matches_loop_reference(seed, B, T, params):
    adv, delta, mask = random_case(seed, B, T)
    expected, keep = ref_fipo(adv.tolist(), delta.tolist(), mask.tolist(), params.half_life, params.filter_threshold,
                              params.clip_mode, params.rho_low, params.rho_high, params.safety_threshold,
                              params.drop_exploded_responses)
    got = fipo_f(adv, delta, mask, params)
    out = fipo_weight(adv, delta, mask, params)
    got_keep = out[1] if isinstance(out, tuple) else torch.ones_like(mask)
    assert torch.equal(got_keep & mask, torch.tensor(keep) & mask)
    torch.testing.assert_close(on_mask(got, mask), on_mask(torch.tensor(expected, dtype=torch.float64), mask),
                               rtol=1e-10, atol=1e-10)
    # float32 inputs give the same weights to float32 precision
    got32 = fipo_f(adv.float(), delta.float(), mask, params)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(on_mask(got32.double(), mask), on_mask(got, mask), rtol=1e-5, atol=1e-5)


def test_hand_worked_three_tokens():
    # τ = 1 so γ = 0.5; Δ = [0.1, −0.4, 0.2], all tokens real, A > 0:
    #   F_2 = 0.2,  F_1 = −0.4 + 0.5·0.2 = −0.3,  F_0 = 0.1 + 0.5·(−0.3) = −0.05
    #   exp(F) = [0.951229, 0.740818, 1.221403]
    #   symmetric [0.8, 1.2]: [0.951229, 0.8, 1.2];  high-only [1, 1.2]: [1.0, 1.0, 1.2]
    adv, delta, mask = torch.ones(1, 3), torch.tensor([[0.1, -0.4, 0.2]]), torch.ones(1, 3, dtype=torch.bool)
    sym = fipo_f(adv, delta, mask, FIPOParams(half_life=1.0, clip_mode="symmetric"))
    high = fipo_f(adv, delta, mask, FIPOParams(half_life=1.0))
    torch.testing.assert_close(sym, torch.tensor([[0.951229, 0.8, 1.2]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(high, torch.tensor([[1.0, 1.0, 1.2]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["high_only", "symmetric"])
def test_weight_is_one_on_policy(mode):
    adv, _, mask = random_case(7, 4, 50)
    weight = fipo_f(adv, torch.zeros(4, 50, dtype=torch.float64), mask, FIPOParams(clip_mode=mode))
    assert torch.all(weight[mask] == 1.0)


def test_filter_excludes_exploded_tokens():
    # τ = 1 (γ = 0.5), symmetric clip wide enough to read F: token 1 has r = e^3 ≈ 20 > c = 10
    params = FIPOParams(half_life=1.0, clip_mode="symmetric", rho_low=0.99, rho_high=100.0)
    adv, mask = torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool)
    weight = fipo_f(adv, torch.tensor([[0.1, 3.0, 0.2]]), mask, params)
    # without the exploded token: F = [0.1 + 0.25·0.2, 0.5·0.2, 0.2] = [0.15, 0.1, 0.2]
    torch.testing.assert_close(weight, torch.tensor([[0.15, 0.1, 0.2]]).exp(), atol=1e-6, rtol=0)
    # r exactly c (Δ = log c) stays in the sum: M_k = 1[Δ_k ≤ log c]
    at_c = fipo_f(adv, torch.tensor([[0.0, math.log(10.0), 0.0]], dtype=torch.float64), mask.clone(), params)
    assert at_c[0, 0].item() == pytest.approx(math.exp(0.5 * math.log(10.0)))


def test_safety_clamp():
    params = FIPOParams(half_life=1.0, safety_threshold=3.0)  # the 7B recipe's threshold
    mask = torch.ones(4, 2, dtype=torch.bool)
    delta = torch.tensor([[math.log(4.0), 0.0]] * 2 + [[math.log(2.0), 0.0]] * 2)  # r = 4 (> 3) or 2 (< 3)
    adv = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]])
    weight = fipo_f(adv, delta, mask, params)
    # F_0 = log 4 or log 2 > 0, so exp(F_0) > 1.2 and high-only gives 1.2; the clamp to [0.8, 1]
    # hits only the negative-advantage token whose ratio is above the threshold.
    assert weight[:, 0].tolist() == pytest.approx([1.0, 1.2, 1.2, 1.2])
    assert weight[:, 1].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    # symmetric mode with F < 0 below 0.8 is lifted to 0.8 by the safety clamp
    sym = FIPOParams(half_life=1.0, safety_threshold=3.0, clip_mode="symmetric", rho_low=0.5)
    low = fipo_f(torch.tensor([[-1.0, -1.0]]), torch.tensor([[math.log(4.0), -4.0]]),
                      torch.ones(1, 2, dtype=torch.bool), sym)
    # F_0 = log 4 − 0.5·4 = −0.614 → exp = 0.541, clip [0.5, 1.2] keeps it, safety lifts it to 0.8;
    # F_1 = −4 → exp = 0.018 → 0.5 (r = e^−4 < 3: no safety clamp)
    assert low[0].tolist() == pytest.approx([0.8, 0.5], abs=1e-6)


def test_whole_response_drop():
    big = math.log(20.0)  # r = 20 > c = 10
    delta = torch.tensor([[big, 0.1, big, 0.1], [big, 0.1, 0.1, 0.1], [big, 0.1, big, 0.1], [big, 0.1, 0.0, big]])
    adv = torch.tensor([[-1.0] * 4, [-1.0] * 4, [1.0] * 4, [-1.0] * 4])
    mask = torch.tensor([[True] * 4, [True] * 4, [True] * 4, [True, True, True, False]])
    weight, keep = fipo_weight(adv, delta, mask, FIPOParams())
    assert torch.all(weight[0] == 0) and not keep[0].any()  # two exploded negative-advantage tokens: dropped
    assert keep[1:].all()
    assert torch.all(weight[1] > 0)  # only one
    assert torch.all(weight[2] > 0)  # positive advantage
    assert torch.all(weight[3] > 0)  # the second one is padding
    kept = fipo_f(adv, delta, mask, FIPOParams(drop_exploded_responses=False))
    assert torch.all(kept[0] > 0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_a_dropped_response_leaves_the_loss_and_its_denominator(agg):
    """As the official code takes it out of the loss mask: with f = 0 alone its tokens would still count in
    the token mean, halving the other row's loss here."""
    big = math.log(20.0)  # r = 20 > c = 10: two such negative-advantage tokens drop row 1
    old = torch.zeros(2, 8, dtype=torch.float64)
    logprobs = torch.tensor([[0.05] * 8, [big, big] + [0.0] * 6], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0] * 8, [-1.0] * 8], dtype=torch.float64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    cfg = LossConfig(eps_high=0.28, dual_clip=10.0, agg=agg)
    _, weight_hook = loss_hooks(Method("f", advantage="grpo", token_weight="fipo"), {})
    loss, metrics = policy_loss(logprobs, old, adv, mask, cfg, token_weight=weight_hook)
    # row 0 alone, weighted by the loop reference (its Δ = 0.05 everywhere, A > 0)
    row0_w, _ = ref_fipo(adv[:1].tolist(), (logprobs - old)[:1].tolist(), mask[:1].tolist())
    alone, _ = policy_loss(logprobs[:1], old[:1], adv[:1] * torch.tensor(row0_w, dtype=torch.float64), mask[:1], cfg)
    torch.testing.assert_close(loss, alone)
    # the metrics still see the dropped row: its exploded ratios and its f = 0
    assert metrics["ratio_mean"].item() == pytest.approx((8 * math.exp(0.05) + 2 * 20 + 6) / 16)
    assert metrics["weight_mean"].item() == pytest.approx(sum(row0_w[0]) / 16)


@pytest.mark.parametrize("tau", [1.0, 1024.0])
def test_long_sequence_float32_is_finite_and_exact(tau):
    T, gamma = 32768, 2.0 ** (-1.0 / tau)
    g = torch.Generator().manual_seed(int(tau))
    delta = 0.05 * torch.randn(2, T, generator=g)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 20000:] = False
    # reference: F_t = m_t·M_t·Δ_t + γ·F_{t+1}, in Python floats (float64), no chunks
    expected = []
    for row, row_mask in zip(delta.double().tolist(), mask.tolist()):
        acc, col = 0.0, [0.0] * T
        for t in range(T - 1, -1, -1):
            acc = (row[t] if row_mask[t] and row[t] <= math.log(10.0) else 0.0) + gamma * acc
            col[t] = acc
        expected.append(col)
    expected = torch.tensor(expected, dtype=torch.float64)
    params = FIPOParams(half_life=tau, clip_mode="symmetric", rho_low=0.999, rho_high=1e6)  # clip never binds
    weight = fipo_f(torch.ones(2, T), delta, mask, params)
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
    torch.testing.assert_close(on_mask(weight.double(), mask), on_mask(expected.exp(), mask), rtol=2e-5, atol=0)


# ---- the method ------------------------------------------------------------------------------
def test_fipo_method_defaults_are_dapo_with_dual_clip_10():
    cfg = load_config(None, ["method=fipo"])
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.dual_clip, cfg.loss.agg) == (0.2, 0.28, 10.0, "token-mean")
    assert (cfg.reward.correct, cfg.reward.wrong, cfg.rollout.dynamic_sampling) == (1.0, -1.0, True)
    assert cfg.method_params == {"eps": 1e-6, "scale_by_std": True, "half_life": 32.0, "filter_threshold": 10.0,
                                 "clip_mode": "high_only", "rho_low": 0.2, "rho_high": 0.2, "safety_threshold": 10.0,
                                 "drop_exploded_responses": True}
    method = get_method("fipo")
    assert (method.advantage, method.ratio_transform, method.token_weight) == ("grpo", None, "fipo")


def test_fipo_combines_with_any_base_advantage():
    # RLOO advantages: group [1, 0, 0] → [1 − 0, 0 − 0.5, 0 − 0.5] = [1, −0.5, −0.5]; group [1, 1] → [0, 0]
    r = rollouts([1.0, 0.0, 0.0, 1.0, 1.0], [0, 0, 0, 1, 1], [4, 3, 2, 4, 1], T=4)
    method = Method("rloo_fipo", advantage="rloo", token_weight="fipo")
    adv = compute_advantages(method, r, {"half_life": 2.0})
    assert adv[:, 0].tolist() == [1.0, -0.5, -0.5, 0.0, 0.0]
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(5, 4, generator=g, dtype=torch.float64)
    logprobs = (old + 0.2 * torch.randn(5, 4, generator=g, dtype=torch.float64)).requires_grad_()
    _, weight_hook = loss_hooks(method, {"half_life": 2.0})
    cfg = LossConfig(eps_high=0.28, dual_clip=10.0)
    loss, metrics = policy_loss(logprobs, old, adv, r.response_mask, cfg, token_weight=weight_hook)
    # the same loss from advantages pre-multiplied by the loop reference's weights
    expected_w, keep = ref_fipo(adv.tolist(), (logprobs - old).tolist(), r.response_mask.tolist(), tau=2.0)
    loss_ref, _ = policy_loss(logprobs, old, adv * torch.tensor(expected_w, dtype=torch.float64),
                              r.response_mask & torch.tensor(keep), cfg)
    torch.testing.assert_close(loss, loss_ref)
    assert metrics["weight_mean"].item() != 1.0


def test_config_warning():
    """FIPO's weight reads Δ, which is 0 when every update is on-policy; the method says so, composed or named."""
    def warnings(*overrides):
        cfg = load_config(None, [*overrides])
        return resolve_method(cfg.method).warnings(cfg)

    assert any("base method" in w for w in warnings("method=fipo", "train.n_minibatches=1"))
    assert any("base method" in w for w in warnings("method.advantage=rloo", "method.token_weight=fipo"))
    assert warnings("method=fipo", "train.ppo_epochs=2", "train.n_minibatches=1") == []
    assert warnings("method=fipo", "train.n_minibatches=8") == []
    assert warnings("method=grpo") == []


def test_fipo_trains_and_its_weights_move(tiny_lab_model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, ["method=fipo", f"model.name={tiny_lab_model_dir}", f"output.dir={run}", "train.steps=3",
                             "rollout.prompts_per_step=3", "rollout.group_size=4", "task.lab.eval_size=4",
                             "task.lab.train_size=50", "eval.k=1", "eval.before=false", "sampling.max_new_tokens=16",
                             "train.lr=1e-3", "train.n_minibatches=2", "train.ppo_epochs=2",
                             # nothing is correct yet: overlong shaping gives the groups reward spread
                             "reward.overlong_max=10", "reward.overlong_buffer=6"])
    Trainer(cfg, show_progress=False).train()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["skipped"] == 0.0 for r in records)
    for r in records:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    assert any(abs(r["weight_mean"] - 1.0) > 1e-6 for r in records)


def test_a_log_ratio_below_minus_twenty_is_clamped_before_the_weight_sees_it():
    # Δ = [0, −25, 2.1 × 10] at τ = 10⁶ (γ ≈ 1), symmetric [0.8, 1.2], A > 0: by hand, with Δ clamped to
    # −20 first (as the official code), F_0 = 0 − 20 + 21 = 1 and f_0 = clip(e¹) = 1.2; the raw −25 would give
    # F_0 = −4 and f_0 = 0.8.  F_1 = −20 + 21 = 1 too; F_2 = 21 → 1.2 (2.1 < log 10, so no token is filtered).
    delta = torch.tensor([[0.0, -25.0] + [2.1] * 10], dtype=torch.float64)
    old = torch.zeros_like(delta)
    mask = torch.ones_like(delta, dtype=torch.bool)
    _, weight_hook = loss_hooks(Method("f", advantage="grpo", token_weight="fipo"),
                                {"half_life": 1e6, "clip_mode": "symmetric", "drop_exploded_responses": False})
    seen = {}

    def recording(advantages, d, m):
        seen["delta"], seen["weight"] = d, weight_hook(advantages, d, m)
        return seen["weight"]

    policy_loss(delta, old, torch.ones_like(delta), mask, LossConfig(), token_weight=recording)
    assert seen["delta"][0, 1].item() == -20.0
    assert seen["weight"][0, 0].item() == pytest.approx(1.2)
    assert seen["weight"][0, 1].item() == pytest.approx(1.2)
