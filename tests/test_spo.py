import json
import math
import statistics

import pytest
import torch
from factories import make_rollouts

from creditrl.configure import load_config
from creditrl.methods import compute_advantages
from creditrl.methods.spo import segment_starts
from creditrl.policy.transformers_backend import SamplingConfig
from creditrl.rewards import RewardConfig
from creditrl.tasks.base import Problem
from creditrl.trainer import Trainer
from creditrl.value_estimation import MonteCarloValues

PROBLEM = Problem("p", "question", "1")


class PrefixValues:
    """A fake estimator: V(s) a fixed pseudo-random number in [0, 1) of the state's tokens; records its calls."""

    def __init__(self):
        self.asked = []

    def value(self, prompt, prefix):
        return ((sum(prefix) * 37 + len(prefix) * 11 + sum(prompt)) % 97) / 97

    def estimate(self, states, k, temperature=None, top_p=None, max_tokens=None):
        self.asked.append((list(states), k))
        return torch.tensor([self.value(s.prompt_ids, s.prefix_ids) for s in states], dtype=torch.float64)


def _rollouts(rows, probs, rewards, truncated=None, prompts=None):
    r = make_rollouts(rewards, list(range(len(rows))), [len(row) for row in rows])
    width = r.response_ids.shape[1]
    r.response_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    r.old_logprobs = torch.tensor([[math.log(p) for p in row] + [0.0] * (width - len(row)) for row in probs])
    r.prompt_ids = torch.tensor([[p] for p in (prompts or [1] * len(rows))])
    r.problems = [PROBLEM] * len(rows)
    if truncated is not None:
        r.truncated = torch.tensor(truncated)
    return r


# ---- (1) segmentation by hand ----------------------------------------------------------------------

def test_segments_start_at_every_interval_th_low_probability_token():
    probs = torch.tensor([0.95, 0.5, 0.99, 0.3, 0.8, 0.97, 0.2, 0.6, 0.91])
    low = probs < 0.9  # low-probability tokens at 1, 3, 4, 6, 7
    assert segment_starts(low, "cutpoint", 1) == [1, 3, 4, 6, 7]
    assert segment_starts(low, "cutpoint", 2) == [1, 4, 7]
    assert segment_starts(low, "cutpoint", 5) == [1]
    assert segment_starts(low, "fixed", 3) == [0, 3, 6]
    assert segment_starts(low, "fixed", 20) == [0]
    assert segment_starts(torch.zeros(4, dtype=torch.bool), "cutpoint", 5) == []


def test_segment_advantages_by_hand():
    # one response [5 6 7 8 9 4], prompt [1], R = 1; probs: low (< 0.9) at tokens 1, 3, 4
    r = _rollouts([[5, 6, 7, 8, 9, 4]], [[0.95, 0.5, 0.99, 0.3, 0.8, 0.97]], [1.0])
    values = PrefixValues()
    adv = compute_advantages("spo", r, {"interval": 2, "whiten": False}, value_estimator=values)
    # interval 2: segments start at tokens 1 and 4 → states s_1 = [5], s_4 = [5 6 7 8]
    v1, v4 = values.value((1,), (5,)), values.value((1,), (5, 6, 7, 8))
    assert [s.prefix_ids for s in values.asked[0][0]] == [(5,), (5, 6, 7, 8)] and values.asked[0][1] == 4
    # segment [1, 4) gets V(s_4) − V(s_1), segment [4, 6) gets R − V(s_4); token 0 is in no segment;
    # only the low-probability tokens 1, 3, 4 keep theirs
    expected = [0.0, v4 - v1, 0.0, v4 - v1, 1.0 - v4, 0.0]
    assert adv[0].tolist() == pytest.approx(expected)
    without_mask = compute_advantages("spo", r, {"interval": 2, "whiten": False, "prob_mask": False},
                                      value_estimator=PrefixValues())
    assert without_mask[0].tolist() == pytest.approx([0.0, v4 - v1, v4 - v1, v4 - v1, 1.0 - v4, 1.0 - v4])


# ---- (2) against a float64 loop with a fake value estimator -------------------------------------------

def _reference(rows, probs, rewards, truncated, prompts, interval, partition, threshold, prob_mask, whiten):
    """The published token-level recipe, token by token: values at the position before each segment start,
    the response's return on its last token, each token the advantage of the next valued position."""
    values = PrefixValues()
    out = []
    for row, p, reward, cut, prompt in zip(rows, probs, rewards, truncated, prompts):
        if partition == "cutpoint":
            low = [t for t in range(len(row)) if p[t] < threshold]
            starts = low[::interval]
        else:
            starts = list(range(0, len(row), interval))
        token_values = [None] * (len(row) + 1)  # token_values[t + 1]: V after token t; [0]: V(s_0)
        for t in starts:
            token_values[t] = values.value((prompt,), tuple(row[:t]))
        token_values[len(row)] = 0.0 if cut else reward
        adv = [None] * len(row)
        base = None
        for i in range(len(row) + 1):
            if token_values[i] is not None:
                if i > 0:
                    adv[i - 1] = 0.0 if base is None else token_values[i] - base
                base = token_values[i]
        for i in range(len(row) - 1, -1, -1):
            if adv[i] is None:
                adv[i] = adv[i + 1]
        out.append(adv if starts else [0.0] * len(row))
    keep = [[(q < threshold) if prob_mask else True for q in p] for p in probs]
    if whiten:
        counted = [a for row, k in zip(out, keep) for a, kk in zip(row, k) if kk]
        counted = counted or [a for row in out for a in row]
        mean, var = statistics.fmean(counted), statistics.variance(counted)
        out = [[(a - mean) / math.sqrt(var + 1e-8) for a in row] for row in out]
    return [[a if kk else 0.0 for a, kk in zip(row, k)] for row, k in zip(out, keep)]


@pytest.mark.parametrize("params", [{}, {"interval": 1}, {"interval": 3, "whiten": False},
                                    {"partition": "fixed", "interval": 4}, {"prob_mask": False, "interval": 2},
                                    {"prob_threshold": 0.5, "interval": 2}])
def test_matches_a_float64_loop(params):
    g = torch.Generator().manual_seed(len(str(params)))
    rows, probs, rewards, truncated, prompts = [], [], [], [], []
    for i in range(7):
        length = int(torch.randint(1, 16, (1,), generator=g))
        rows.append(torch.randint(2, 9, (length,), generator=g).tolist())
        probs.append((torch.rand(length, generator=g, dtype=torch.float64) ** 0.3).clamp(max=0.999).tolist())
        rewards.append(float(torch.randint(0, 2, (1,), generator=g)))
        truncated.append(i == 3)
        prompts.append(1 + i % 3)
    r = _rollouts(rows, probs, rewards, truncated, prompts)
    adv = compute_advantages("spo", r, params, value_estimator=PrefixValues())
    settings = {"interval": 5, "partition": "cutpoint", "prob_threshold": 0.9, "prob_mask": True, "whiten": True,
                **params}
    ref = _reference(rows, probs, rewards, truncated, prompts, settings["interval"], settings["partition"],
                     settings["prob_threshold"], settings["prob_mask"], settings["whiten"])
    for i, row in enumerate(ref):
        assert adv[i, :len(row)].tolist() == pytest.approx(row, abs=1e-9), i
        assert (adv[i, len(row):] == 0).all()


# ---- (3) what it needs ------------------------------------------------------------------------------

def test_without_sampled_log_probs_the_error_names_the_engine():
    r = _rollouts([[5, 6]], [[0.5, 0.5]], [1.0])
    r.old_logprobs = None
    with pytest.raises(ValueError, match="sampling.engine=kv-cache"):
        compute_advantages("spo", r, value_estimator=PrefixValues())
    # fixed segments on every token need no probabilities
    adv = compute_advantages("spo", r, {"partition": "fixed", "prob_mask": False, "whiten": False},
                             value_estimator=PrefixValues())
    assert adv.shape == (1, 2)


def test_without_an_estimator_the_error_says_what_is_missing():
    with pytest.raises(ValueError, match="value_estimator"):
        compute_advantages("spo", _rollouts([[5]], [[0.5]], [1.0]))


def test_identical_boundary_states_are_estimated_once():
    from test_vineppo import CoinPolicy, EndsInOne  # the coin policy whose V(s) is known

    # one prompt, three responses; fixed segments of 2 tokens: s_0 three times, s_2 = [5 6] twice (the
    # two-token response has s_0 only): 5 states, 2 distinct
    r = _rollouts([[5, 6, 7], [5, 6, 8, 9], [4, 6]], [[0.5] * 3, [0.5] * 4, [0.5] * 2], [1.0, 0.0, 1.0])
    policy = CoinPolicy({})
    estimator = MonteCarloValues(policy, EndsInOne(), SamplingConfig(max_new_tokens=8), RewardConfig())
    compute_advantages("spo", r, {"partition": "fixed", "interval": 2, "k": 3}, value_estimator=estimator)
    assert sorted(map(tuple, policy.calls[0])) == [(1,)] * 3 + [(1, 5, 6)] * 3  # K = 3 continuations of each
    metrics = estimator.metrics()
    assert (metrics["states_estimated"], metrics["states_deduplicated"]) == (2.0, 3.0)


# ---- (4) end to end on the tiny lab model ------------------------------------------------------------

def test_spo_trains_the_tiny_lab_model(tiny_lab_model_dir, tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", "method=spo", f"model.name={tiny_lab_model_dir}",
                             "method_params.k=2", "method_params.interval=2", "train.steps=2",
                             "rollout.prompts_per_step=2", "rollout.group_size=3", "sampling.max_new_tokens=12",
                             "task.lab.train_size=50", "task.lab.eval_size=2", "eval.k=1", "eval.before=false",
                             "train.lr=1e-3"])
    trainer = Trainer(cfg, show_progress=False)
    verdict = trainer.task.verify  # the random model is never right: call even-length responses right
    trainer.task.verify = lambda p, r: verdict(p, r).__class__(correct=len(r) % 2 == 0)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for m in records:
        assert m["responses"] == 6.0  # continuations are not in the trained batch
        assert all(math.isfinite(v) for v in m.values())
        assert m["states_estimated"] >= 1 and m["extra_generated_tokens"] >= 2 * m["states_estimated"]
    assert any(m["adv_abs_mean"] > 0 and m["grad_norm"] > 0 for m in records)
