"""PPO with GAE and a learned value model: GAE, whitening and the value loss against verl 0.9.1 and a float64
loop, hand-worked examples, the value model's token alignment, and training (warm-up, resume) on the lab model."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from factories import make_rollouts
from safetensors.torch import load_file

from creditrl.configure import load_config
from creditrl.methods import compute_advantages, get_method
from creditrl.methods.ppo import gae, masked_whiten, outcome_token_rewards
from creditrl.trainer import Trainer
from creditrl.value_model import ValueModel, value_loss


def _ragged(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.zeros(B, T, dtype=torch.float64)
    rewards[torch.arange(B), lengths - 1] = torch.randn(B, generator=g, dtype=torch.float64)
    return rewards, values, mask


def _gae_by_sums(rewards, values, mask, gamma, lam):
    """float64: A_t = Σ_l (γλ)^l δ_{t+l} over each row's real tokens, δ_t = r_t + γ V_{t+1} − V_t (V = 0 past the
    end) — the sum form, not the recursion."""
    advantages = torch.zeros_like(values, dtype=torch.float64)
    for b in range(values.shape[0]):
        real = mask[b].nonzero().squeeze(1).tolist()
        r = [float(rewards[b, t]) for t in real]
        v = [float(values[b, t]) for t in real] + [0.0]
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(real))]
        for i, t in enumerate(real):
            advantages[b, t] = sum((gamma * lam) ** k * deltas[i + k] for k in range(len(real) - i))
    return advantages


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_a_float64_sum_over_td_errors(gamma, lam):
    rewards, values, mask = _ragged()
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected = _gae_by_sums(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages[mask], expected[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns[mask], (expected + values)[mask], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5)])
def test_gae_and_whitening_match_verl(gamma, lam):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    rewards, values, mask = _ragged(seed=3)
    rewards, values = rewards.float(), values.float()
    expected_adv, expected_returns = core_algos.compute_gae_advantage_return(rewards, values, mask.float(),
                                                                             gamma, lam)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(masked_whiten(advantages, mask)[mask], expected_adv[mask])
    torch.testing.assert_close(returns[mask], expected_returns[mask])


def test_value_loss_matches_verl():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    g = torch.Generator().manual_seed(1)
    predicted, returns, old = (torch.randn(4, 6, generator=g) for _ in range(3))
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4, 5])[:, None]
    expected_loss, expected_frac = core_algos.compute_value_loss(predicted, returns, old, mask.float(), 0.5)
    loss, frac = value_loss(predicted, returns, old, mask, 0.5)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(frac, expected_frac)


def test_golden_gae_worked_by_hand():
    # row 0: three tokens, R = 1, V = [0.5, 0.25, 0.75], γ = 1, λ = 0.5:
    #   t=2: δ = 1 + 0 − 0.75 = 0.25                 A = 0.25
    #   t=1: δ = 0 + 0.75 − 0.25 = 0.5               A = 0.5 + 0.5·0.25 = 0.625
    #   t=0: δ = 0 + 0.25 − 0.5 = −0.25              A = −0.25 + 0.5·0.625 = 0.0625
    #   G = A + V = [0.5625, 0.875, 1.0]
    # row 1: two tokens and a pad (its value 9 is never read), R = 0, V = [0.5, 0.5]:
    #   t=1: δ = 0 + 0 − 0.5 = −0.5, A = −0.5;  t=0: δ = 0 + 0.5 − 0.5 = 0, A = 0.5·(−0.5) = −0.25;  G = [0.25, 0.0]
    rollouts = make_rollouts([1.0, 0.0], [0, 0], [3, 2])
    values = torch.tensor([[0.5, 0.25, 0.75], [0.5, 0.5, 9.0]], dtype=torch.float64)
    advantages, returns = gae(outcome_token_rewards(rollouts), values, rollouts.response_mask, 1.0, 0.5)
    mask = rollouts.response_mask
    assert advantages[mask].tolist() == [0.0625, 0.625, 0.25, -0.25, -0.5]
    assert returns[mask].tolist() == [0.5625, 0.875, 1.0, 0.25, 0.0]


def test_golden_value_loss_worked_by_hand():
    # V = 1, V_old = 0, G = 2, c = 0.5: clip(V) = 0.5; (1 − 2)² = 1 < (0.5 − 2)² = 2.25, so ½·2.25 = 1.125, clipped
    # V = 2.2, V_old = 2, G = 3: clip(V) = 2.2; both (2.2 − 3)² = 0.64: ½·0.64 = 0.32, not clipped; mean 0.7225
    loss, frac = value_loss(torch.tensor([[1.0, 2.2]]), torch.tensor([[2.0, 3.0]]), torch.tensor([[0.0, 2.0]]),
                            torch.ones(1, 2, dtype=torch.bool), 0.5)
    assert loss.item() == pytest.approx(0.7225) and frac.item() == 0.5


def _policy_batch(policy):
    """Two prompts of different lengths (left-padded), responses of different lengths (right-padded)."""
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    rollouts = make_rollouts([1.0, 0.0], [0, 1], [4, 2])
    rollouts.prompt_ids, rollouts.prompt_mask = prompt_ids, prompt_mask
    rollouts.response_ids = torch.tensor([[10, 11, 12, 13], [14, 15, 0, 0]])
    return rollouts


@pytest.mark.parametrize("shared", [False, True])
def test_values_read_the_state_before_each_response_token(tiny_policy, shared):
    cfg = load_config(None, [f"value_model.shared={str(shared).lower()}"])
    model = ValueModel(tiny_policy, cfg.value_model, cfg.train)
    torch.nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(0))
    rollouts = _policy_batch(tiny_policy)
    values = model.values(rollouts)
    decoder = (model.trunk or tiny_policy.model).get_decoder()
    for b in range(2):
        prompt = rollouts.prompt_ids[b][rollouts.prompt_mask[b]]
        for t in range(int(rollouts.response_mask[b].sum())):
            ids = torch.cat([prompt, rollouts.response_ids[b, :t]])[None]  # s_t = prompt + response[:t], alone
            with torch.no_grad():
                state = decoder(input_ids=ids).last_hidden_state[0, -1]
                expected = model.head(state).item()
            assert values[b, t].item() == pytest.approx(expected, abs=1e-5)
    assert values[1, 2:].eq(0).all()
    assert model.metrics()["value_forwards"] == 2


def test_the_value_model_fits_its_returns(tiny_policy):
    cfg = load_config(None, ["value_model.lr=1e-2", "train.ppo_epochs=4"])
    model = ValueModel(tiny_policy, cfg.value_model, cfg.train)
    rollouts = _policy_batch(tiny_policy)
    adv = compute_advantages("ppo", rollouts, value_model=model)
    assert adv.shape == rollouts.response_mask.shape and adv[~rollouts.response_mask].eq(0).all()
    returns = model.targets[1]
    first = model.update(rollouts)
    model.set_targets(model.values(rollouts), returns)
    second = model.update(rollouts)
    assert first["value_updates"] == 4 and second["value_loss"] < first["value_loss"]
    assert model.updates == 2 and not model.warming_up


def _cfg(model_dir, run_dir, *extra):
    return load_config(None, ["method=ppo", f"model.name={model_dir}", f"output.dir={run_dir}", "train.steps=2",
                              "rollout.prompts_per_step=3", "rollout.group_size=4", "task.lab.eval_size=4",
                              "task.lab.train_size=200", "eval.k=1", "sampling.max_new_tokens=24",
                              "output.checkpoint_every=2", "train.lr=1e-3", "value_model.lr=1e-3",
                              # rewards with spread from a random model: wrong answers shaped by length
                              "reward.overlong_max=12", "reward.overlong_buffer=8", *extra])


def test_ppo_trains_on_the_lab_model_and_the_policy_waits_for_the_value_warm_up(tiny_lab_model_dir, tmp_path):
    assert get_method("ppo").needs == ("value_model",)
    start = load_file(tiny_lab_model_dir / "model.safetensors")
    trainer = Trainer(_cfg(tiny_lab_model_dir, tmp_path / "run", "value_model.warmup_steps=1", "eval.before=false"),
                      show_progress=False)
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["updates"] for m in lines] == [0.0, 1.0] and [m["value_updates"] for m in lines] == [1.0, 1.0]
    assert lines[-1]["resource_forwards"] == 2 * lines[-1]["responses"]  # values, then one update pass
    for key in ("value_loss", "value_forwards", "value_params", "value_memory_mb", "value_explained_var"):
        assert key in lines[-1]
    assert lines[-1]["value_params"] == sum(p.numel() for p in trainer.policy.model.parameters()) + 32 + 1
    value_state = torch.load(tmp_path / "run" / "checkpoints" / "step-000002" / "resources.pt")["value_model"]
    assert value_state["updates"] == 2 and value_state["head"]["weight"].abs().sum() > 0
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(start[k], after[k]) for k in start)


@pytest.mark.slow
def test_a_killed_and_resumed_ppo_run_matches_an_unbroken_one(tiny_lab_model_dir, tmp_path):
    overrides = ["train.steps=6", "eval.before=false", "train.ppo_epochs=2"]
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "clean", *overrides), show_progress=False).train()

    killed = tmp_path / "killed"
    args = ["method=ppo", f"model.name={tiny_lab_model_dir}", f"output.dir={killed}", "rollout.prompts_per_step=3",
            "rollout.group_size=4", "task.lab.eval_size=4", "task.lab.train_size=200", "eval.k=1",
            "sampling.max_new_tokens=24", "output.checkpoint_every=2", "train.lr=1e-3", "value_model.lr=1e-3",
            "reward.overlong_max=12", "reward.overlong_buffer=8", "train.threads=1", *overrides]
    proc = subprocess.Popen([sys.executable, "-m", "creditrl.cli", "train", "--quiet", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"

    Trainer(_cfg(tiny_lab_model_dir, killed, *overrides), show_progress=False).train(resume=True)
    clean = load_file(tmp_path / "clean" / "final" / "model.safetensors")
    resumed = load_file(killed / "final" / "model.safetensors")
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)
    clean_value, resumed_value = (torch.load(run / "checkpoints" / "step-000006" / "resources.pt")["value_model"]
                                  for run in (tmp_path / "clean", killed))
    for part in ("trunk", "head"):
        assert all(torch.equal(clean_value[part][k], resumed_value[part][k]) for k in clean_value[part])
    assert clean_value["updates"] == resumed_value["updates"] == 6


def test_compare_trains_the_value_model_at_ten_times_the_lab_policys_lr(tmp_path):
    from creditrl.compare import GridSpec

    spec = GridSpec(["ppo"], out=tmp_path)
    assert spec.run_config("ppo", 0).value_model.lr == 10 * spec.run_config("ppo", 0).train.lr
    grid_says = GridSpec(["ppo"], overrides=["value_model.lr=3e-4"], out=tmp_path)
    assert grid_says.run_config("ppo", 0).value_model.lr == 3e-4


def test_a_checkpoint_without_the_value_models_state_names_its_file(tmp_path):
    from creditrl.checkpoint import load_resource_states

    assert load_resource_states(tmp_path, []) == {}
    with pytest.raises(ValueError, match=r"resources\.pt: no saved state for the trained resource\(s\) value_model"):
        load_resource_states(tmp_path, ["value_model"])
    torch.save({"implicit_prm": {}}, tmp_path / "resources.pt")
    with pytest.raises(ValueError, match="value_model"):
        load_resource_states(tmp_path, ["value_model", "implicit_prm"])


def test_a_shared_value_head_trains_only_the_head(tiny_policy):
    cfg = load_config(None, ["value_model.shared=true", "value_model.lr=1e-2"])
    model = ValueModel(tiny_policy, cfg.value_model, cfg.train)
    policy_before = {k: v.clone() for k, v in tiny_policy.model.state_dict().items()}
    rollouts = _policy_batch(tiny_policy)
    compute_advantages("ppo", rollouts, value_model=model)
    metrics = model.update(rollouts)
    assert model.trunk is None and metrics["value_updates"] == 1 and model.head.weight.abs().sum() > 0
    assert model.metrics()["value_params"] == tiny_policy.model.config.hidden_size + 1
    assert all(torch.equal(policy_before[k], v) for k, v in tiny_policy.model.state_dict().items())
