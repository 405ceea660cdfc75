"""bf16 weights trained through float32 master weights: the updates match float32 AdamW exactly,
they accumulate where bf16 alone would round them away, and a resumed run matches an unbroken one."""

import pytest
import torch
from safetensors.torch import load_file

from creditrl.config import ConfigError
from creditrl.configure import load_config
from creditrl.master_weights import MasterWeights, descend
from creditrl.trainer import Trainer


def _bf16_linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():  # magnitudes in [0.5, 1): a bf16 step there is 2⁻⁸ ≈ 0.0039
        layer.weight.copy_(torch.empty_like(layer.weight).uniform_(0.5, 1.0) * torch.randn(8, 16).sign())
    return layer.to(torch.bfloat16)


def _gradients(steps: int) -> list[torch.Tensor]:
    """One direction, varying size: AdamW then moves every weight by about lr per step."""
    torch.manual_seed(1)
    direction = torch.randn(8, 16)
    return [(direction * (1 + 0.1 * torch.rand(8, 16))).to(torch.bfloat16) for _ in range(steps)]


def test_masters_follow_float32_adamw_and_round_into_the_weights():
    layer, steps, lr = _bf16_linear(), 40, 1e-4
    reference = layer.weight.detach().float().clone().requires_grad_()
    reference_opt = torch.optim.AdamW([reference], lr=lr, weight_decay=0.0, fused=True)
    masters = MasterWeights(layer)
    optimizer = torch.optim.AdamW(masters.parameters(), lr=lr, weight_decay=0.0, fused=True)
    for grad in _gradients(steps):
        layer.weight.grad = grad.clone()
        masters.take_gradients()
        assert layer.weight.grad is None and masters.parameters()[0].grad.dtype == torch.float32
        optimizer.step()
        masters.write_back()
        reference.grad = grad.float()
        reference_opt.step()
    assert torch.equal(masters.parameters()[0], reference)
    assert torch.equal(layer.weight, reference.detach().to(torch.bfloat16))


def test_updates_below_bf16_resolution_accumulate_only_in_the_masters():
    start = _bf16_linear().weight.detach().clone()
    plain = _bf16_linear()  # AdamW stepping the bf16 weights themselves
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.0)
    mixed = _bf16_linear()
    masters = MasterWeights(mixed)
    mixed_opt = torch.optim.AdamW(masters.parameters(), lr=1e-4, weight_decay=0.0)
    for grad in _gradients(40):
        plain.weight.grad = grad.clone()
        plain_opt.step()
        mixed.weight.grad = grad.clone()
        masters.take_gradients()
        mixed_opt.step()
        masters.write_back()
    # each step (≈ 1e-4) is under half a bf16 step at these magnitudes: bf16 alone never moves,
    # while 40 of them (≈ 4e-3) add up to more than half a step in the masters
    assert torch.equal(plain.weight, start)
    assert (mixed.weight != start).all()


def test_descend_clips_the_float32_gradient_steps_the_masters_and_skips_a_non_finite_one():
    layer, lr, max_norm = _bf16_linear(), 1e-2, 0.5
    x = torch.randn(3, 16).to(torch.bfloat16)
    masters = MasterWeights(layer)
    optimizer = torch.optim.AdamW(masters.parameters(), lr=lr, weight_decay=0.0)
    # by hand: the bf16 gradient in float32, scaled to norm max_norm, one AdamW step, rounded to bf16
    grad, = torch.autograd.grad(layer(x).float().square().sum(), layer.weight)
    grad = grad.float()
    reference = layer.weight.detach().float().clone().requires_grad_()
    reference.grad = grad * (max_norm / (grad.norm() + 1e-6))
    torch.optim.AdamW([reference], lr=lr, weight_decay=0.0).step()
    norm = descend(layer(x).float().square().sum(), optimizer, masters, max_norm)
    torch.testing.assert_close(norm, grad.norm())
    assert norm > max_norm  # the clipping acted
    torch.testing.assert_close(masters.parameters()[0], reference)
    assert torch.equal(layer.weight, masters.parameters()[0].detach().to(torch.bfloat16))
    # a non-finite gradient: nothing moves, no gradient is left behind
    before = layer.weight.detach().clone(), masters.parameters()[0].detach().clone()
    norm = descend(layer(x).float().sum() * float("nan"), optimizer, masters, max_norm)
    assert not torch.isfinite(norm)
    assert torch.equal(layer.weight, before[0]) and torch.equal(masters.parameters()[0], before[1])
    assert masters.parameters()[0].grad is None and layer.weight.grad is None


def test_gradients_of_micro_batches_add_up_in_float32():
    layer = _bf16_linear()
    x = torch.randn(5, 16).to(torch.bfloat16)
    masters = MasterWeights(layer)
    # by hand: each micro-batch's bf16 gradient, in float32, summed in float32
    parts = [x[:2], x[2:]]
    by_hand = sum(torch.autograd.grad(layer(p).float().square().sum(), layer.weight)[0].float() for p in parts)
    for p in parts:
        layer(p).float().square().sum().backward()
        masters.take_gradients(add=True)
        assert layer.weight.grad is None
    assert torch.equal(masters.parameters()[0].grad, by_hand)


def test_float32_parameters_are_their_own_masters():
    layer = torch.nn.Linear(4, 4)
    masters = MasterWeights(layer)
    assert all(m is p for m, p in zip(masters.parameters(), layer.parameters()))
    assert masters.state_dict() == {}


def test_weights_of_several_dtypes_get_their_own_gradients_and_roundings():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5).to(torch.bfloat16), torch.nn.Linear(5, 3).to(torch.float16),
                                torch.nn.Linear(3, 2))
    masters = MasterWeights(model)
    x = torch.randn(6, 4)
    out = model[2](model[1](model[0](x.to(torch.bfloat16)).to(torch.float16)).float())
    out.square().sum().backward()
    grads = [w.grad.clone() for w in masters.weights]
    masters.take_gradients()
    for weight, master, grad in zip(masters.weights, masters.masters, grads):
        assert master.grad.dtype == torch.float32 and torch.equal(master.grad, grad.float())
        assert weight.grad is None or master is weight  # a float32 weight keeps its own gradient
    with torch.no_grad():
        for master in masters.masters:
            master.add_(torch.randn_like(master) * 1e-2)
    masters.write_back()
    for weight, master in zip(masters.weights, masters.masters):
        assert torch.equal(weight, master.to(weight.dtype))


def test_loading_masters_that_do_not_fit_names_the_source():
    masters = MasterWeights(_bf16_linear())
    with pytest.raises(ValueError, match=r"ckpt-7: does not match.*missing \['weight'\], unexpected \['bias'\]"):
        masters.load_state_dict({"bias": torch.zeros(8)}, source="ckpt-7")


def _cfg(model_dir, run_dir, steps):
    return load_config(None, [f"model.name={model_dir}", f"output.dir={run_dir}", f"train.steps={steps}",
                              "model.dtype=bfloat16", "rollout.prompts_per_step=3", "rollout.group_size=4",
                              "task.lab.eval_size=4", "task.lab.train_size=200", "eval.k=1", "eval.before=false",
                              "sampling.max_new_tokens=16", "output.checkpoint_every=2", "train.lr=1e-3",
                              "reward.overlong_max=10", "reward.overlong_buffer=6"])


@pytest.mark.slow
def test_bf16_run_checkpoints_its_masters_and_resumes_to_the_same_weights(tiny_lab_model_dir, tmp_path):
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "clean", 4), show_progress=False).train()
    ckpt = tmp_path / "clean" / "checkpoints" / "step-000004"
    weights, masters = load_file(ckpt / "model.safetensors"), load_file(ckpt / "master_weights.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert {t.dtype for t in masters.values()} == {torch.float32}
    assert all(torch.equal(masters[k].to(torch.bfloat16), weights[k]) for k in masters)
    start = load_file(tiny_lab_model_dir / "model.safetensors")
    assert any(not torch.equal(start[k], masters[k]) for k in masters)

    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "split", 2), show_progress=False).train()
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "split", 4), show_progress=False).train(resume=True)
    resumed = load_file(tmp_path / "split" / "checkpoints" / "step-000004" / "master_weights.safetensors")
    assert all(torch.equal(masters[k], resumed[k]) for k in masters)


def test_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        load_config(None, ["model.dtype=float16"])
