"""Every method's credit on the same rollouts: what the loss would use, skips that never crash, the tidy
table, saved rollouts and the `creditrl credit` command."""

from __future__ import annotations

import json

import pytest
import torch
from factories import make_rollouts
from typer.testing import CliRunner

import creditrl.methods as registry
from creditrl.cli import app
from creditrl.collect import collect_rollouts
from creditrl.credit import compute_credit, credit_frame, credit_table, load_rollouts, save_rollouts
from creditrl.hidden_states import StoredHiddenStates
from creditrl.methods import Component, Method, compute_advantages, known_methods
from creditrl.policy.loading import load_policy
from creditrl.policy.transformers_backend import SamplingConfig
from creditrl.rewards import RewardConfig
from creditrl.tasks.lab import LabTask, LabTaskConfig


@pytest.fixture(scope="module")
def lab():
    """The bundled lab model's rollouts: 2 held-out prompts × 4 responses."""
    policy = load_policy("lab")
    task = LabTask(LabTaskConfig(train_size=1, eval_size=2))
    problems = task.eval_problems()
    batch = collect_rollouts(policy, task, problems, 4, SamplingConfig(max_new_tokens=48), RewardConfig(), seed=0)
    assert batch.correct.any() and not batch.correct.all()  # some group has reward spread: advantages are not all 0
    return policy, batch, [p.prompt for p in problems]


@pytest.fixture(scope="module")
def maps(lab):
    policy, batch, prompts = lab
    return compute_credit(batch, prompts, policy)


def test_every_registered_method_is_computed_or_skipped(lab, maps):
    _, batch, _ = lab
    assert set(maps.credit) | set(maps.skipped) == set(known_methods())
    assert not set(maps.credit) & set(maps.skipped)
    # on the lab everything runs except methods that need a trainer resource (a sampler, a critic, ...)
    assert {"grpo", "dr_grpo", "rloo", "dapo", "fipo", "grpo_lambda", "grpo_lambda_weight", "process_grpo",
            "denser"} <= set(maps.credit)
    assert all("needs" in why for why in maps.skipped.values())
    mask = batch.response_mask.bool()
    for name, credit in maps.credit.items():
        assert credit.shape == batch.response_mask.shape and torch.isfinite(credit).all(), name
        assert (credit[~mask] == 0).all(), name
        assert maps.notes[name]


def test_credit_is_what_the_loss_uses_at_the_first_update(lab, maps):
    _, batch, _ = lab
    mask = batch.response_mask.bool()
    for name in ("grpo", "rloo", "process_grpo"):
        torch.testing.assert_close(maps.credit[name], compute_advantages(name, batch))
        assert maps.notes[name] == "advantage A"
    # FIPO at Δ = 0: exp(0) = 1 after its clip, so its credit is DAPO's advantage and the note says so
    torch.testing.assert_close(maps.credit["fipo"], compute_advantages("dapo", batch))
    assert "f = 1 on every token" in maps.notes["fipo"]
    # GRPO-λ (ε-trace): the traced ratio lives in the loss; the advantage is shown as computed
    torch.testing.assert_close(maps.credit["grpo_lambda"], compute_advantages("grpo_lambda", batch))
    assert "ratio transform" in maps.notes["grpo_lambda"]
    # GRPO-λ (ε-weight): A·c_k, c_k = Σ_{t ≥ k} (γλ)^(t−k) over the response, scaled to mean 1 (a plain loop)
    adv = compute_advantages("grpo_lambda_weight", batch)
    expected = torch.zeros_like(adv)
    for b in range(batch.batch_size):
        n = int(mask[b].sum())
        c = [sum(0.99 ** (t - k) for t in range(k, n)) for k in range(n)]
        mean = sum(c) / n
        expected[b, :n] = adv[b, :n] * torch.tensor([x / mean for x in c], dtype=adv.dtype)
    torch.testing.assert_close(maps.credit["grpo_lambda_weight"], expected, rtol=1e-5, atol=1e-6)


def test_denser_gets_the_hidden_states_of_the_old_logprob_forward(lab, maps):
    policy, batch, _ = lab
    with torch.no_grad():  # one forward over the whole batch (the credit code goes group by group)
        scores = policy.score(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
                              with_hidden=True)
    whole = StoredHiddenStates(scores.hidden_states, batch_size=batch.batch_size)
    torch.testing.assert_close(maps.credit["denser"], compute_advantages("denser", batch, hidden_states=whole),
                               rtol=1e-4, atol=1e-5)


def test_tidy_table(lab, maps):
    policy, batch, _ = lab
    rows = credit_table(maps)
    lengths = batch.response_mask.sum(1).tolist()
    assert len(rows) == len(maps.credit) * sum(lengths)
    assert set(rows[0]) == {"prompt", "response", "position", "token", "step", "correct", "method", "credit"}
    grpo = [r for r in rows if r["method"] == "grpo"]
    for b in range(batch.batch_size):
        mine = [r for r in grpo if r["response"] == b]
        assert [r["position"] for r in mine] == list(range(lengths[b]))
        assert [r["credit"] for r in mine] == pytest.approx(maps.credit["grpo"][b, : lengths[b]].tolist())
        assert {r["prompt"] for r in mine} == {batch.problem_index[b]}
        text = "".join(r["token"] for r in mine)
        ends_with_eos = int(batch.response_ids[b, lengths[b] - 1]) in policy.eos_ids
        assert text == batch.response_texts[b] + ("<eos>" if ends_with_eos else "")
        assert [r["step"] for r in mine] == batch.step_ids[b, : lengths[b]].tolist()


def test_credit_frame_needs_pandas(maps):
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pandas"):
            credit_frame(maps)
    else:
        assert len(credit_frame(maps)) == len(credit_table(maps))


def test_a_method_that_cannot_run_is_skipped_with_the_reason(monkeypatch):
    def boom(rollouts, params):
        raise RuntimeError("kaboom")

    def nan_on_one_token(rollouts, params):
        return torch.where(rollouts.response_mask & (torch.arange(rollouts.response_mask.shape[1]) == 1),
                           torch.nan, 0.0)

    monkeypatch.setitem(registry.ADVANTAGES, "boom", Component(boom))
    monkeypatch.setitem(registry.ADVANTAGES, "needy", Component(boom, needs=("sampler",)))
    monkeypatch.setitem(registry.ADVANTAGES, "nan", Component(nan_on_one_token))
    for name in ("boom", "needy", "nan"):
        monkeypatch.setitem(registry.METHODS, name, Method(name, advantage=name))
    batch = make_rollouts([1, 0], [0, 0], [2, 3])  # no step rewards, no hidden states, no policy
    maps = compute_credit(batch, ["a prompt"], methods=["grpo", "process_grpo", "denser", "boom", "needy", "nan"])
    assert list(maps.credit) == ["grpo"] and list(maps.notes) == ["grpo"]
    assert "not finite" in maps.skipped["nan"]  # the heatmap's colour scale would have been NaN
    assert "step rewards" in maps.skipped["process_grpo"]
    assert "hidden states" in maps.skipped["denser"]
    assert maps.skipped["boom"] == "RuntimeError: kaboom"
    assert "sampler" in maps.skipped["needy"]
    assert maps.tokens == [["0", "0"], ["0", "0", "0"]]  # without a tokenizer, tokens show as ids


def test_saved_rollouts_load_back(lab, tmp_path):
    _, batch, prompts = lab
    save_rollouts(tmp_path / "r.pt", batch, prompts)
    loaded, loaded_prompts = load_rollouts(tmp_path / "r.pt")
    assert loaded_prompts == prompts
    assert loaded.response_texts == batch.response_texts and loaded.problem_index == batch.problem_index
    for name in ("response_ids", "response_mask", "step_ids", "step_labels", "step_rewards", "rewards", "correct"):
        torch.testing.assert_close(getattr(loaded, name), getattr(batch, name), equal_nan=True)


def test_credit_command(tiny_lab_model_dir, tmp_path):
    runner = CliRunner()
    common = ["task.lab.train_size=4", "task.lab.eval_size=2", "sampling.max_new_tokens=12",
              "--model", str(tiny_lab_model_dir), "--prompts", "2", "--group-size", "2"]
    page, data, saved = tmp_path / "credit.html", tmp_path / "credit.json", tmp_path / "rollouts.pt"
    result = runner.invoke(app, ["credit", *common, "--out", str(page), "--json", str(data),
                                 "--save-rollouts", str(saved)])
    out = " ".join(result.output.split())
    assert result.exit_code == 0, out
    assert "credit accuracy" in out and "heat map:" in out and "grpo" in out
    assert page.read_text().count('<section class="prompt"') == 2
    first = json.loads(data.read_text())
    assert set(first["metrics"]) | set(first["skipped"]) == set(known_methods())
    assert {r["method"] for r in first["credit"]} == set(first["metrics"])
    # the same rollouts read back give the same credit
    result = runner.invoke(app, ["credit", *common, "--rollouts", str(saved), "--out", str(page), "--json", str(data)])
    assert result.exit_code == 0, result.output
    assert json.loads(data.read_text())["credit"] == first["credit"]
    result = runner.invoke(app, ["credit", *common, "--methods", "grpo,magic", "--out", str(page)])
    assert result.exit_code == 2 and "unknown method 'magic'" in " ".join(result.output.split())


def test_credit_command_reports_each_step_label_of_a_two_label_task(tiny_lab_model_dir, tmp_path):
    common = ["task.name=countdown", "task.train_size=4", "task.eval_size=2", "sampling.max_new_tokens=12",
              "--model", str(tiny_lab_model_dir), "--prompts", "2", "--group-size", "2", "--methods", "grpo,vineppo"]
    data, saved = tmp_path / "credit.json", tmp_path / "rollouts.pt"
    result = CliRunner().invoke(app, ["credit", *common, "--out", str(tmp_path / "c.html"), "--json", str(data),
                                      "--save-rollouts", str(saved)])
    assert result.exit_code == 0, result.output
    assert "against the step label 'valid'" in " ".join(result.output.split())
    report = json.loads(data.read_text())
    assert set(report["metrics_by_label"]) == {"valid", "solvable"}
    assert report["metrics_by_label"]["solvable"] == report["metrics"]  # solvable is the primary label
    batch, _ = load_rollouts(saved)
    assert [set(row) for row in batch.named_step_labels] == [{"valid", "solvable"}] * 4
