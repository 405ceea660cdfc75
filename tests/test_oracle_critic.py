"""The lab's oracle critic: exact flags when perfect, the configured recall and precision when not."""

import pytest
import torch
from factories import make_rollouts

from creditrl.configure import load_config
from creditrl.critics import OracleLabCritic, build_step_critic
from creditrl.methods import compute_advantages
from creditrl.trainer import Trainer


def labelled(labels):
    """Rows with the given step labels (1 right, 0 wrong, −1 no step), one token per step."""
    width = len(labels[0])
    lengths = [sum(x >= 0 for x in row) for row in labels]
    step_ids = [[j if j < n else -1 for j in range(width)] for n in lengths]
    batch = make_rollouts([1.0] * len(labels), list(range(len(labels))), lengths, T=width, step_ids=step_ids)
    batch.step_labels = torch.tensor(labels)
    return batch


def test_a_perfect_oracle_flags_exactly_the_wrong_steps():
    batch = labelled([[1, 0, 1, 0], [1, 1, -1, -1], [0, -1, -1, -1]])
    verdicts = OracleLabCritic().wrong_steps(batch, k=3)
    assert verdicts == [[{1, 3}] * 3, [set()] * 3, [{0}] * 3]


def test_the_false_flag_rate_gives_the_configured_precision_by_hand():
    critic = OracleLabCritic(recall=0.5, precision=0.8)
    # 10 wrong and 40 right steps: expected true flags 0.5·10 = 5; 5 / (5 + f·40) = 0.8 → f = 1/32
    assert critic.false_flag_rate(10, 40) == pytest.approx(1 / 32)
    assert OracleLabCritic(recall=1.0, precision=0.1).false_flag_rate(10, 40) == 1.0  # clipped
    assert OracleLabCritic(precision=1.0).false_flag_rate(10, 40) == 0.0


@pytest.mark.parametrize("recall,precision", [(0.7, 0.8), (0.4, 0.5), (1.0, 0.9)])
def test_realised_recall_and_precision_match_the_settings(recall, precision):
    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(400, 6, generator=gen) < 0.8).long()  # ~20% wrong steps
    labels[:50, 4:] = -1
    batch = labelled(labels.tolist())
    critic = OracleLabCritic(recall, precision, seed=3)
    verdicts = critic.wrong_steps(batch, k=4)
    flags = [(b, j) for b, row in enumerate(verdicts) for v in row for j in v]  # counted independently of the critic
    true = sum(labels[b, j].item() == 0 for b, j in flags)
    wrong_total = 4 * int((labels == 0).sum())
    assert true / len(flags) == pytest.approx(precision, abs=0.03)
    assert true / wrong_total == pytest.approx(recall, abs=0.03)
    assert all(labels[b, j] >= 0 for b, j in flags)  # never a step that is not there
    metrics = critic.metrics()
    assert metrics["critic_calls"] == 1600 and metrics["critic_precision"] == pytest.approx(true / len(flags))


def test_flags_are_seeded_per_step():
    batch = labelled([[1, 0, 1, 0, 1, 1]] * 20)
    a, b = OracleLabCritic(0.5, 0.5, seed=1), OracleLabCritic(0.5, 0.5, seed=1)
    a.reset(7), b.reset(7)
    assert a.wrong_steps(batch, 2) == b.wrong_steps(batch, 2)
    a.reset(7), b.reset(8)  # each one's first draw after its reset: only the seeds differ
    assert a.wrong_steps(batch, 2) != b.wrong_steps(batch, 2)


def test_bad_settings_and_unlabelled_tasks_give_clear_errors():
    with pytest.raises(ValueError, match="recall"):
        OracleLabCritic(recall=1.5)
    batch = labelled([[1, 0]])
    batch.step_labels = None
    with pytest.raises(ValueError, match="critic.backend 'oracle' needs rollouts.step_labels"):
        OracleLabCritic().wrong_steps(batch, 1)


def test_capo_with_the_oracle_penalises_exactly_the_wrong_steps():
    batch = labelled([[1, 0, 1], [1, 1, 1]])
    batch.rewards = torch.tensor([0.0, 1.0], dtype=torch.float64)
    batch.correct = batch.rewards > 0
    batch.group_ids = torch.tensor([0, 0])
    adv = compute_advantages("capo", batch, {"k": 2}, critic=OracleLabCritic())
    # token rewards: row 0 = [0, −1, 0], row 1 = [2, 2, 2]; the group's 6 tokens: mean 5/6,
    # unbiased variance (0.69 + 3.36 + 0.69 + 3·1.36) / 5 = 8.83 / 5
    rewards = torch.tensor([[0.0, -1.0, 0.0], [2.0, 2.0, 2.0]])
    expected = (rewards - 5 / 6) / (((rewards - 5 / 6) ** 2).sum() / 5).sqrt()
    assert torch.allclose(adv.float(), expected, atol=1e-4)


@pytest.mark.slow
def test_the_default_critic_is_the_oracle_and_capo_trains_on_the_lab(tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", "method=capo", "train.steps=2",
                             "rollout.prompts_per_step=4", "rollout.group_size=4", "task.lab.train_size=40",
                             "task.lab.eval_size=4", "eval.k=1", "eval.before=false", "sampling.max_new_tokens=48",
                             "critic.recall=0.8", "critic.precision=0.9"])
    assert isinstance(build_step_critic(cfg.critic, str), OracleLabCritic)
    summary = Trainer(cfg, show_progress=False).train()
    assert summary["steps"] == 2
    logged = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"critic_calls": 64.0' in logged
