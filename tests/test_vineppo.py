import copy
import json
import math
import statistics

import pytest
import torch
from factories import make_rollouts

from creditrl.configure import load_config
from creditrl.methods import compute_advantages
from creditrl.policy.transformers_backend import Generation, SamplingConfig
from creditrl.rewards import RewardConfig
from creditrl.tasks.base import Problem, Verdict
from creditrl.trainer import Trainer
from creditrl.value_estimation import MonteCarloValues, PrefixState

PROBLEM = Problem("p", "question", "1")


class CoinPolicy:
    """Each continuation is one token: 1 with probability p[state ids], else 2 (so V(s) = p exactly).

    `length` > 1 repeats that token; `truncated` marks every continuation as cut by the token limit.
    """

    def __init__(self, p, length=1, truncated=False):
        self.p, self.length, self.truncated = p, length, truncated
        self.calls = []  # the rows of every sample call

    def sample(self, prompt_ids, n, cfg, seed):
        rows = [ids for ids in prompt_ids for _ in range(n)]
        self.calls.append(rows)
        draws = torch.rand(len(rows), generator=torch.Generator().manual_seed(seed))
        out = [[1 if u < self.p.get(tuple(ids), 0.5) else 2] * self.length for ids, u in zip(rows, draws.tolist())]
        return Generation(rows, out, [self.truncated] * len(rows), calls=7)  # what an engine reports

    def decode(self, ids):
        return "".join(map(str, ids))


class EndsInOne:
    def verify(self, problem, response):
        return Verdict(correct=response.endswith("1"))


def _estimator(policy, max_new_tokens=8, batch_size=256, reward=None):
    return MonteCarloValues(policy, EndsInOne(), SamplingConfig(max_new_tokens=max_new_tokens, batch_size=batch_size),
                            reward or RewardConfig())


def _state(prompt, prefix=()):
    return PrefixState(tuple(prompt), tuple(prefix), PROBLEM)


# ---- (1) the Monte Carlo estimate against known values -----------------------------------------

def test_estimates_match_known_values_and_variance_shrinks_like_one_over_k():
    p = {(5,): 0.3, (5, 7): 0.8, (5, 7, 9): 0.05}
    states = [_state((5,)), _state((5,), (7,)), _state((5,), (7, 9))]
    estimator = _estimator(CoinPolicy(p))
    variances = {}
    for k in (4, 16):
        draws = torch.stack([estimator.estimate(states, k) for _ in range(400)])  # (400, 3), a new seed each call
        for i, q in enumerate(p.values()):
            assert abs(draws[:, i].mean().item() - q) < 4 * math.sqrt(q * (1 - q) / (k * 400))
        variances[k] = draws.var(dim=0)
        expected = torch.tensor([q * (1 - q) / k for q in p.values()])
        assert torch.allclose(variances[k], expected, rtol=0.25)
    ratio = variances[4] / variances[16]
    assert ((ratio > 3) & (ratio < 5.3)).all()


def test_the_seed_makes_estimates_reproducible():
    states = [_state((5,)), _state((5,), (7,))]
    a, b = _estimator(CoinPolicy({})), _estimator(CoinPolicy({}))
    a.reset(seed=3)
    b.reset(seed=3)
    assert torch.equal(a.estimate(states, 8), b.estimate(states, 8))
    b.reset(seed=100)
    assert not torch.equal(a.estimate(states, 32), b.estimate(states, 32))


def test_a_continuation_past_its_budget_counts_zero():
    # continuations are "111" (3 tokens, correct); a wrong answer would cost −1
    always = {(5,) + prefix: 1.0 for prefix in [(), (7,), (7, 7), (7, 7, 7)]}
    estimator = _estimator(CoinPolicy(always, length=3), max_new_tokens=5, reward=RewardConfig(wrong=-1.0))
    states = [_state((5,), prefix) for prefix in [(), (7,), (7, 7), (7, 7, 7)]]
    # default budget: 5 tokens minus the prefix length -> 5, 4, 3 fit the 3 tokens, 2 does not
    assert estimator.estimate(states, 2).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert estimator.estimate(states, 2, max_tokens=2).tolist() == [0.0] * 4
    cut = _estimator(CoinPolicy(always, length=3, truncated=True), max_new_tokens=5)
    assert cut.estimate(states[:1], 2).tolist() == [0.0]


def test_continuations_use_the_run_sampling_unless_told_otherwise():
    seen = []
    policy = CoinPolicy({})
    sample = policy.sample
    policy.sample = lambda prompts, n, cfg, seed: seen.append(cfg) or sample(prompts, n, cfg, seed)
    estimator = MonteCarloValues(policy, EndsInOne(), SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=8,
                                                                     stop=["\n\n"]), RewardConfig())
    estimator.estimate([_state((5,), (7, 7))], 2)
    estimator.estimate([_state((5,))], 2, temperature=0.6, top_p=0.9, max_tokens=3)
    assert (seen[0].temperature, seen[0].top_p, seen[0].max_new_tokens, seen[0].stop) == (0.7, 0.95, 6, ["\n\n"])
    assert (seen[1].temperature, seen[1].top_p, seen[1].max_new_tokens) == (0.6, 0.9, 3)


# ---- (2) the advantage against a hand-worked example -------------------------------------------

class TableValues:
    """A value estimator that returns given values by prefix, and records what it was asked."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def estimate(self, states, k, temperature=None, top_p=None, max_tokens=None):
        self.asked += [s.prefix_ids for s in states]
        return torch.tensor([self.table[s.prefix_ids] for s in states])


def _two_responses():
    """Row 0 (R = 1): steps [11 12 | 13 | 14 15]; row 1 (R = 0): steps [11 12 | 16], same prompt."""
    r = make_rollouts([1.0, 0.0], [0, 0], [5, 3], step_ids=[[0, 0, 1, 2, 2], [0, 0, 1, -1, -1]])
    r.response_ids = torch.tensor([[11, 12, 13, 14, 15], [11, 12, 16, 0, 0]])
    r.problems = [PROBLEM, PROBLEM]
    return r


VALUES = {(): 0.5, (11, 12): 0.6, (11, 12, 13): 0.9}


def _whitened(adv, mask):
    tokens = adv[mask].tolist()
    mean, std = statistics.mean(tokens), statistics.stdev(tokens)
    return torch.where(mask, (adv - mean) / math.sqrt(std**2 + 1e-8), 0.0)


def test_step_advantages_by_hand():
    r = _two_responses()
    # row 0: A0 = 0.6 − 0.5, A1 = 0.9 − 0.6, A2 = R + 0 − 0.9; row 1: A0 = 0.6 − 0.5, A1 = 0 + 0 − 0.6
    expected = torch.tensor([[0.1, 0.1, 0.3, 0.1, 0.1], [0.1, 0.1, -0.6, 0.0, 0.0]], dtype=torch.float64)
    adv = compute_advantages("vineppo", r, {"whiten": False}, value_estimator=TableValues(VALUES))
    assert torch.allclose(adv, expected)
    adv = compute_advantages("vineppo", r, {}, value_estimator=TableValues(VALUES))
    assert torch.allclose(adv, _whitened(expected, r.response_mask))
    assert abs(adv[r.response_mask].mean().item()) < 1e-12


def test_a_response_cut_off_at_the_length_limit_returns_zero_as_its_continuations_do():
    r = _two_responses()
    r.truncated = torch.tensor([True, False])  # row 0 verified correct (R = 1), but cut off
    # row 0: A2 = 0 + 0 − 0.9 instead of 1 − 0.9; the rest as by hand above
    expected = torch.tensor([[0.1, 0.1, 0.3, -0.9, -0.9], [0.1, 0.1, -0.6, 0.0, 0.0]], dtype=torch.float64)
    adv = compute_advantages("vineppo", r, {"whiten": False}, value_estimator=TableValues(VALUES))
    assert torch.allclose(adv, expected)


def test_steps_past_max_steps_are_filled_backward():
    r = _two_responses()
    values = TableValues(VALUES)
    # max_steps 2: row 0 estimates s_0, s_1 only; V_2 = r_2 + V_3 = 1, so A1 = 1 − 0.6 and A2 = 0
    adv = compute_advantages("vineppo", r, {"whiten": False, "max_steps": 2}, value_estimator=values)
    expected = torch.tensor([[0.1, 0.1, 0.4, 0.0, 0.0], [0.1, 0.1, -0.6, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(adv, expected)
    assert (11, 12, 13) not in values.asked
    # max_steps 1: only s_0; V_j = R from step 1 on
    adv = compute_advantages("vineppo", r, {"whiten": False, "max_steps": 1}, value_estimator=TableValues(VALUES))
    expected = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0], [-0.5, -0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(adv, expected)


def test_without_an_estimator_the_error_says_what_is_missing():
    with pytest.raises(ValueError, match="value_estimator"):
        compute_advantages("vineppo", _two_responses())


# ---- (3) identical states are estimated once ---------------------------------------------------

def test_identical_states_across_the_batch_are_estimated_once():
    # group 0 (prompt 5): three responses that all start with the step [7 8];
    # group 1 (prompt 6): [7 8 | 9], [3 | 9], and a one-step response [3 4]
    steps = [[0, 0, 1, -1], [0, 0, 1, -1], [0, 0, 1, 1], [0, 0, 1, -1], [0, 1, -1, -1], [0, 0, -1, -1]]
    r = make_rollouts([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], [0, 0, 0, 1, 1, 1], [3, 3, 4, 3, 2, 2], step_ids=steps)
    r.prompt_ids = torch.tensor([[5]] * 3 + [[6]] * 3)
    r.response_ids = torch.tensor([[7, 8, 9, 0], [7, 8, 9, 0], [7, 8, 10, 10], [7, 8, 9, 0], [3, 9, 0, 0],
                                   [3, 4, 0, 0]])
    r.problems = [PROBLEM] * 6
    policy = CoinPolicy({})
    estimator = _estimator(policy, batch_size=8)
    compute_advantages("vineppo", r, {"k": 3}, value_estimator=estimator)
    # 11 states (2 + 2 + 2 + 2 + 2 + 1), 5 distinct: (5), (5 7 8), (6), (6 7 8), (6 3)
    assert len(policy.calls) == 1
    assert sorted(set(map(tuple, policy.calls[0]))) == [(5,), (5, 7, 8), (6,), (6, 3), (6, 7, 8)]
    assert len(policy.calls[0]) == 5 * 3
    metrics = estimator.metrics()
    assert metrics.pop("time_value_estimation") > 0
    assert metrics == {"extra_generated_tokens": 15.0, "extra_generate_calls": 7.0, "states_estimated": 5.0,
                       "states_deduplicated": 6.0}


# ---- (4) continuations give values only --------------------------------------------------------

def test_the_rollout_batch_is_unchanged_by_the_advantage():
    r = _two_responses()
    before = copy.deepcopy(r)
    adv = compute_advantages("vineppo", r, {"k": 4}, value_estimator=_estimator(CoinPolicy({})))
    assert adv.shape == r.response_mask.shape
    for name, value in vars(before).items():
        now = getattr(r, name)
        assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value, name


# ---- (5) end to end on the tiny lab model ------------------------------------------------------

def _lab_cfg(run_dir, *extra):
    return load_config(None, [f"output.dir={run_dir}", "method=vineppo", "method_params.k=2", "train.steps=2",
                              "rollout.prompts_per_step=2", "rollout.group_size=3", "task.lab.train_size=50",
                              "task.lab.eval_size=2", "eval.k=1", "eval.before=false", *extra])


def test_vineppo_trains_the_tiny_lab_model(tiny_lab_model_dir, tmp_path):
    cfg = _lab_cfg(tmp_path / "run", f"model.name={tiny_lab_model_dir}", "method_params.max_steps=4",
                   "sampling.max_new_tokens=12", "train.lr=1e-3")
    trainer = Trainer(cfg, show_progress=False)
    verdict = trainer.task.verify  # the random model is never right: call even-length responses right
    trainer.task.verify = lambda p, r: verdict(p, r).__class__(correct=len(r) % 2 == 0)
    rollouts, _ = trainer.collect()
    prompts = [trainer.policy.encode_prompt(p.prompt) for p in rollouts.problems]
    assert [rollouts.prompt_ids[b][rollouts.prompt_mask[b]].tolist() for b in range(6)] == prompts
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for m in records:
        assert m["responses"] == 6.0  # continuations are not in the trained batch
        assert all(math.isfinite(v) for v in m.values())
        assert m["extra_generate_calls"] >= 1 and m["time_value_estimation"] > 0
        states = m["states_estimated"] + m["states_deduplicated"]
        assert m["states_estimated"] >= 2 and 6 <= states <= 6 * 4  # s_0 of each prompt at least, ≤ max_steps per row
        assert m["extra_generated_tokens"] >= 2 * m["states_estimated"]  # K continuations of ≥ 1 token each
    assert any(m["adv_abs_mean"] > 0 and m["grad_norm"] > 0 for m in records)


def test_on_the_bundled_lab_model_every_token_of_a_step_shares_its_advantage(tmp_path):
    trainer = Trainer(_lab_cfg(tmp_path / "run", "sampling.max_new_tokens=48"), show_progress=False)
    rollouts, _ = trainer.collect()
    trainer.resources["value_estimator"].reset(seed=0)
    adv = compute_advantages(trainer.method, rollouts, trainer.cfg.method_params,
                             value_estimator=trainer.resources["value_estimator"])
    counts = trainer.resources["value_estimator"].metrics()
    assert counts["states_estimated"] + counts["states_deduplicated"] == rollouts.num_steps.sum().item() > 6
    assert counts["states_deduplicated"] >= 4  # at least s_0, shared by the 3 responses of each prompt
    for b in range(rollouts.batch_size):
        for j in range(int(rollouts.num_steps[b])):
            in_step = adv[b][rollouts.step_ids[b] == j]
            assert torch.allclose(in_step, in_step[:1].expand_as(in_step))
