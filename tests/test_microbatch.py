"""Micro-batches under a token budget: packing, the loss against the unsplit minibatch, and the trainer."""

from __future__ import annotations

import pytest
import torch

from creditrl.config import LossConfig
from creditrl.configure import load_config
from creditrl.methods.loss import policy_loss
from creditrl.microbatch import MinibatchTotals, combine_metrics, pack_rows
from creditrl.trainer import OldLogprobs, Trainer

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# ---- packing -------------------------------------------------------------------------------------------------
def test_pack_rows_by_hand():
    # rows (prompt, response): 0 (2, 6) = 8, 1 (3, 1) = 4, 2 (1, 7) = 8, 3 (2, 2) = 4; budget 16, longest first:
    # [0, 2] pads to 2 × (2 + 7) = 18 > 16, so row 2 starts a batch; [2, 1] pads to 2 × (3 + 7) = 20 > 16;
    # [1, 3] pads to 2 × (3 + 2) = 10 ≤ 16
    batches = pack_rows(torch.tensor([2, 3, 1, 2]), torch.tensor([6, 1, 7, 2]), 16)
    assert [b.tolist() for b in batches] == [[0], [2], [1, 3]]
    assert [b.tolist() for b in pack_rows(torch.tensor([2, 3, 1, 2]), torch.tensor([6, 1, 7, 2]), 40)] == [[0, 2, 1, 3]]


@pytest.mark.parametrize("seed", range(5))
def test_every_row_once_and_every_micro_batch_within_the_budget(seed):
    gen = torch.Generator().manual_seed(seed)
    prompts, responses = torch.randint(1, 30, (40,), generator=gen), torch.randint(0, 90, (40,), generator=gen)
    budget = int((prompts + responses).max()) + int(torch.randint(0, 300, (1,), generator=gen))
    batches = pack_rows(prompts, responses, budget)
    assert sorted(torch.cat(batches).tolist()) == list(range(40))
    for rows in batches:
        assert len(rows) * (int(prompts[rows].max()) + int(responses[rows].max())) <= budget
    assert len(batches) < 40  # rows were packed together


def test_a_row_longer_than_the_budget_is_an_error():
    with pytest.raises(ValueError, match=r"train.max_tokens_per_microbatch=10 .* 12 tokens"):
        pack_rows(torch.tensor([2, 4]), torch.tensor([10, 1]), 10)


# ---- the loss of micro-batches against the unsplit minibatch ------------------------------------------------
def _batch(seed: int, rows: int = 9, width: int = 12):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, width + 1, (rows,), generator=gen)
    lengths[0], lengths[1] = width, 0  # a full row and a row without tokens
    mask = torch.arange(width)[None, :] < lengths[:, None]
    def noise():
        return torch.randn(rows, width, generator=gen, dtype=torch.float64)

    logits = noise()
    return {"logits": logits, "old": logits + 0.3 * noise(), "ref": logits + 0.2 * noise(), "adv": noise(),
            "entropy": torch.rand(rows, width, generator=gen, dtype=torch.float64), "mask": mask}


def _loss_and_grad(batch, cfg, parts, totals):
    logits = batch["logits"].clone().requires_grad_()
    total = 0.0
    for rows in parts:
        lp = torch.nn.functional.logsigmoid(logits[rows])  # a log-prob with a gradient through every token
        loss, _ = policy_loss(lp, batch["old"][rows].clamp(max=0) - 0.1, batch["adv"][rows], batch["mask"][rows],
                              cfg, ref_logprobs=batch["ref"][rows].clamp(max=0) - 0.1,
                              entropy=batch["entropy"][rows] * (1 + lp), totals=totals)
        loss.backward()
        total = total + loss.detach()
    return total, logits.grad


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_micro_batches_sum_to_the_unsplit_loss_and_gradient(agg):
    batch = _batch(seed=AGGREGATIONS.index(agg))
    cfg = LossConfig(agg=agg, norm_length=12, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    whole_loss, whole_grad = _loss_and_grad(batch, cfg, [torch.arange(9)], None)
    parts = [torch.tensor([4, 0]), torch.tensor([1, 7, 2]), torch.tensor([3]), torch.tensor([8, 5, 6])]
    split_loss, split_grad = _loss_and_grad(batch, cfg, parts, MinibatchTotals.of(batch["mask"]))
    torch.testing.assert_close(split_loss, whole_loss, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(split_grad, whole_grad, atol=1e-12, rtol=1e-10)
    assert whole_grad.abs().sum() > 0
    # each part's own denominators (no totals) give another loss: the totals are what make the sum equal
    own_loss, _ = _loss_and_grad(batch, cfg, parts, None)
    assert not torch.allclose(own_loss, whole_loss)


def test_totals_by_hand():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert MinibatchTotals.of(mask) == MinibatchTotals(tokens=3, rows_with_tokens=2, rows=3)


def test_dropped_tokens_cannot_be_split():
    batch = _batch(seed=0)

    def drop_row_zero(adv, delta, mask):
        keep = torch.ones_like(mask)
        keep[0] = False
        return torch.ones_like(adv), keep

    with pytest.raises(ValueError, match="drop_exploded_responses"):
        policy_loss(batch["logits"], batch["old"], batch["adv"], batch["mask"], LossConfig(),
                    token_weight=drop_row_zero, totals=MinibatchTotals.of(batch["mask"]))


def test_combine_metrics_by_hand():
    # token means weighted 3 : 1, losses (already over the minibatch's totals) added
    parts = [({"clip_frac": 0.2, "pg_loss": 0.5}, 3), ({"clip_frac": 0.6, "pg_loss": -0.1}, 1)]
    out = combine_metrics(parts, summed=("pg_loss",))
    assert out == pytest.approx({"clip_frac": 0.2 * 0.75 + 0.6 * 0.25, "pg_loss": 0.4})


# ---- in the trainer ------------------------------------------------------------------------------------------
def _trainer(model_dir, run_dir, *extra):
    cfg = load_config(None, [f"model.name={model_dir}", f"output.dir={run_dir}", "rollout.prompts_per_step=3",
                             "rollout.group_size=4", "task.lab.eval_size=4", "task.lab.train_size=50", "eval.k=1",
                             "sampling.max_new_tokens=16", "reward.overlong_max=10", "reward.overlong_buffer=8",
                             "train.lr=1e-6", "train.grad_clip=1000", "loss.kl_coef=0.1", "train.seed=3", *extra])
    trainer = Trainer(cfg, show_progress=False)
    trainer._build_optimizer()
    return trainer


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_an_update_in_micro_batches_equals_the_unsplit_update(tiny_lab_model_dir, tmp_path, monkeypatch, agg):
    import creditrl.trainer as trainer_module

    gradients = []  # each optimizer step's gradient, as the masters hold it before clipping
    step = trainer_module.apply_gradients

    def recorded(optimizer, masters, max_norm):
        gradients.append([p.grad.clone() for p in masters.parameters()])
        return step(optimizer, masters, max_norm)

    monkeypatch.setattr(trainer_module, "apply_gradients", recorded)
    extra = (f"loss.agg={agg}", "loss.norm_length=16", "train.n_minibatches=2")
    whole = _trainer(tiny_lab_model_dir, tmp_path / "whole", *extra)
    split = _trainer(tiny_lab_model_dir, tmp_path / "split", *extra, "train.max_tokens_per_microbatch=100")
    rollouts, _ = whole.collect()
    width = int((rollouts.prompt_mask.sum(1) + rollouts.response_mask.sum(1)).max())
    assert width <= 100 < 6 * width  # a minibatch of 6 rows takes several micro-batches
    whole._score_old(rollouts, OldLogprobs.RECOMPUTE)
    scored = rollouts.old_logprobs, rollouts.ref_logprobs
    split._score_old(rollouts, OldLogprobs.RECOMPUTE)  # micro-batched scoring gives the same log-probs
    m = rollouts.response_mask  # the two pad differently: compared on response tokens
    for a, b in zip(scored, (rollouts.old_logprobs, rollouts.ref_logprobs)):
        torch.testing.assert_close(b[m], a[m], atol=1e-5, rtol=1e-5)
    advantages = torch.where(rollouts.response_mask, torch.randn(rollouts.response_mask.shape), 0.0)
    metrics = {"whole": {}, "split": {}}
    assert whole._update(rollouts, advantages, metrics["whole"], OldLogprobs.RECOMPUTE) is None
    assert split._update(rollouts, advantages, metrics["split"], OldLogprobs.RECOMPUTE) is None
    assert len(gradients) == 4  # two minibatches each
    names = [name for name, _ in whole.policy.model.named_parameters()]
    for whole_step, split_step in zip(gradients[:2], gradients[2:]):
        for name, a, b in zip(names, whole_step, split_step):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert all(g.abs().sum() > 0 for g in gradients[0][-3:])
    for key in ("loss", "pg_loss", "kl", "clip_frac", "grad_norm"):
        assert metrics["split"][key] == pytest.approx(metrics["whole"][key], rel=1e-4, abs=1e-6), key
