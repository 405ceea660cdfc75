"""GSPO, CISPO and SAPO against float64 loops written here, hand-worked numbers, and TRL's and verl's own losses.

TRL's `GRPOTrainer._compute_loss` runs unbound on a stand-in trainer that hands it the test's log-probs; verl's
losses come from its policy-loss registry.  Both compare value and gradient on the same tensors.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from creditrl.configure import load_config
from creditrl.methods import get_method, loss_hooks, loss_surrogate, method_params_model, resolve_method
from creditrl.methods.loss import LossConfig, policy_loss


# ---- independent references ------------------------------------------------------------------
def row_scale(mask, agg):
    """The weight of each token in the aggregate: 1/(rows·L_i) (seq-mean-token-mean) or 1/tokens (token-mean)."""
    rows = [sum(r) for r in mask]
    if agg == "token-mean":
        return [[1.0 / sum(rows)] * len(r) for r in mask]
    non_empty = sum(1 for n in rows if n)
    return [[1.0 / (non_empty * n) if n else 0.0] * len(r) for r, n in zip(mask, rows)]


def ref_gspo(logp, old, adv, mask, eps_low, eps_high, agg="seq-mean-token-mean"):
    """GSPO-token read from the paper: s_i = exp(mean of the row's Δ); ℓ_t = max(−A s, −A clip(s)); dℓ_t/d log π_t
    is −A·s where the unclipped branch counts (inside the range, or the side the max keeps), else 0."""
    scale = row_scale(mask, agg)
    value, grad = 0.0, [[0.0] * len(r) for r in logp]
    for i in range(len(logp)):
        toks = [t for t in range(len(logp[i])) if mask[i][t]]
        if not toks:
            continue
        s = math.exp(sum(logp[i][t] - old[i][t] for t in toks) / len(toks))
        c = min(max(s, 1 - eps_low), 1 + eps_high)
        for t in toks:
            a = adv[i][t]
            value += scale[i][t] * max(-a * s, -a * c)
            live = (1 - eps_low <= s <= 1 + eps_high) or (a > 0 and s < 1 - eps_low) or (a < 0 and s > 1 + eps_high)
            grad[i][t] = scale[i][t] * (-a * s if live else 0.0)
    return value, grad


def ref_cispo(logp, old, adv, mask, eps_low, eps_high, agg="token-mean"):
    """ℓ_t = −w·A·log π with w = clip(r, 1 − ε_low, 1 + ε_high) held constant: dℓ_t/d log π_t = −w·A."""
    scale = row_scale(mask, agg)
    value, grad = 0.0, [[0.0] * len(r) for r in logp]
    for i in range(len(logp)):
        for t in range(len(logp[i])):
            if mask[i][t]:
                w = min(max(math.exp(logp[i][t] - old[i][t]), 1 - eps_low), 1 + eps_high)
                value += scale[i][t] * -w * adv[i][t] * logp[i][t]
                grad[i][t] = scale[i][t] * -w * adv[i][t]
    return value, grad


def ref_sapo(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean"):
    """ℓ_t = −(4/τ)σ(τ(r − 1))·A; dℓ_t/d log π_t = −4σ(1 − σ)·r·A (σ' = σ(1 − σ), dr/d log π = r)."""
    scale = row_scale(mask, agg)
    value, grad = 0.0, [[0.0] * len(r) for r in logp]
    for i in range(len(logp)):
        for t in range(len(logp[i])):
            if mask[i][t]:
                a, r = adv[i][t], math.exp(logp[i][t] - old[i][t])
                tau = tau_pos if a > 0 else tau_neg
                sig = 1.0 / (1.0 + math.exp(-tau * (r - 1.0)))
                value += scale[i][t] * -(4.0 / tau) * sig * a
                grad[i][t] = scale[i][t] * -4.0 * sig * (1 - sig) * r * a
    return value, grad


def batch(seed, spread=0.5, n_rows=6, width=8, per_token_adv=True, dtype=torch.float64):
    """Log-probs, old log-probs, advantages and a ragged mask (every row ≥ 1 token); the last row moves little
    (Δ of order 1e-4, inside GSPO's clip range)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (n_rows,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    old = -torch.rand(n_rows, width, generator=gen, dtype=dtype) * 3 - 0.1
    delta = spread * torch.randn(n_rows, width, generator=gen, dtype=dtype)
    delta[-1] = 1e-4 * torch.randn(width, generator=gen, dtype=dtype)
    logp = old + delta
    adv = (torch.randn(n_rows, width, generator=gen, dtype=dtype) if per_token_adv
           else torch.randn(n_rows, 1, generator=gen, dtype=dtype).expand(n_rows, width).clone())
    return logp, old, adv * mask, mask


def ours(method, logp, old, adv, mask, cfg, params=None, entropy=None):
    """creditrl's loss with the method's hooks: (value, gradient with respect to log π)."""
    ratio_transform, token_weight = loss_hooks(method, params)
    logp = logp.clone().requires_grad_()
    loss, metrics = policy_loss(logp, old, adv, mask, cfg, ratio_transform=ratio_transform, token_weight=token_weight,
                                surrogate=loss_surrogate(method, params), entropy=entropy)
    grad, = torch.autograd.grad(loss, logp)
    return loss, grad, metrics


def published(method: str) -> LossConfig:
    """The method's `loss` section with its published defaults."""
    return load_config(None, [f"method={method}"]).loss


# ---- the registered methods ------------------------------------------------------------------------
def test_methods_carry_their_pieces_and_published_defaults():
    gspo, cispo, sapo = (load_config(None, [f"method={m}"]) for m in ("gspo", "cispo", "sapo"))
    assert (gspo.loss.eps_low, gspo.loss.eps_high, gspo.loss.dual_clip, gspo.loss.agg) == (
        3e-4, 4e-4, None, "seq-mean-token-mean")
    assert gspo.train.n_minibatches == 4
    assert (cispo.loss.eps_low, cispo.loss.eps_high, cispo.loss.agg) == (1.0, 4.0, "token-mean")
    assert sapo.loss.agg == "seq-mean-token-mean"
    assert method_params_model("sapo")().model_dump() == {"eps": 1e-6, "scale_by_std": True, "tau_pos": 1.0,
                                                          "tau_neg": 1.05}
    assert get_method("sapo").policy_loss == "sapo"
    assert get_method("gspo").ratio_transform == "gspo" and get_method("cispo").policy_loss == "cispo"


def test_a_policy_loss_composes_with_any_advantage_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method:\n  advantage: rloo\n  policy_loss: cispo\n")
    cfg = load_config(path)
    method = resolve_method(cfg.method)
    assert (method.advantage, method.policy_loss, cfg.method_name) == ("rloo", "cispo", "rloo+cispo")
    assert loss_surrogate(cfg.method) is not None
    sapo = resolve_method(load_config(None, ["method.advantage=grpo_lambda", "method.policy_loss=sapo",
                                             "method_params.tau_neg=2.0"]).method)
    assert sapo.policy_loss == "sapo"


def test_an_unknown_policy_loss_names_the_known_ones():
    with pytest.raises(Exception, match=r"policy loss 'ppo2'.*cispo.*sapo"):
        load_config(None, ["method.advantage=grpo", "method.policy_loss=ppo2"])


def test_the_default_policy_loss_is_the_clipped_surrogate():
    logp, old, adv, mask = batch(0)
    cfg = LossConfig(eps_high=0.28)
    plain, plain_grad, _ = ours("grpo", logp, old, adv, mask, cfg)
    assert loss_surrogate("grpo") is None
    a = logp.clone().requires_grad_()
    direct, _ = policy_loss(a, old, adv, mask, cfg)
    assert plain.item() == direct.item()
    assert torch.equal(plain_grad, torch.autograd.grad(direct, a)[0])


# ---- hand-worked examples ------------------------------------------------------------------------
def test_gspo_hand_worked():
    # One response, Δ = [0, 4e-4]: s = e^(2e-4) = 1.00020002 inside [1 − 3e-4, 1 + 4e-4], A = [2, −1]:
    # ℓ = (−2s + s)/2 = −s/2 = −0.50010001; GSPO-token: dℓ/d log π_0 = −2s/2 = −s, dℓ/d log π_1 = +s/2.
    # A second response, Δ = [1e-3, 1e-3]: s = e^(1e-3) = 1.0010005 > 1 + 4e-4, A = [1, 1]: clipped,
    # ℓ = −1.0004 and no gradient.  seq-mean-token-mean: loss = (−0.50010001 − 1.0004) / 2.
    old = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]], dtype=torch.float64)
    logp = old + torch.tensor([[0.0, 4e-4], [1e-3, 1e-3]], dtype=torch.float64)
    adv = torch.tensor([[2.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    loss, grad, metrics = ours("gspo", logp, old, adv, torch.ones(2, 2, dtype=torch.bool), published("gspo"))
    s = 1.000200020001333
    assert loss.item() == pytest.approx((-s / 2 - 1.0004) / 2, rel=1e-12)
    assert grad.flatten().tolist() == pytest.approx([-s / 2, s / 4, 0.0, 0.0], rel=1e-12)
    assert metrics["clip_frac"].item() == 0.5


def test_cispo_hand_worked():
    # r = 8, A = 1, log π = −1: w = min(8, 5) = 5, ℓ = −5·1·(−1) = 5, dℓ/d log π = −5.
    # r = 0.5, A = −2, log π = −0.5: no lower bound, w = 0.5, ℓ = −0.5·(−2)·(−0.5) = −0.5, dℓ/d log π = 1.
    # token-mean over the two: 2.25, gradients −2.5 and 0.5; one of the two weights is clipped.
    logp = torch.tensor([[-1.0, -0.5]], dtype=torch.float64)
    old = logp - torch.tensor([[math.log(8.0), math.log(0.5)]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    loss, grad, metrics = ours("cispo", logp, old, adv, torch.ones(1, 2, dtype=torch.bool), published("cispo"))
    assert loss.item() == pytest.approx(2.25, rel=1e-12)
    assert grad.flatten().tolist() == pytest.approx([-2.5, 0.5], rel=1e-12)
    assert metrics["clip_frac"].item() == 0.5


def test_sapo_hand_worked():
    # r = 1 on both tokens: σ(0) = ½.  A = 1 (τ = 1): ℓ = −4·½ = −2, dℓ/d log π = −4·¼ = −1.
    # A = −1 (τ = 1.05): ℓ = (4/1.05)·½ = 1.9047619..., dℓ/d log π = +1.  Mean over the response's two tokens.
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, grad, _ = ours("sapo", logp, logp.clone(), adv, torch.ones(1, 2, dtype=torch.bool), published("sapo"))
    assert loss.item() == pytest.approx((-2.0 + 2.0 / 1.05) / 2, rel=1e-12)
    assert grad.flatten().tolist() == pytest.approx([-0.5, 0.5], rel=1e-12)


def test_sapo_gate_fades_where_the_clip_would_cut():
    # A = 1, r = 1.5 (past 1 + ε = 1.2): the clip gives no gradient, the gate 4σ(½)(1 − σ(½))·1.5 > 0.
    logp = torch.tensor([[math.log(1.5)]], dtype=torch.float64)
    old, adv, mask = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1,
                                                                                                               dtype=bool)
    _, clip_grad, _ = ours("grpo", logp, old, adv, mask, LossConfig())
    _, gate_grad, _ = ours("sapo", logp, old, adv, mask, LossConfig())
    sig = 1 / (1 + math.exp(-0.5))
    assert clip_grad.item() == 0.0
    assert gate_grad.item() == pytest.approx(-4 * sig * (1 - sig) * 1.5, rel=1e-12)


# ---- float64 reference loops ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_matches_reference_loop(seed):
    logp, old, adv, mask = batch(seed, spread=2e-3)
    cfg = published("gspo")
    loss, grad, _ = ours("gspo", logp, old, adv, mask, cfg)
    value, expected = ref_gspo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), cfg.eps_low, cfg.eps_high)
    assert loss.item() == pytest.approx(value, rel=1e-10, abs=1e-14)
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-14)
    assert (grad != 0).any() and ((grad == 0) & mask).any()  # both branches occur


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [(1.0, 4.0), (0.2, 0.28)])
def test_cispo_matches_reference_loop(seed, eps):
    logp, old, adv, mask = batch(seed, spread=1.0)
    cfg = LossConfig(eps_low=eps[0], eps_high=eps[1], agg="token-mean")
    loss, grad, _ = ours("cispo", logp, old, adv, mask, cfg)
    value, expected = ref_cispo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), *eps)
    assert loss.item() == pytest.approx(value, rel=1e-10)
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 3.0)])
def test_sapo_matches_reference_loop(seed, taus):
    logp, old, adv, mask = batch(seed, spread=0.6)
    params = {"tau_pos": taus[0], "tau_neg": taus[1]}
    loss, grad, _ = ours("sapo", logp, old, adv, mask, published("sapo"), params)
    value, expected = ref_sapo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), *taus)
    assert loss.item() == pytest.approx(value, rel=1e-10)
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-14)


def test_policy_losses_combine_with_a_token_weight():
    # f scales A before the surrogate: CISPO with FIPO's weight is CISPO on A·f, f computed here from the hook.
    logp, old, adv, mask = batch(3, spread=0.3)
    method = resolve_method(load_config(None, ["method.advantage=grpo", "method.token_weight=fipo",
                                               "method.policy_loss=cispo"]).method)
    cfg = published("cispo")
    _, weight_hook = loss_hooks(method, {"drop_exploded_responses": False, "half_life": 2.0})
    f = weight_hook(adv, torch.where(mask, logp - old, 0.0), mask)
    assert not torch.allclose(f[mask], torch.ones_like(f[mask]))
    loss, grad, _ = ours(method, logp, old, adv, mask, cfg, {"drop_exploded_responses": False, "half_life": 2.0})
    value, expected = ref_cispo(logp.tolist(), old.tolist(), (adv * f).tolist(), mask.tolist(), 1.0, 4.0)
    assert loss.item() == pytest.approx(value, rel=1e-10)
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-14)


# ---- TRL 1.16's GRPOTrainer loss on the same tensors ------------------------------------------------
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")


def trl_loss(logp, old, adv, mask, *, loss_type, level="token", epsilon=0.2, epsilon_high=0.28, tau=(1.0, 1.05),
             top_entropy_quantile=1.0, entropy=None):
    """TRL's `_compute_loss`, unbound, on a stand-in trainer (one process, no accumulation) whose forward
    returns these log-probs: (value, gradient with respect to log π)."""
    logp = logp.clone().requires_grad_()
    accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                  pad_across_processes=lambda x, dim, pad_index: x, sync_gradients=True)
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropy if entropy is not None
                                                             else torch.zeros_like(logp), None),
        top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=None, importance_sampling_level=level,
        beta=0.0, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high, use_vllm=False,
        args=SimpleNamespace(delta=None, sapo_temperature_pos=tau[0], sapo_temperature_neg=tau[1],
                             steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=accelerator,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))
    stand_in.get_high_entropy_mask = lambda *a: trl_grpo.GRPOTrainer.get_high_entropy_mask(stand_in, *a)
    rows, width = mask.shape
    inputs = {"prompt_ids": torch.zeros(rows, 0, dtype=torch.long), "prompt_mask": torch.zeros(rows, 0),
              "completion_ids": torch.zeros(rows, width, dtype=torch.long), "completion_mask": mask.to(logp.dtype),
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum().to(logp.dtype)}
    loss = trl_grpo.GRPOTrainer._compute_loss(stand_in, None, inputs)
    grad, = torch.autograd.grad(loss, logp)
    return loss, grad


@pytest.mark.parametrize("seed", [0, 1])
def test_gspo_matches_trl_sequence_level(seed):
    # TRL's sequence level is GSPO proper: per-token advantages give the same value, and with one advantage per
    # response (what TRL computes) the same gradient too; GSPO-token differs from it only in how a per-token A
    # spreads the gradient.
    cfg = published("gspo")
    for per_token_adv in (True, False):
        logp, old, adv, mask = batch(seed, spread=3e-4, per_token_adv=per_token_adv)
        loss, grad, _ = ours("gspo", logp, old, adv, mask, cfg)
        trl_value, trl_grad = trl_loss(logp, old, adv, mask, loss_type="grpo", level="sequence",
                                       epsilon=cfg.eps_low, epsilon_high=cfg.eps_high)
        torch.testing.assert_close(loss, trl_value, rtol=1e-10, atol=1e-14)
        if not per_token_adv:
            torch.testing.assert_close(grad, trl_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_cispo_matches_trl(seed):
    # TRL caps the weight at its epsilon_high (ScaleRL's ε_max = 5) with no lower bound: creditrl's
    # ε_low = 1, ε_high = 4, the cispo method's defaults.
    logp, old, adv, mask = batch(seed, spread=1.0)
    loss, grad, _ = ours("cispo", logp, old, adv, mask, published("cispo"))
    trl_value, trl_grad = trl_loss(logp, old, adv, mask, loss_type="cispo", epsilon_high=5.0)
    torch.testing.assert_close(loss, trl_value, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("taus", [(1.0, 1.25), (0.5, 3.0)])  # TRL holds τ in float32: these are exact there
def test_sapo_matches_trl(seed, taus):
    logp, old, adv, mask = batch(seed, spread=0.6)
    loss, grad, _ = ours("sapo", logp, old, adv, mask, published("sapo"), {"tau_pos": taus[0], "tau_neg": taus[1]})
    trl_value, trl_grad = trl_loss(logp, old, adv, mask, loss_type="sapo", tau=taus)
    torch.testing.assert_close(loss, trl_value, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-10, atol=1e-14)


# ---- verl 0.9.1's policy losses on the same tensors ---------------------------------------------------
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")


def verl_loss(name, logp, old, adv, mask, agg, **config):
    from verl.workers.config import ActorConfig

    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=agg, **config)
    logp = logp.clone().requires_grad_()
    loss, metrics = core_algos.get_policy_loss_fn(name)(old_log_prob=old, log_prob=logp, advantages=adv,
                                                        response_mask=mask, loss_agg_mode=agg, config=actor)
    grad, = torch.autograd.grad(loss, logp)
    return loss, grad, metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gspo_matches_verl_gspo_token(seed, agg):
    logp, old, adv, mask = batch(seed, spread=3e-4)
    cfg = published("gspo").model_copy(update={"agg": agg})
    loss, grad, metrics = ours("gspo", logp, old, adv, mask, cfg)
    value, verl_grad, verl_metrics = verl_loss("gspo", logp, old, adv, mask, agg, clip_ratio_low=cfg.eps_low,
                                               clip_ratio_high=cfg.eps_high)
    torch.testing.assert_close(loss, value, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-10, atol=1e-14)
    assert metrics["clip_frac"].item() == pytest.approx(verl_metrics["actor/pg_clipfrac"])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_cispo_matches_verl(seed, agg):
    logp, old, adv, mask = batch(seed, spread=1.0)
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, agg=agg)
    loss, grad, metrics = ours("cispo", logp, old, adv, mask, cfg)
    value, verl_grad, verl_metrics = verl_loss("cispo", logp, old, adv, mask, agg, clip_ratio_low=0.2,
                                               clip_ratio_high=0.28)
    torch.testing.assert_close(loss, value, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-10, atol=1e-14)
    assert metrics["clip_frac"].item() == pytest.approx(verl_metrics["actor/pg_clipfrac"])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 3.0)])
def test_sapo_matches_verl(seed, taus):
    logp, old, adv, mask = batch(seed, spread=0.6)
    loss, grad, _ = ours("sapo", logp, old, adv, mask, published("sapo"), {"tau_pos": taus[0], "tau_neg": taus[1]})
    value, verl_grad, _ = verl_loss("sapo", logp, old, adv, mask, "seq-mean-token-mean", tau_pos=taus[0],
                                    tau_neg=taus[1])
    torch.testing.assert_close(loss, value, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-10, atol=1e-14)
