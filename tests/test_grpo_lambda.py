"""GRPO-λ's traces and weights against weight matrices built by plain loops, hand-worked numbers and a short
training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from factories import make_rollouts as rollouts

from creditrl.configure import load_config
from creditrl.methods import compute_advantages, get_method, loss_hooks
from creditrl.methods.grpo_lambda import TraceParams, TraceWeightParams, grpo_lambda_trace, grpo_lambda_weight
from creditrl.methods.loss import LossConfig, policy_loss
from creditrl.trainer import Trainer


# ---- independent references ------------------------------------------------------------------
def ref_w(T: int, decay: float, style: str) -> list[list[float]]:
    """W[t][k] = w(t, k) for k ≤ t, else 0, filled entry by entry (Python floats)."""
    W = [[0.0] * T for _ in range(T)]
    for t in range(T):
        for k in range(t + 1):
            W[t][k] = decay ** (t - k) if style == "recent" else max(decay ** (t - k), decay**k)
    return W


def ref_trace(delta: torch.Tensor, mask: torch.Tensor, decay: float, style: str) -> torch.Tensor:
    """z_t = Σ_{k≤t} w(t, k)·Δ_k·m_k as a product with the loop-built W; differentiable in delta."""
    z = (delta * mask) @ torch.tensor(ref_w(delta.shape[1], decay, style), dtype=torch.float64).T
    return z * mask


def ref_weight(mask: torch.Tensor, decay: float, style: str, normalize: bool) -> torch.Tensor:
    """c_k = Σ_{t≥k} w(t, k)·m_t with loops over b, k, t; optionally divided by the row's mean over its tokens."""
    B, T = mask.shape
    W, m = ref_w(T, decay, style), mask.tolist()
    out = []
    for b in range(B):
        row = [sum(W[t][k] for t in range(k, T) if m[b][t]) if m[b][k] else 0.0 for k in range(T)]
        n = sum(m[b])
        if normalize and n:
            mean = sum(row) / n
            row = [c / mean for c in row]
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def random_case(seed: int, B: int, T: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.1)
    return 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64), mask


CASES = [(0, 3, 9, 1.0, 0.5), (1, 4, 40, 1.0, 0.99), (2, 2, 300, 0.9, 0.99), (3, 5, 17, 1.0, 1.0),
         (4, 3, 33, 1.0, 0.0), (5, 2, 260, 0.95, 0.7)]


# ---- the traced ratio ------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["recent", "both"])
@pytest.mark.parametrize("seed,B,T,gamma,lam", CASES)
def test_trace_matches_loop_reference(style, seed, B, T, gamma, lam):
    delta, mask = random_case(seed, B, T)
    params = TraceParams(lam=lam, gamma=gamma, trace_style=style)
    expected = ref_trace(delta, mask, gamma * lam, style)
    torch.testing.assert_close(grpo_lambda_trace(delta, mask, params), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grpo_lambda_trace(delta.float(), mask, params).double(), expected, rtol=1e-4, atol=1e-4)


def test_recent_with_zero_decay_is_the_plain_log_ratio():
    delta, mask = random_case(9, 4, 50)
    z = grpo_lambda_trace(delta, mask, TraceParams(lam=0.0))
    assert torch.equal(z, torch.where(mask, delta, 0.0))


def test_hand_worked_three_tokens():
    # d = γλ = 0.5, Δ = [0.2, −0.4, 0.8]
    # recent: z_0 = 0.2, z_1 = −0.4 + 0.5·0.2 = −0.3, z_2 = 0.8 + 0.5·(−0.3) = 0.65
    # both, w(t, k) = max(0.5^(t−k), 0.5^k):
    #   z_0 = 1·0.2 = 0.2;  z_1 = 1·0.2 + 1·(−0.4) = −0.2;  z_2 = 1·0.2 + 0.5·(−0.4) + 1·0.8 = 0.8
    delta, mask = torch.tensor([[0.2, -0.4, 0.8]]), torch.ones(1, 3, dtype=torch.bool)
    recent = grpo_lambda_trace(delta, mask, TraceParams(lam=0.5))
    both = grpo_lambda_trace(delta, mask, TraceParams(lam=0.5, trace_style="both"))
    torch.testing.assert_close(recent, torch.tensor([[0.2, -0.3, 0.65]]))
    torch.testing.assert_close(both, torch.tensor([[0.2, -0.2, 0.8]]))


def test_long_sequence_float32_is_finite():
    T = 32768
    delta = 0.05 * torch.randn(1, T, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, T, dtype=torch.bool)
    for style in ("recent", "both"):
        for lam in (0.99, 1.0):
            assert torch.isfinite(grpo_lambda_trace(delta, mask, TraceParams(lam=lam, trace_style=style))).all()
    # lam = 1, gamma = 1: both styles are the plain running sum of Δ
    running = delta.double().cumsum(1)
    both = grpo_lambda_trace(delta, mask, TraceParams(lam=1.0, trace_style="both")).double()
    torch.testing.assert_close(both, running, rtol=0, atol=1e-3)


@pytest.mark.parametrize("style", ["recent", "both"])
def test_gradient_flows_through_the_trace(style):
    delta, mask = random_case(11, 3, 7)
    delta.requires_grad_()
    params = TraceParams(lam=0.8, gamma=0.9, trace_style=style)
    assert torch.autograd.gradcheck(lambda d: grpo_lambda_trace(d, mask, params), (delta,))

    # d loss / d logprobs through the whole surrogate equals the one through the loop-built trace
    delta, mask = random_case(12, 3, 270)
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 270, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 1, generator=g, dtype=torch.float64).expand(3, 270) * mask
    cfg = LossConfig(agg="seq-mean-token-mean")
    grads = []
    for transform in (lambda d, m: grpo_lambda_trace(d, m, params), lambda d, m: ref_trace(d, m, 0.72, style)):
        logprobs = (old + 0.05 * delta).requires_grad_()
        loss, _ = policy_loss(logprobs, old, adv, mask, cfg, ratio_transform=transform)
        grads.append(torch.autograd.grad(loss, logprobs)[0])
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


# ---- the ε-weight variant --------------------------------------------------------------------
@pytest.mark.parametrize("style", ["recent", "both"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seed,B,T,gamma,lam", CASES[:4] + CASES[5:])
def test_weight_matches_loop_reference(style, normalize, seed, B, T, gamma, lam):
    delta, mask = random_case(seed, B, T)
    params = TraceWeightParams(lam=lam, gamma=gamma, trace_style=style, weight_normalize=normalize)
    got = grpo_lambda_weight(torch.ones_like(delta), delta, mask, params)
    torch.testing.assert_close(got, ref_weight(mask, gamma * lam, style, normalize), rtol=1e-9, atol=1e-9)


def test_weight_hand_worked_three_tokens():
    # d = 0.5, three real tokens, c_k = Σ_{t≥k} w(t, k):
    #   recent: c = [1 + 0.5 + 0.25, 1 + 0.5, 1] = [1.75, 1.5, 1], mean 4.25/3 → [1.235294, 1.058824, 0.705882]
    #   both:   c = [1 + 1 + 1, 1 + max(0.5, 0.5), 1] = [3, 1.5, 1], mean 5.5/3 → [1.636364, 0.818182, 0.545455]
    mask, zeros = torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3)
    recent = grpo_lambda_weight(zeros, zeros, mask, TraceWeightParams(lam=0.5))
    both = grpo_lambda_weight(zeros, zeros, mask, TraceWeightParams(lam=0.5, trace_style="both"))
    torch.testing.assert_close(recent, torch.tensor([[1.235294, 1.058824, 0.705882]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(both, torch.tensor([[1.636364, 0.818182, 0.545455]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("style", ["recent", "both"])
def test_unnormalised_weights_give_the_trace_gradient_on_policy(style):
    delta, mask = random_case(13, 4, 60)
    old = -torch.rand(4, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    adv = torch.tensor([[1.0], [-0.1], [0.5], [-0.1]], dtype=torch.float64).expand(4, 60) * mask
    cfg = LossConfig(agg="seq-mean-token-mean")
    trace = TraceParams(trace_style=style)
    weight = TraceWeightParams(trace_style=style, weight_normalize=False)
    grads = []
    for hooks in ({"ratio_transform": lambda d, m: grpo_lambda_trace(d, m, trace)},
                  {"token_weight": lambda a, d, m: grpo_lambda_weight(a, d, m, weight)}):
        logprobs = old.clone().requires_grad_()  # π_θ = π_old
        loss, _ = policy_loss(logprobs, old, adv, mask, cfg, **hooks)
        grads.append(torch.autograd.grad(loss, logprobs)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


# ---- the advantage and the methods -----------------------------------------------------------
def test_advantage_is_grpo_clamped_below():
    # group [1, 0, 0, 0]: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5 → A = [1.5, −0.5, −0.5, −0.5]
    r = rollouts([1.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0, 0, 0, 0, 1, 1], [3, 3, 2, 1, 3, 3], T=3)
    adv = compute_advantages("grpo_lambda", r)
    # second group [0, 1]: std sqrt(0.5) → A = ∓0.5/0.7071 = ∓0.7071, clamped to −0.1 below
    expected = [1.5, -0.1, -0.1, -0.1, -0.1, 0.5 / math.sqrt(0.5)]
    assert adv[:, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.all(adv[~r.response_mask] == 0)
    raw = compute_advantages("grpo_lambda", r, {"adv_clamp": None})
    assert raw[:, 0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, -0.5 / math.sqrt(0.5), 0.5 / math.sqrt(0.5)],
                                               abs=1e-5)


def test_methods_and_defaults():
    trace, weight = get_method("grpo_lambda"), get_method("grpo_lambda_weight")
    assert (trace.advantage, trace.ratio_transform, trace.token_weight) == (
        "grpo_lambda", "grpo_lambda_trace", None)
    assert (weight.advantage, weight.ratio_transform, weight.token_weight) == (
        "grpo_lambda", None, "grpo_lambda_weight")
    cfg = load_config(None, ["method=grpo_lambda"])
    assert cfg.loss.agg == "seq-mean-token-mean"
    assert cfg.method_params == {"eps": 1e-6, "scale_by_std": True, "adv_clamp": -0.1, "lam": 0.99, "gamma": 1.0,
                                 "trace_style": "recent"}
    transform, token_weight = loss_hooks("grpo_lambda", {"trace_style": "both", "lam": 0.5})
    assert token_weight is None
    torch.testing.assert_close(transform(torch.tensor([[0.2, -0.4, 0.8]]), torch.ones(1, 3, dtype=torch.bool)),
                               torch.tensor([[0.2, -0.2, 0.8]]))


@pytest.mark.parametrize("method,extra", [("grpo_lambda", []),
                                          ("grpo_lambda_weight", ["method_params.trace_style=both"])])
def test_trains_a_few_steps(tiny_lab_model_dir, tmp_path, method, extra):
    run = tmp_path / "run"
    cfg = load_config(None, [f"method={method}", f"model.name={tiny_lab_model_dir}", f"output.dir={run}",
                             "train.steps=2",
                             "rollout.prompts_per_step=3", "rollout.group_size=4", "task.lab.eval_size=4",
                             "task.lab.train_size=50", "eval.k=1", "eval.before=false", "sampling.max_new_tokens=16",
                             "train.lr=1e-3", "train.n_minibatches=2",
                             "reward.overlong_max=10", "reward.overlong_buffer=6", *extra])
    Trainer(cfg, show_progress=False).train()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["skipped"] == 0.0 for r in records)
    for r in records:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    assert any(r["approx_kl"] > 0 for r in records)  # Δ ≠ 0 in the second minibatch


def test_the_trace_sums_log_ratios_clamped_to_twenty():
    # Δ = [−25, −25, 0] with γλ = 1 (`recent`): by hand the trace is [−20, −40, −40] once each Δ is clamped
    # to −20 before the transform; the raw Δ would give [−25, −50, −50], 10 further at the end.
    logp = torch.tensor([[-25.0, -25.0, 0.0]], dtype=torch.float64)
    transform, _ = loss_hooks("grpo_lambda", {"lam": 1.0, "gamma": 1.0})
    seen = {}

    def recording(delta, mask):
        seen["trace"] = transform(delta, mask)
        return seen["trace"]

    policy_loss(logp, torch.zeros_like(logp), torch.ones_like(logp), torch.ones_like(logp, dtype=torch.bool),
                LossConfig(), ratio_transform=recording)
    assert seen["trace"].tolist() == [[-20.0, -40.0, -40.0]]
