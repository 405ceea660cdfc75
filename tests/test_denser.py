"""DenseR (methods.md §6): against a slow float64 reference, hand-worked numbers, and in the trainer."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from factories import make_rollouts

from creditrl.configure import load_config
from creditrl.hidden_states import StoredHiddenStates
from creditrl.methods import compute_advantages, get_method
from creditrl.methods.denser import DenseRParams, denser, denser_weights
from creditrl.methods.grpo import grpo
from creditrl.trainer import OldLogprobs, Trainer

CREDIT_COST = Path(__file__).parents[1] / "benchmarks" / "credit_cost.py"


# ---- the slow reference: the formulas of methods.md §6 with plain loops, in float64 ------------------------
def ref_cos(a, b):
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb) if na > 0 and nb > 0 else 0.0


def ref_advantages(rewards, group_ids, lengths, hidden, alpha_c, alpha_w, beta, window, eps=1e-6):
    """A (B, T) as nested lists: GRPO A_i (unbiased std) times the DenseR weights."""
    B, T = len(rewards), len(hidden[0])
    out = [[0.0] * T for _ in range(B)]
    for g in set(group_ids):
        rows = [b for b in range(B) if group_ids[b] == g]
        rs = [rewards[b] for b in rows]
        mean = sum(rs) / len(rs)
        std = statistics.stdev(rs) if len(rs) > 1 else 0.0
        adv = {b: (rewards[b] - mean) / (std + eps) if len(rs) > 1 else 0.0 for b in rows}
        pos = [b for b in rows if adv[b] >= 0]
        neg = [b for b in rows if adv[b] < 0]
        for i in rows:
            w = [1.0] * lengths[i]
            if pos and neg:
                cross = neg if i in pos else pos
                within = [j for j in (pos if i in pos else neg) if j != i]

                def div(refs, t):
                    if not refs:
                        return 1.0
                    sims = []
                    for j in refs:
                        c = t * lengths[j] // lengths[i]
                        best = 0.0
                        for u in range(c - window, c + window + 1):
                            if 0 <= u < T and u < lengths[j]:
                                best = max(best, ref_cos(hidden[i][t], hidden[j][u]))
                        sims.append(best)
                    return 1.0 - sum(sims) / len(sims)

                credit = [alpha_c * div(cross, t) + alpha_w * div(within, t) for t in range(lengths[i])]
                m = sum(credit) / len(credit)
                w = [(1 - beta) + beta * (c / m if m > 0 else 1.0) for c in credit]
            for t in range(lengths[i]):
                out[i][t] = adv[i] * w[t]
    return out


CASES = [  # G, T, D, W, alpha_c, alpha_w, beta, n_groups
    (4, 9, 5, 1, 1.0, 1.0, 1.0, 2),
    (5, 12, 3, 5, 1.0, 0.3, 0.1, 3),
    (3, 7, 8, 0, 0.5, 2.0, 0.7, 2),
    (6, 16, 4, 2, 1.0, 1.0, 1.0, 1),
    (2, 6, 2, 3, 2.0, 0.0, 1.0, 2),
]


@pytest.mark.parametrize("G,T,D,W,alpha_c,alpha_w,beta,n_groups", CASES)
def test_matches_the_slow_reference(G, T, D, W, alpha_c, alpha_w, beta, n_groups):
    gen = torch.Generator().manual_seed(G * 100 + T)
    B = G * n_groups
    group_ids = [b % n_groups for b in range(B)]  # groups interleaved: rows of a group are not contiguous
    lengths = torch.randint(1, T + 1, (B,), generator=gen).tolist()
    lengths[0] = T
    rewards = torch.randint(0, 3, (B,), generator=gen).double().tolist()
    rewards[0], rewards[n_groups] = 0.0, 2.0  # group 0 has both signs
    hidden = torch.randn(B, T, D, generator=gen)
    hidden[:, :, 0] += 1.5  # make most cosines positive, so the max and the clamp both matter
    params = DenseRParams(alpha_c=alpha_c, alpha_w=alpha_w, beta=beta, window=W)

    fast = denser(make_rollouts(rewards, group_ids, lengths, T=hidden.shape[1]), params, StoredHiddenStates(hidden))
    slow = torch.tensor(ref_advantages(rewards, group_ids, lengths, hidden.double().tolist(),
                                       alpha_c, alpha_w, beta, W),
                        dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    torch.testing.assert_close(fast.masked_fill(~mask, 0.0), slow, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast, grpo(make_rollouts(rewards, group_ids, lengths, T=T), params))  # w ≢ 1


@pytest.mark.parametrize("tile_rows,key_rows", [(1, 1), (3, 10), (16, 100_000)])
def test_tiles_and_key_chunks_match_the_slow_reference(monkeypatch, tile_rows, key_rows):
    import creditrl.methods.denser as denser_module

    G, T, D = 8, 9, 4
    monkeypatch.setattr(denser_module, "TILE_ROWS", tile_rows)
    monkeypatch.setattr(denser_module, "KEY_BYTES", 4 * D * key_rows)  # room for key_rows tokens
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, T + 1, (G,), generator=gen).tolist()
    rewards = [0.0, 2.0, 1.0, 0.0, 2.0, 2.0, 0.0, 1.0]
    hidden = torch.randn(G, T, D, generator=gen)
    hidden[:, :, 0] += 1.5
    fast = denser(make_rollouts(rewards, [0] * G, lengths, T=hidden.shape[1]), DenseRParams(alpha_w=0.3, beta=0.5),
                  StoredHiddenStates(hidden))
    slow = torch.tensor(ref_advantages(rewards, [0] * G, lengths, hidden.double().tolist(), 1.0, 0.3, 0.5, 5),
                        dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    torch.testing.assert_close(fast.masked_fill(~mask, 0.0), slow, atol=1e-5, rtol=1e-5)


def ref_window_similarity(hidden, mask, window):
    """s_ij(t) by the formula, float64 loops; any mask (not only a prefix), i ≠ j and m_{i,t} only."""
    G, T = len(mask), len(mask[0])
    lengths = [sum(row) for row in mask]
    sim = [[[0.0] * T for _ in range(G)] for _ in range(G)]
    for i in range(G):
        for j in range(G):
            if i == j:
                continue
            for t in range(T):
                if not mask[i][t]:
                    continue
                c = t * lengths[j] // lengths[i]
                for u in range(max(c - window, 0), min(c + window + 1, T)):
                    if mask[j][u]:
                        sim[i][j][t] = max(sim[i][j][t], ref_cos(hidden[i][t], hidden[j][u]))
    return torch.tensor(sim, dtype=torch.float64)


@pytest.mark.parametrize("tile_rows", [1, 4, 16])
@pytest.mark.parametrize("window", [0, 2, 40])
def test_window_similarity_matches_the_slow_reference(monkeypatch, tile_rows, window):
    import creditrl.methods.denser as denser_module

    monkeypatch.setattr(denser_module, "TILE_ROWS", tile_rows)
    monkeypatch.setattr(denser_module, "KEY_BYTES", 4 * 3 * 7)  # a few tokens per chunk: one row j at a time
    gen = torch.Generator().manual_seed(window + 10 * tile_rows)
    G, T, D = 6, 24, 3
    lengths = [24, 1, 0, 3, 17, 24]  # ratios from 1/24 to 24, an empty row, windows past both ends
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    mask[5, ::3] = False  # holes: the mask need not be a prefix
    hidden = torch.randn(G, T, D, generator=gen)
    hidden[:, :, 0] += 1.0
    hidden *= torch.rand(G, T, 1, generator=gen) * 10  # norms from 0 to about 20: the cosine scales them away
    hidden[0, 3] = 0.0  # a zero state: cosine 0
    fast = denser_module.window_similarity(hidden, mask, window)
    slow = ref_window_similarity(hidden.double().tolist(), mask.tolist(), window)
    torch.testing.assert_close(fast.double(), slow, atol=1e-6, rtol=0)
    assert (slow > 0).sum() > 100 and (slow[:, 2] == 0).all() and (slow[2] == 0).all()


def _gathered_formulation():
    """The benchmark's windowed-gather `denser_weights`, the formulation the band search replaced."""
    spec = importlib.util.spec_from_file_location("credit_cost", CREDIT_COST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.denser_weights_gathered


@pytest.mark.parametrize("seed", range(4))
def test_equals_the_gathered_formulation(seed):
    gen = torch.Generator().manual_seed(seed)
    G, T, D = 8, 70, 16
    lengths = torch.randint(0, T + 1, (G,), generator=gen)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    hidden = torch.randn(G, T, D, generator=gen)
    hidden[:, :, 0] += 1.0
    negative = torch.arange(G) % 3 == 0
    params = DenseRParams(alpha_c=1.0, alpha_w=0.3, beta=0.7, window=int(torch.randint(0, 8, (1,), generator=gen)))
    fast = denser_weights(hidden, mask, negative, params)
    torch.testing.assert_close(fast, _gathered_formulation()(hidden, mask, negative, params), atol=1e-5, rtol=1e-5)
    assert fast[mask].std() > 0.01


def test_bf16_states_are_used_in_float32():
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(4, 6, 5, generator=gen).bfloat16()
    lengths, rewards = [6, 4, 5, 2], [1.0, 0.0, 1.0, 0.0]
    fast = denser(make_rollouts(rewards, [0] * 4, lengths, T=hidden.shape[1]), DenseRParams(window=1),
                  StoredHiddenStates(hidden))
    slow = ref_advantages(rewards, [0] * 4, lengths, hidden.double().tolist(), 1.0, 1.0, 1.0, 1)
    torch.testing.assert_close(fast, torch.tensor(slow, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_hand_worked_example():
    # G = 2, T = 2, D = 2, W = 0, α_c = α_w = 1, β = 0.5; row 0 correct (P), row 1 wrong (N).
    # h_0 = [(1, 0), (0, 1)], h_1 = [(1, 0), (1, 1)]; both of length 2, so c = t.
    # s_01 = s_10 = (cos((1,0),(1,0)), cos((0,1),(1,1))) = (1, 1/√2).
    # D_cross = (0, 1 − 1/√2) = (0, 0.292893); the own class minus the row is empty: D_within = (1, 1).
    # c = (1, 1.292893), mean 1.146447, ĉ = (0.872260, 1.127740), w = 0.5 + 0.5·ĉ = (0.936130, 1.063870).
    # GRPO: rewards (1, 0), mean 0.5, unbiased std 1/√2: A = ±0.5·√2 = ±0.707107 (eps 1e-6 aside).
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]])
    params = DenseRParams(window=0, beta=0.5)
    w = denser_weights(hidden, torch.ones(2, 2, dtype=torch.bool), torch.tensor([False, True]), params)
    torch.testing.assert_close(w, torch.tensor([[0.936130, 1.063870]] * 2), atol=1e-6, rtol=0)
    adv = denser(make_rollouts([1.0, 0.0], [0, 0], [2, 2], T=hidden.shape[1]), params, StoredHiddenStates(hidden))
    a = 0.5 / (1 / math.sqrt(2) + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([[a * 0.936130, a * 1.063870], [-a * 0.936130, -a * 1.063870]],
                                                 dtype=torch.float64), atol=1e-6, rtol=0)


def test_weights_average_one_over_real_tokens_when_beta_is_one():
    gen = torch.Generator().manual_seed(3)
    mask = torch.arange(10)[None, :] < torch.tensor([10, 3, 7, 1, 8])[:, None]
    w = denser_weights(torch.randn(5, 10, 6, generator=gen), mask, torch.tensor([True, False, True, False, False]),
                       DenseRParams())
    means = (w * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(means, torch.ones(5), atol=1e-6, rtol=0)
    assert w[mask].std() > 0.01


@pytest.mark.parametrize("negative", [[False] * 4, [True] * 4])
def test_one_sided_groups_get_weight_one(negative):
    w = denser_weights(torch.randn(4, 5, 3), torch.ones(4, 5, dtype=torch.bool), torch.tensor(negative), DenseRParams())
    assert torch.equal(w, torch.ones(4, 5))


def test_identical_states_or_zero_alphas_give_weight_one():
    mask = torch.arange(6)[None, :] < torch.tensor([6, 4, 5])[:, None]
    negative = torch.tensor([False, True, True])
    same = torch.ones(3, 6, 4)  # every s_ij(t) = 1, so c ≡ 0: the guard gives ĉ = 1
    torch.testing.assert_close(denser_weights(same, mask, negative, DenseRParams()), torch.ones(3, 6))
    zero = DenseRParams(alpha_c=0.0, alpha_w=0.0)
    torch.testing.assert_close(denser_weights(torch.randn(3, 6, 4), mask, negative, zero), torch.ones(3, 6))


@pytest.mark.parametrize("dim", [5, 64, 896, 4096])
def test_identical_random_states_give_weight_one_despite_rounding(dim):
    # cos(h, h) of a random h is 1 ± a float32 rounding, so c is rounding noise; ĉ must still be 1, not
    # noise / mean(noise)
    gen = torch.Generator().manual_seed(0)
    same = torch.randn(1, 8, dim, generator=gen).expand(4, 8, dim).contiguous()
    mask = torch.ones(4, 8, dtype=torch.bool)
    w = denser_weights(same, mask, torch.tensor([False, True, False, True]), DenseRParams())
    torch.testing.assert_close(w, torch.ones(4, 8), atol=0, rtol=0)


def test_a_small_real_divergence_is_kept():
    # two states at angle θ: D_cross = 1 − cos θ ≈ θ²/2 = 2e-4, far above the rounding tolerance; W = 0, so
    # each token meets one state of the other row: tokens (a, a) against (a, b) give c = (0, 1 − cos θ) + D_within
    theta = 0.02
    a, b = [1.0, 0.0], [math.cos(theta), math.sin(theta)]
    hidden = torch.tensor([[a, a], [a, b]])
    w = denser_weights(hidden, torch.ones(2, 2, dtype=torch.bool), torch.tensor([False, True]),
                       DenseRParams(window=0, alpha_w=0.0))
    torch.testing.assert_close(w, torch.tensor([[0.0, 2.0], [0.0, 2.0]]), atol=1e-3, rtol=0)


def test_zero_spread_groups_groups_of_one_and_beta_zero_give_grpo():
    hidden = torch.randn(6, 5, 3)
    r = make_rollouts([1.0, 1.0, 1.0, 0.0, 1.0, 2.0], [0, 0, 0, 1, 1, 2], [5, 3, 4, 5, 2, 5], T=5)
    adv = denser(r, DenseRParams(), StoredHiddenStates(hidden))
    assert torch.all(adv[:3] == 0) and torch.all(adv[5] == 0)  # no spread; a group of one
    torch.testing.assert_close(denser(r, DenseRParams(beta=0.0), StoredHiddenStates(hidden)), grpo(r, DenseRParams()))


def test_needs_hidden_states():
    r = make_rollouts([1.0, 0.0], [0, 0], [2, 2])
    with pytest.raises(ValueError, match="hidden_states"):
        compute_advantages("denser", r)
    assert "hidden_states" in get_method("denser").needs and "hidden_states" not in get_method("grpo").needs
    hidden = torch.randn(2, 2, 2)
    torch.testing.assert_close(compute_advantages("denser", r, hidden_states=StoredHiddenStates(hidden)),
                               denser(r, DenseRParams(), StoredHiddenStates(hidden)))


# ---- in the trainer -----------------------------------------------------------------------------------------
def _cfg(model_dir, run_dir, *extra):
    # the overlong penalty gives the random tiny model reward spread, so groups hold both signs
    return load_config(None, [f"model.name={model_dir}", f"output.dir={run_dir}", "rollout.prompts_per_step=3",
                              "rollout.group_size=4", "task.lab.eval_size=4", "task.lab.train_size=50", "eval.k=1",
                              "sampling.max_new_tokens=16", "reward.overlong_max=10", "reward.overlong_buffer=8",
                              "train.logprob_batch_size=8", "train.lr=1e-3", *extra])


def _count_forwards(trainer: Trainer) -> list[tuple[int, bool]]:
    """(rows, with grad) of every decoder forward after sampling, during one train_step (the policy's one-off
    check of its output head runs before counting)."""
    from creditrl.policy.transformers_backend import _logits_are_plain_projection

    _logits_are_plain_projection(trainer.policy.model)
    calls: list[tuple[int, bool]] = []
    handle = trainer.policy.model.get_decoder().register_forward_hook(
        lambda _m, _args, kwargs, _out: calls.append((kwargs["input_ids"].shape[0], torch.is_grad_enabled())),
        with_kwargs=True)
    collect = trainer.collect

    def collect_then_reset():
        out = collect()
        calls.clear()  # the sampler's forwards are not counted
        return out

    trainer.collect = collect_then_reset
    trainer._build_optimizer()
    outcome = trainer.train_step()
    handle.remove()
    assert outcome.bad is None
    return calls


def test_one_old_forward_per_chunk_and_one_update_forward(tiny_lab_model_dir, tmp_path):
    # B = 12 rows in groups of 4, logprob_batch_size 8: whole-group chunks of 8 and 4 rows (one length bucket).
    one_bucket = "train.length_buckets=1"
    denser_calls = _count_forwards(Trainer(_cfg(tiny_lab_model_dir, tmp_path, "method=denser", one_bucket),
                                           show_progress=False))
    assert denser_calls == [(8, False), (4, False), (12, True)]  # no extra forward for the hidden states
    # GRPO needs no old forward: the sampler returned the old log-probs (and with 1 epoch × 1 minibatch the
    # update's own detached log-probs serve).  DenseR cannot skip it, since its states come from that forward.
    grpo_calls = _count_forwards(Trainer(_cfg(tiny_lab_model_dir, tmp_path, "method=grpo", one_bucket),
                                         show_progress=False))
    assert grpo_calls == [(12, True)]
    two_minibatches = _count_forwards(Trainer(_cfg(tiny_lab_model_dir, tmp_path, "method=grpo", one_bucket,
                                                   "train.n_minibatches=2"), show_progress=False))
    assert two_minibatches == [(6, True), (6, True)]
    forced = _count_forwards(Trainer(_cfg(tiny_lab_model_dir, tmp_path, "method=grpo", one_bucket,
                                          "train.n_minibatches=2", "train.recompute_old_logprobs=true"),
                                     show_progress=False))
    assert forced == [(8, False), (4, False), (6, True), (6, True)]
    # up to four length buckets: the update's forward may become several, which together hold every row once
    bucketed = _count_forwards(Trainer(_cfg(tiny_lab_model_dir, tmp_path, "method=grpo", "train.length_buckets=4"),
                                       show_progress=False))
    assert 1 <= len(bucketed) <= 4 and sum(rows for rows, _ in bucketed) == 12 and all(grad for _, grad in bucketed)


def test_chunked_advantages_equal_the_whole_batch(tiny_lab_model_dir, tmp_path):
    trainer = Trainer(_cfg(tiny_lab_model_dir, tmp_path, "method=denser", "train.logprob_batch_size=5",
                           "loss.kl_coef=0.1", "train.seed=3", "train.n_minibatches=2"), show_progress=False)
    hidden_states = trainer.resources["hidden_states"]
    seen = []
    walk = hidden_states.by_groups

    def spy(rollouts):
        for rows, hidden in walk(rollouts):
            seen.append((hidden.shape[0], torch.unique(rollouts.group_ids[rows], return_counts=True)[1].tolist()))
            yield rows, hidden

    hidden_states.by_groups = spy
    rollouts, _ = trainer.collect()
    rollouts = rollouts.select(torch.arange(12).view(3, 4).T.flatten())  # interleave the groups' rows
    chunked = compute_advantages("denser", rollouts, trainer.cfg.method_params, **trainer.resources)
    assert seen == [(4, [4]), (4, [4]), (4, [4])]  # 5 rows cannot hold two groups: one group per chunk
    scored = trainer._score_old(rollouts, OldLogprobs.RECOMPUTE)
    assert scored == 24  # the hidden states' forward gave the old log-probs; one more for the reference
    p, m = rollouts, rollouts.response_mask
    # the reference is the start policy (the two forwards chunk the rows differently: compared on real tokens)
    torch.testing.assert_close(rollouts.ref_logprobs[m], rollouts.old_logprobs[m], atol=1e-5, rtol=1e-5)
    whole = trainer.policy.score(p.prompt_ids, p.prompt_mask, p.response_ids, m, with_hidden=True)
    torch.testing.assert_close(rollouts.old_logprobs[m], whole.logprobs[m], atol=1e-5, rtol=1e-5)
    expected = compute_advantages("denser", rollouts, trainer.cfg.method_params,
                                  hidden_states=StoredHiddenStates(whole.hidden_states, batch_size=12))
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=1e-5)
    per_row = [chunked[b][m[b]] for b in range(rollouts.batch_size)]
    assert any(len(v) > 1 and v.abs().max() > 0 and not torch.allclose(v, v[0].expand_as(v)) for v in per_row)


def test_trains_the_tiny_model(tiny_lab_model_dir, tmp_path):
    cfg = _cfg(tiny_lab_model_dir, tmp_path / "run", "method=denser", "train.steps=3", "eval.before=false",
               "output.checkpoint_every=3", "method_params.alpha_w=0.3", "method_params.beta=0.1")
    Trainer(cfg, show_progress=False).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and any(r["adv_abs_mean"] > 0 for r in records)
    assert all(r["scoring_forwards"] == 12 for r in records)  # the hidden states' forward only
    for record in records:
        assert record["skipped"] == 0.0 and record["updates"] == 1.0
        assert all(math.isfinite(v) for v in record.values())
