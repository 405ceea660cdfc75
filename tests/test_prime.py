"""PRIME: the advantage against hand-worked examples and a float64 loop written from the PRIME recipe for verl,
the implicit PRM's loss and log-ratios against direct computations, and training (and resuming) on the lab model."""

import json
import math
import statistics

import pytest
import torch
from factories import make_rollouts
from safetensors.torch import load_file

from creditrl.configure import load_config
from creditrl.implicit_prm import ImplicitPRM, implicit_prm_loss
from creditrl.methods import compute_advantages, get_method
from creditrl.methods.prime import batch_normalised
from creditrl.trainer import Trainer


class FixedProcessRewards:
    """Stands in for the implicit PRM: the same β·q whatever the batch."""

    def __init__(self, rewards):
        self.rewards = rewards

    def process_rewards(self, rollouts):
        return self.rewards


def test_golden_prime_advantage_worked_by_hand():
    # one group of two rows; process rewards r (the last token's, 9, is never used), outcomes 1 and 0; weights 1, 1:
    #   row 0: r = [0.2, 0.4, ·]: without the last token [0.2, 0.4, 0], mean over its 3 tokens 0.2
    #   row 1: r = [0.6, ·]:      [0.6, 0],                             mean over its 2 tokens 0.3
    #   RLOO, n = 2: r·2 − (0.2 + 0.3)/1  ->  row 0 [-0.1, 0.3, -0.5], row 1 [0.7, -0.5]
    #   outcomes on the last token, means 1 and 0: 1·2 − 1 = 1 and 0·2 − 1 = −1
    #   sum: row 0 [-0.1, 0.3, 0.5], row 1 [0.7, -1.5]; returns-to-go: row 0 [0.7, 0.8, 0.5], row 1 [-0.8, -1.5]
    #   then whitened over the five tokens with the unbiased variance
    rollouts = make_rollouts([1.0, 0.0], [0, 0], [3, 2])
    prm = FixedProcessRewards(torch.tensor([[0.2, 0.4, 9.0], [0.6, 9.0, 0.0]], dtype=torch.float64))
    adv = compute_advantages("prime", rollouts, {"reward_dpo_coef": 1.0, "reward_gt_coef": 1.0, "prime_norm": "none"},
                             implicit_prm=prm)
    returns = [0.7, 0.8, 0.5, -0.8, -1.5]
    mean, std = statistics.mean(returns), statistics.stdev(returns)
    expected = [(g - mean) / math.sqrt(std**2 + 1e-8) for g in returns]
    assert adv[rollouts.response_mask].tolist() == pytest.approx(expected, abs=1e-9)
    assert adv[1, 2] == 0


def test_golden_batch_norm_worked_by_hand():
    # returns-to-go of [1, -3, 0.5] are [-1.5, -2.5, 0.5]: the largest |·| is 2.5
    scaled = batch_normalised(torch.tensor([[1.0, -3.0, 0.5]], dtype=torch.float64))
    assert scaled[0].tolist() == pytest.approx([1 / (2.5 + 1e-6), -3 / (2.5 + 1e-6), 0.5 / (2.5 + 1e-6)])


def test_golden_implicit_prm_loss_worked_by_hand():
    # Σq = 2 (right) and −2 (wrong), β = 0.5: σ(1) against 1 and σ(−1) against 0 both cost log(1 + e^−1)
    q = torch.tensor([[1.5, 0.5, 7.0], [-2.0, 0.0, 7.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    loss = implicit_prm_loss(q, torch.tensor([1.0, 0.0]), mask, 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))


def _prime_in_float64(process, rewards, lengths, groups, beta_norm, c_p, c_o):
    """The PRIME recipe's advantage, row by row in float64: token granularity, batch norm, RLOO per source,
    weighted sum, returns-to-go, whitening."""
    B, T = len(process), len(process[0])
    r = [[process[b][t] if t < lengths[b] - 1 else 0.0 for t in range(T)] for b in range(B)]
    if beta_norm:
        biggest = max(abs(sum(r[b][t:])) for b in range(B) for t in range(T))
        r = [[x / (biggest + 1e-6) for x in row] for row in r]
    o = [[rewards[b] if t == lengths[b] - 1 else 0.0 for t in range(T)] for b in range(B)]
    total = [[0.0] * T for _ in range(B)]
    for source, coef, tokens in ((r, c_p, lambda b: range(lengths[b])), (o, c_o, lambda b: [lengths[b] - 1])):
        for g in set(groups):
            rows = [b for b in range(B) if groups[b] == g]
            n = len(rows)
            means = {b: sum(source[b][t] for t in tokens(b)) / len(tokens(b)) for b in rows}
            for b in rows:
                others = sum(means[j] for j in rows if j != b) / (n - 1)
                for t in tokens(b):
                    # r_t·n/(n−1) − Σ_j m_j/(n−1) = r_t + (r_t − m_b)/(n−1) − mean of the others
                    total[b][t] += coef * (source[b][t] + (source[b][t] - means[b]) / (n - 1) - others)
    returns = [[sum(total[b][t:lengths[b]]) for t in range(lengths[b])] for b in range(B)]
    flat = [x for row in returns for x in row]
    mean, var = statistics.mean(flat), statistics.variance(flat)
    return [[(x - mean) / math.sqrt(var + 1e-8) for x in row] for row in returns]


def test_prime_advantage_matches_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    lengths, groups = [6, 3, 5, 1, 6, 2, 4, 6, 2], [0, 0, 0, 0, 1, 1, 1, 2, 2]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    rollouts = make_rollouts(rewards, groups, lengths)
    process = torch.randn(9, 6, generator=g, dtype=torch.float64)
    adv = compute_advantages("prime", rollouts, implicit_prm=FixedProcessRewards(process))
    expected = _prime_in_float64(process.tolist(), rewards, lengths, groups, True, 5.0, 5.0)
    for b, row in enumerate(expected):
        assert adv[b, : lengths[b]].tolist() == pytest.approx(row, rel=1e-9, abs=1e-9)


def _policy_batch():
    rollouts = make_rollouts([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], [4, 2, 3, 3])
    rollouts.prompt_ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9], [7, 8, 9]])
    rollouts.prompt_mask = torch.tensor([[0, 1, 1]] * 2 + [[1, 1, 1]] * 2, dtype=torch.bool)
    rollouts.response_ids = torch.tensor([[10, 11, 12, 13], [14, 15, 0, 0], [16, 17, 18, 0], [19, 20, 21, 0]])
    return rollouts


def _direct_logprobs(model, prompt, response):
    """log p(response | prompt) token by token from one plain forward."""
    ids = torch.cat([prompt, response])[None]
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return logp[len(prompt) - 1: len(ids[0]) - 1].gather(1, response[:, None]).squeeze(1)


def test_the_implicit_prm_learns_the_outcomes_and_its_log_ratios_are_the_models(tiny_policy):
    cfg = load_config(None, ["method=prime", "implicit_prm.lr=1e-2"])
    prm = ImplicitPRM(tiny_policy, cfg.implicit_prm, cfg.train)
    rollouts = _policy_batch()
    assert prm.log_ratios(rollouts).abs().max() == 0  # π_φ starts as π_ref
    first = prm.update(rollouts)
    assert prm.update(rollouts) == first and prm.updates == 1  # once per batch
    q = prm.log_ratios(rollouts)
    for b in range(4):
        prompt, n = rollouts.prompt_ids[b][rollouts.prompt_mask[b]], int(rollouts.response_mask[b].sum())
        response = rollouts.response_ids[b, :n]
        expected = (_direct_logprobs(prm.scorer.model, prompt, response)
                    - _direct_logprobs(prm.reference.model, prompt, response))
        torch.testing.assert_close(q[b, :n], expected, rtol=1e-4, atol=1e-5)
    sums = q.sum(1)
    assert sums[0] > sums[1] and sums[2] > sums[3]  # right answers gained implicit reward, wrong ones lost it
    prm.reset(seed=1)
    assert prm.update(rollouts)["implicit_prm_loss"] < first["implicit_prm_loss"]


def test_update_before_trains_on_the_batch_it_scores(tiny_policy):
    cfg = load_config(None, ["method=prime", "implicit_prm.lr=1e-2"])
    before = ImplicitPRM(tiny_policy, cfg.implicit_prm, cfg.train)
    after = ImplicitPRM(tiny_policy, cfg.implicit_prm.model_copy(update={"update": "after"}), cfg.train)
    rollouts = _policy_batch()
    assert before.process_rewards(rollouts).abs().max() > 0 and before.updates == 1
    assert after.process_rewards(rollouts).abs().max() == 0 and after.updates == 0


def _cfg(model_dir, run_dir, *extra):
    return load_config(None, ["method=prime", f"model.name={model_dir}", f"output.dir={run_dir}", "train.steps=2",
                              "rollout.prompts_per_step=3", "rollout.group_size=4", "task.lab.eval_size=4",
                              "task.lab.train_size=200", "eval.k=1", "sampling.max_new_tokens=24",
                              "output.checkpoint_every=2", "train.lr=1e-3", "implicit_prm.lr=1e-3",
                              "eval.before=false", *extra])


def test_prime_trains_on_the_lab_model_and_resumes_to_the_same_weights(tiny_lab_model_dir, tmp_path):
    assert get_method("prime").needs == ("implicit_prm",)
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "clean", "train.steps=4"), show_progress=False).train()
    lines = [json.loads(line) for line in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    for key in ("implicit_prm_loss", "implicit_prm_params", "implicit_prm_memory_mb", "resource_forwards"):
        assert key in lines[-1]
    # π_ref for every row, π_φ's update, and its scoring of the batch
    assert lines[-1]["resource_forwards"] == 3 * lines[-1]["responses"]

    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "resumed"), show_progress=False).train()
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "resumed", "train.steps=4"), show_progress=False).train(resume=True)
    clean = load_file(tmp_path / "clean" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)
    states = [torch.load(run / "checkpoints" / "step-000004" / "resources.pt")["implicit_prm"]
              for run in (tmp_path / "clean", tmp_path / "resumed")]
    assert all(torch.equal(states[0]["model"][k], states[1]["model"][k]) for k in states[0]["model"])
    assert states[0]["updates"] == states[1]["updates"] == 4


def test_compare_trains_the_implicit_prm_at_twice_the_lab_policys_lr(tmp_path):
    from creditrl.compare import GridSpec

    cfg = GridSpec(["prime"], out=tmp_path).run_config("prime", 0)
    assert cfg.implicit_prm.lr == 2 * cfg.train.lr and cfg.loss.entropy_coef == 0.001
