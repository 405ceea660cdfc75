"""The 80/20 rule's high-entropy token weight against a float64 loop, a hand-worked batch, TRL's
`top_entropy_quantile` on the same tensors, and a short training run."""

from __future__ import annotations

import json

import pytest
import torch
from test_policy_losses import batch, ours, trl_grpo, trl_loss

from creditrl.configure import load_config
from creditrl.methods import get_method, loss_hooks, resolve_method
from creditrl.methods.loss import LossConfig, policy_loss
from creditrl.trainer import Trainer


def ref_high_entropy(entropy, mask, rho):
    """f = 1 where H ≥ the (1 − ρ)-quantile of the masked H: sorted values, linear interpolation between the two
    order statistics around position (1 − ρ)·(n − 1)."""
    values = sorted(h for row, m in zip(entropy, mask) for h, keep in zip(row, m) if keep)
    if not values:
        return [[0.0] * len(row) for row in entropy]
    pos = (1 - rho) * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    threshold = values[lo] + (pos - lo) * (values[hi] - values[lo])
    return [[1.0 if keep and h >= threshold else 0.0 for h, keep in zip(row, m)] for row, m in zip(entropy, mask)]


def weight(entropy, mask, rho=0.2):
    _, hook = loss_hooks("high_entropy", {"rho": rho})
    adv = torch.ones_like(entropy)
    return hook(adv, torch.zeros_like(entropy), mask, entropy)


def test_hand_worked_batch():
    # H = [0.1, 0.5, 0.9, 0.3, 0.7] (+ a padded 5.0): sorted 0.1, 0.3, 0.5, 0.7, 0.9.  ρ = 0.4: position
    # 0.6·4 = 2.4, threshold 0.5 + 0.4·0.2 = 0.58, so 0.9 and 0.7 are kept.  ρ = 0.2: position 3.2, threshold
    # 0.7 + 0.2·0.2 = 0.74: only 0.9.  The padded token never is.
    entropy = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert weight(entropy, mask, rho=0.4).tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert weight(entropy, mask, rho=0.2).tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    assert weight(entropy, mask, rho=1.0).tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rho", [0.2, 0.5, 0.05])
def test_matches_reference_loop(seed, rho):
    _, _, _, mask = batch(seed)
    entropy = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    expected = ref_high_entropy(entropy.tolist(), mask.tolist(), rho)
    assert weight(entropy, mask, rho).tolist() == expected


def test_an_empty_batch_keeps_no_token():
    entropy = torch.rand(2, 3, dtype=torch.float64)
    assert weight(entropy, torch.zeros(2, 3, dtype=torch.bool)).tolist() == [[0.0] * 3] * 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_is_trls_get_high_entropy_mask(seed):
    _, _, _, mask = batch(seed)
    entropy = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed + 10)) * 2
    stand_in = type("OneProcess", (), {"accelerator": type("A", (), {
        "pad_across_processes": staticmethod(lambda x, dim, pad_index: x), "gather": staticmethod(lambda x: x)})})
    trl_mask = trl_grpo.GRPOTrainer.get_high_entropy_mask(stand_in, entropy, mask, 1 - 0.2)
    assert torch.equal(weight(entropy, mask).bool(), trl_mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_trls_top_entropy_quantile(seed):
    # TRL's grpo loss type with top_entropy_quantile = 0.2: clip 0.2 / 0.28, no dual clip, seq-mean-token-mean;
    # the dropped tokens stay in each response's token count, as creditrl's weight f = 0 leaves them.
    logp, old, adv, mask = batch(seed, spread=0.3)
    entropy = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed))  # float32, as TRL's quantile
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, dual_clip=None, agg="seq-mean-token-mean")
    loss, grad, metrics = ours("high_entropy", logp, old, adv, mask, cfg, entropy=entropy)
    trl_value, trl_grad = trl_loss(logp, old, adv, mask, loss_type="grpo", top_entropy_quantile=0.2, entropy=entropy)
    torch.testing.assert_close(loss, trl_value, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-10, atol=1e-14)
    assert 0.0 < metrics["weight_mean"].item() < 0.5


def test_combines_with_any_advantage_and_policy_loss():
    method = resolve_method(load_config(None, ["method.advantage=rloo", "method.token_weight=high_entropy",
                                               "method.policy_loss=cispo"]).method)
    assert method.needs_entropy and not get_method("grpo").needs_entropy
    logp, old, adv, mask = batch(4, spread=0.3)
    entropy = torch.rand(mask.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cfg = LossConfig(eps_low=1.0, eps_high=4.0)
    loss, grad, _ = ours(method, logp, old, adv, mask, cfg, entropy=entropy)
    f = torch.tensor(ref_high_entropy(entropy.tolist(), mask.tolist(), 0.2), dtype=torch.float64)
    plain, plain_grad, _ = ours(resolve_method("cispo"), logp, old, adv * f, mask, cfg)
    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-12, atol=1e-15)


def test_a_weight_reading_entropy_without_it_is_a_clear_error():
    logp, old, adv, mask = batch(0)
    _, hook = loss_hooks("high_entropy")
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, old, adv, mask, LossConfig(), token_weight=hook)


def test_the_trainer_hands_the_entropy_to_the_weight(tiny_lab_model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, ["method=high_entropy", f"model.name={tiny_lab_model_dir}", f"output.dir={run}",
                             "train.steps=1", "rollout.prompts_per_step=2", "rollout.group_size=4",
                             "rollout.dynamic_sampling=false", "task.lab.eval_size=4", "task.lab.train_size=20",
                             "eval.k=1", "eval.before=false", "sampling.max_new_tokens=12",
                             "reward.overlong_max=8", "reward.overlong_buffer=4"])
    Trainer(cfg, show_progress=False).train()
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 < record["weight_mean"] < 0.5  # about a fifth of the tokens keep their gradient
