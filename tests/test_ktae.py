import json
import math
from fractions import Fraction

import pytest
import torch
from factories import make_rollouts

from creditrl.configure import load_config
from creditrl.methods import compute_advantages, method_params_model
from creditrl.methods.ktae import fisher_exact_p
from creditrl.trainer import Trainer


def _rollouts(rows, rewards, group_ids=None, truncated=None):
    """Rows of token ids (right-padded with 0), one group unless `group_ids` says otherwise."""
    r = make_rollouts(rewards, group_ids or [0] * len(rows), [len(row) for row in rows])
    r.response_ids = torch.tensor([row + [0] * (r.response_ids.shape[1] - len(row)) for row in rows])
    if truncated is not None:
        r.truncated = torch.tensor(truncated)
    return r


# ---- (1) a hand-worked group -----------------------------------------------------------------------
#
# correct: [5 2], [5 2], [5 6 2], [7 2]; wrong: [6 2], [6 6 2], [7 2], [7 6 2]; 2 ends every response.
# n_c = n_w = 4; N_c = 9, N_w = 10 tokens, N̄ = 9.5; BM25: K_c = 2(½ + ½·9/9.5) = 1.947368,
# K_w = 2(½ + ½·10/9.5) = 2.052632, tf(f, N, K) = (f/N)·3 / (f/N + K).
# GRPO: R = 1 ×4, 0 ×4 → mean ½, unbiased std √(2/7) = 0.5345225 → A = ±0.5/(0.5345225 + 1e-6) = ±0.9354126.
#
# token 6: a = 1, b = 3, c = 3, d = 1.  Fisher: margins row 4, col 4, n 8: P(k) = C(4,k)C(4,4−k)/70 =
#   1, 16, 36, 16, 1 (/70); observed k = 1 (16/70): p = 34/70, F = e^(−68/70) = 0.3785419.
#   IG = 1 − ½H(¼) − ½H(¾) = 1 − 0.8112781 = 0.1887219.
#   x = asin√¼ − asin√¾ + tf_c/(tf_w + 1e-5) − tf_w/(tf_c + 1e-5), tf_c = tf(1, 9, K_c) = 0.1619318,
#     tf_w = tf(4, 10, K_w) = 0.4892704:  −0.5235988 + 0.3309522 − 3.0212657 = −3.2139123.
#   s = (F + IG)·x/2 = −0.9115680 → w = 2σ(s) − 1 = −0.4266418.
# token 7: a = 1, b = 2, c = 3, d = 2.  P(k) = C(4,k)C(4,3−k)/56 = 4, 24, 24, 4 (/56), observed 24/56:
#   every table counts, p = 1, but the token is not in every response: F = e^(−2) = 0.1353353.
#   IG = 1 − ⅜H(⅓) − ⅝H(⅗) = 0.0487949.  tf_w = tf(2, 10, K_w) = 0.2663551;
#   x = asin√¼ − asin√½ + 0.1619318/0.2663651 − 0.2663551/0.1619418 = −1.2986259.
#   s = (F + IG)·x/2 = −0.1195581 → w = −0.0597080.
# token 5: a = 3, b = 0 → tf_w = 0, x ≈ tf_c/1e-5 ≈ 4·10⁴, F, IG > 0 → w = 1.
# token 2 is in every response: F = 0, IG = 0 → w = 0 (and it ends each finished response).
# The published estimator (ComputeKeyTokens) gives 1, −0.4266418, −0.0597079 and 0 on this group.

def test_a_hand_worked_group():
    rows = [[5, 2], [5, 2], [5, 6, 2], [7, 2], [6, 2], [6, 6, 2], [7, 2], [7, 6, 2]]
    adv = compute_advantages("ktae", _rollouts(rows, [1.0] * 4 + [0.0] * 4))
    g = 0.5 / (math.sqrt(2 / 7) + 1e-6)
    w = {5: 1.0, 6: -0.4266418, 7: -0.0597080, 2: 0.0}
    expected = [[(g if i < 4 else -g) + w[t] for t in row] + [0.0] * (3 - len(row)) for i, row in enumerate(rows)]
    assert torch.allclose(adv, torch.tensor(expected, dtype=adv.dtype), atol=1e-6)


def test_only_the_end_of_a_finished_response_is_zeroed():
    # correct rows end in 3, wrong ones in 4: a one-sided token, weight ±1 wherever it is not an end
    rows = [[5, 3], [3, 5, 3], [5, 4], [5, 4]]
    adv = compute_advantages("ktae", _rollouts(rows, [1.0, 1.0, 0.0, 0.0], truncated=[False, True, False, False]))
    base = compute_advantages("grpo", _rollouts(rows, [1.0, 1.0, 0.0, 0.0]))
    weight = adv - base
    assert weight[0, 1] == 0 and weight[2, 1] == 0 and weight[3, 1] == 0  # finished: their last token
    assert weight[1, 0] == pytest.approx(1.0) and weight[1, 2] == pytest.approx(1.0)  # truncated: kept
    assert weight[0, 0] == 0 and weight[1, 1] == 0  # token 5 is in every response: no evidence


def test_a_group_that_agrees_gets_no_key_token_weight():
    rows = [[5, 6], [7], [5, 5, 5]]
    for rewards in ([1.0, 1.0, 1.0], [0.0, -1.0, 0.0]):
        r = _rollouts(rows, rewards)
        assert torch.equal(compute_advantages("ktae", r), compute_advantages("grpo", r))


# ---- (2) against an independent float64 loop -------------------------------------------------------

def _fisher_p(a, b, c, d):
    """Two-sided Fisher p-value, exactly (fractions): tables as probable as the observed one or less."""
    row, col, n = a + b, a + c, a + b + c + d

    def prob(k):
        return Fraction(math.comb(col, k) * math.comb(n - col, row - k), math.comb(n, row))

    observed = prob(a)
    return sum((prob(k) for k in range(max(0, row + col - n), min(row, col) + 1) if prob(k) <= observed), Fraction(0))


def _reference(rows, rewards, groups, truncated, alpha=1.0, beta=1.0, gamma_tf=True, top=1.0, k1=2.0, b_tf=0.5):
    out = []
    for i, row in enumerate(rows):
        members = [j for j in range(len(rows)) if groups[j] == groups[i]]
        group_rewards = [rewards[j] for j in members]
        mean = sum(group_rewards) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in group_rewards) / (len(members) - 1))
        base = 0.0 if max(group_rewards) == min(group_rewards) else (rewards[i] - mean) / (std + 1e-6)
        good = [rows[j] for j in members if rewards[j] > 0]
        bad = [rows[j] for j in members if rewards[j] <= 0]
        values = []
        for t, tok in enumerate(row):
            weight = 0.0
            is_end = t == len(row) - 1 and not truncated[i]
            if good and bad and not is_end:
                a, b = sum(tok in r for r in good), sum(tok in r for r in bad)
                c, d = len(good) - a, len(bad) - b
                p = _fisher_p(a, b, c, d)
                fisher = 0.0 if a + b == len(good) + len(bad) else math.exp(-2 * float(p))
                n = a + b + c + d

                def h(x, y):
                    return -sum(v / (x + y) * math.log2(v / (x + y)) for v in (x, y) if v)

                ig = h(a + c, b + d) - (a + b) / n * h(a, b) - (c + d) / n * h(c, d)
                x = math.asin(math.sqrt(a / len(good))) - math.asin(math.sqrt(b / len(bad)))
                if gamma_tf:
                    len_good, len_bad = sum(map(len, good)), sum(map(len, bad))
                    avg = (len_good + len_bad) / 2

                    def tf(f, length):
                        return f / length * (k1 + 1) / (f / length + k1 * (1 - b_tf + b_tf * length / avg))

                    tf_good = tf(sum(r.count(tok) for r in good), len_good)
                    tf_bad = tf(sum(r.count(tok) for r in bad), len_bad)
                    x += tf_good / (tf_bad + 1e-5) - tf_bad / (tf_good + 1e-5)
                s = (alpha * fisher + beta * ig) * x / (alpha + beta)
                weight = top * (2 / (1 + math.exp(-s)) - 1) if s > -700 else -top
            values.append(base + weight)
        out.append(values)
    return out


@pytest.mark.parametrize("params", [{}, {"alpha": 2.0, "beta_ig": 0.5, "top": 0.5},
                                    {"gamma_tf": False}, {"beta_ig": 0.0}, {"tf_k1": 1.2, "tf_b": 0.75}])
def test_matches_a_float64_loop_on_random_groups(params):
    g = torch.Generator().manual_seed(len(str(params)))
    rows, rewards, groups, truncated = [], [], [], []
    for group, size in enumerate([2, 3, 5, 8, 8, 6]):
        for _ in range(size):
            length = int(torch.randint(1, 9, (1,), generator=g))
            rows.append(torch.randint(1, 7, (length,), generator=g).tolist())
            rewards.append(float(torch.randint(-1, 2, (1,), generator=g)))
            groups.append(group)
            truncated.append(bool(torch.rand(1, generator=g) < 0.3))
    adv = compute_advantages("ktae", _rollouts(rows, rewards, groups, truncated), params)
    names = {"alpha": "alpha", "beta_ig": "beta", "gamma_tf": "gamma_tf", "top": "top", "tf_k1": "k1", "tf_b": "b_tf"}
    ref = _reference(rows, rewards, groups, truncated, **{names[k]: v for k, v in params.items()})
    for i, row in enumerate(ref):
        assert adv[i, :len(row)].tolist() == pytest.approx(row, abs=1e-5), i
        assert (adv[i, len(row):] == 0).all()


def test_fisher_p_values_match_exact_fractions():
    tables = [(a, b, c, d) for a in range(5) for b in range(5) for c in range(5) for d in range(5) if a + b + c + d]
    p = fisher_exact_p(*torch.tensor(tables, dtype=torch.float64).T)
    assert p.tolist() == pytest.approx([float(_fisher_p(*t)) for t in tables], abs=1e-12)


# ---- (3) settings and a run ---------------------------------------------------------------------------

def test_alpha_and_beta_both_zero_is_refused_naming_them():
    params = method_params_model("ktae")(alpha=0.0, beta_ig=0.0)
    with pytest.raises(ValueError, match="alpha and beta_ig"):
        compute_advantages("ktae", _rollouts([[5], [6]], [1.0, 0.0]), params)


def test_ktae_trains_the_tiny_lab_model(tiny_lab_model_dir, tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", "method=ktae", f"model.name={tiny_lab_model_dir}",
                             "train.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4",
                             "sampling.max_new_tokens=12", "task.lab.train_size=50", "task.lab.eval_size=2",
                             "eval.k=1", "eval.before=false", "train.lr=1e-3"])
    trainer = Trainer(cfg, show_progress=False)
    verdict = trainer.task.verify  # the random model is never right: call even-length responses right
    trainer.task.verify = lambda p, r: verdict(p, r).__class__(correct=len(r) % 2 == 0)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(v) for m in records for v in m.values())
    assert any(m["adv_abs_mean"] > 0 and m["grad_norm"] > 0 for m in records)
