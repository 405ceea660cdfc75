"""Process reward models: the oracle PRM, step-score aggregation, and RL with PRM step scores."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from factories import make_rollouts

from creditrl.config import ConfigError
from creditrl.configure import load_config
from creditrl.methods import compute_advantages
from creditrl.methods.prm import min_form_returns, with_outcome
from creditrl.prm import OracleLabPRM, TrainedPRM
from creditrl.prm.prm800k import load_prm800k
from creditrl.prm.scoring import best_of_n, solution_scores
from creditrl.tasks.errors import DatasetError
from creditrl.trainer import Trainer

nan = float("nan")


class FixedPRM:
    """A PRM that returns the same step scores for any batch."""

    def __init__(self, scores):
        self.scores = torch.tensor(scores)

    def score_steps(self, rollouts):
        return self.scores


# ---- PURE min-form, by hand ------------------------------------------------------------------

def test_hard_min_form_is_the_minimum_of_the_remaining_steps():
    returns = min_form_returns(torch.tensor([[0.9, 0.2, 0.6], [0.5, 0.7, nan]]), "hard", 0.1)
    assert torch.allclose(returns, torch.tensor([[0.2, 0.2, 0.6], [0.5, 0.7, 0.0]]))


def test_soft_min_form_by_hand():
    # equal scores: weights ½, ½ -> s* = (0.25, 0.25) -> G = (0.5, 0.25)
    assert torch.allclose(min_form_returns(torch.tensor([[0.5, 0.5]]), "soft", 0.1), torch.tensor([[0.5, 0.25]]))
    # scores (1, 0), T = 0.1: weights (e^-10, 1) / (1 + e^-10); s* = (e^-10 / (1 + e^-10), 0)
    w = math.exp(-10) / (1 + math.exp(-10))
    assert torch.allclose(min_form_returns(torch.tensor([[1.0, 0.0, nan]]), "soft", 0.1),
                          torch.tensor([[w, 0.0, 0.0]]), atol=1e-9)
    # a low temperature recovers min_j s_j up to the worst step, 0 after it
    assert torch.allclose(min_form_returns(torch.tensor([[0.9, 0.2, 0.6]]), "soft", 1e-3),
                          torch.tensor([[0.2, 0.2, 0.0]]), atol=1e-6)


def test_pure_advantage_by_hand():
    # row 0: steps 0,0,1,1 scored (0.9, 0.2), R = 1;  row 1: steps 0,1,1 scored (0.6, 0.8), R = 0.
    # hard returns: G0 = (0.2, 0.2), G1 = (0.6, 0.8); with w = 1: V0 = 1.2, V1 = 0.6 (the RLOO baselines swap)
    r = make_rollouts([1.0, 0.0], [0, 0], [4, 3], step_ids=[[0, 0, 1, 1, -1], [0, 1, 1, -1, -1]])
    prm = FixedPRM([[0.9, 0.2], [0.6, 0.8]])
    adv = compute_advantages("pure", r, {"min_form": "hard"}, prm=prm)
    expected = torch.tensor([[0.6, 0.6, 0.6, 0.6, 0.0], [-0.6, -0.4, -0.4, 0.0, 0.0]])
    assert torch.allclose(adv.float(), expected)
    # without the outcome reward: b0 = 0.6, b1 = 0.2
    adv = compute_advantages("pure", r, {"min_form": "hard", "outcome_weight": 0.0}, prm=prm)
    assert torch.allclose(adv.float(), torch.tensor([[-0.4] * 4 + [0.0], [0.4, 0.6, 0.6, 0.0, 0.0]]))
    # a group of one gets 0
    single = make_rollouts([1.0], [0], [2], step_ids=[[0, 1]])
    assert compute_advantages("pure", single, {}, prm=FixedPRM([[0.3, 0.9]])).abs().sum() == 0


def test_prm_grpo_adds_the_outcome_at_the_last_step_and_reuses_process_grpo():
    r = make_rollouts([1.0, 0.0], [0, 0], [3, 2], step_ids=[[0, 1, 2], [0, 1, -1]])
    scores = torch.tensor([[0.9, 0.8, nan], [0.5, 0.1, nan]])
    step_rewards = with_outcome(scores, r, 1.0)
    # row 0's last step was unscored: it gets the outcome alone
    assert torch.allclose(step_rewards, torch.tensor([[0.9, 0.8, 1.0], [0.5, 0.1, nan]]), equal_nan=True)
    adv = compute_advantages("prm", r, {}, prm=FixedPRM(scores.tolist()))
    by_hand = compute_advantages("process_grpo", make_rollouts([1.0, 0.0], [0, 0], [3, 2],
                                 step_ids=[[0, 1, 2], [0, 1, -1]], step_rewards=step_rewards.tolist()), {})
    assert torch.allclose(adv.float(), by_hand.float())


def test_prm_grpo_gives_an_empty_response_no_step():
    # group of 3: row 0 has steps 0, 1, 1; row 1 has step 0; row 2 is empty (no steps); R = (0, 1, 1), w = 1.
    # Step rewards: row 0 (0.9, 0.2 + 0), row 1 (0.8 + 1), row 2 none: the statistics see 0.9, 0.2, 1.8 only.
    r = make_rollouts([0.0, 1.0, 1.0], [0, 0, 0], [3, 1, 0], step_ids=[[0, 1, 1], [0, -1, -1], [-1, -1, -1]])
    scores = [[0.9, 0.2], [0.8, nan], [nan, nan]]
    step_rewards = with_outcome(torch.tensor(scores), r, 1.0)
    assert torch.isnan(step_rewards[2]).all()  # no phantom step for the empty response
    valid = [0.9, 0.2, 1.8]
    mean, std = statistics.mean(valid), statistics.stdev(valid)
    z = [(x - mean) / (std + 1e-6) for x in valid]
    expected = torch.tensor([[z[0] + z[1], z[1], z[1]], [z[2], 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    adv = compute_advantages("prm", r, {}, prm=FixedPRM(scores))
    torch.testing.assert_close(adv.double(), expected, atol=1e-5, rtol=1e-5)
    assert adv[0, 0] == pytest.approx(-1.04, abs=0.005)


# ---- the oracle PRM ------------------------------------------------------------------------------

def test_oracle_without_noise_returns_the_labels():
    r = make_rollouts([1.0, 0.0], [0, 0], [2, 1], step_ids=[[0, 1], [0, -1]])
    r.step_labels = torch.tensor([[1, 0], [1, -1]])
    prm = OracleLabPRM()
    assert torch.allclose(prm.score_steps(r), torch.tensor([[1.0, 0.0], [1.0, nan]]), equal_nan=True)
    assert prm.metrics() == {"prm_forward_passes": 2.0}


def test_oracle_flips_at_the_configured_rates():
    n = 20000
    labels = torch.tensor([[1, 0]] * n)
    r = make_rollouts([0.0] * n, [0] * n, [2] * n, step_ids=[[0, 1]] * n)
    r.step_labels = labels
    prm = OracleLabPRM(false_positive=0.1, false_negative=0.3, seed=5)
    prm.reset(1)
    scores = prm.score_steps(r)
    fn_rate = (scores[:, 0] == 0).float().mean().item()
    fp_rate = (scores[:, 1] == 1).float().mean().item()
    tolerance = 4 * math.sqrt(0.3 * 0.7 / n)  # four standard errors
    assert abs(fn_rate - 0.3) < tolerance and abs(fp_rate - 0.1) < tolerance
    again = OracleLabPRM(false_positive=0.1, false_negative=0.3, seed=5)
    again.reset(1)
    assert torch.equal(again.score_steps(r), scores)  # seeded
    again.reset(2)
    assert not torch.equal(again.score_steps(r), scores)


def test_oracle_needs_step_labels():
    with pytest.raises(ValueError, match="step_labels"):
        OracleLabPRM().score_steps(make_rollouts([0.0], [0], [1]))


# ---- aggregation and best-of-N -----------------------------------------------------------------

def test_product_and_min_aggregation_by_hand():
    steps = torch.tensor([[0.9, 0.5, nan], [0.8, 0.8, 0.8], [nan, nan, nan]])
    assert torch.allclose(solution_scores(steps, "product"), torch.tensor([0.45, 0.512, nan]), equal_nan=True)
    assert torch.allclose(solution_scores(steps, "min"), torch.tensor([0.5, 0.8, nan]), equal_nan=True)
    with pytest.raises(ValueError, match="aggregation"):
        solution_scores(steps, "mean")


def test_best_of_n_picks_each_groups_top_score():
    scores = torch.tensor([0.45, 0.512, nan, 0.2, 0.2])
    assert best_of_n(scores, torch.tensor([0, 0, 0, 1, 1])).tolist() == [1, 3]


# ---- end to end: the bundled lab model with the oracle PRM -------------------------------------

@pytest.mark.parametrize("method", ["prm", pytest.param("pure", marks=pytest.mark.slow)])
def test_rl_with_the_oracle_prm_on_the_lab_model(tmp_path, method):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", f"method={method}", "train.steps=2",
                             "rollout.prompts_per_step=3", "rollout.group_size=4", "task.lab.train_size=30",
                             "task.lab.eval_size=2", "eval.k=1", "eval.before=false", "sampling.max_new_tokens=64",
                             "prm.false_positive=0.1", "prm.false_negative=0.1", "train.threads=1"])
    trainer = Trainer(cfg, show_progress=False)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for m in records:
        assert all(math.isfinite(v) for v in m.values())
        assert m["prm_forward_passes"] == m["responses"] == 12
    assert any(m["adv_abs_mean"] > 0 and m["grad_norm"] > 0 for m in records)


# ---- PRM800K -------------------------------------------------------------------------------------

FIXTURE = Path(__file__).parent / "fixtures" / "prm800k_mini.jsonl"
ALL_REASONS = ("found_error", "solution", "bad_problem", "give_up")


def test_prm800k_fixture_rows():
    examples = load_prm800k(FIXTURE, finish_reasons=ALL_REASONS)
    assert [e.finish_reason for e in examples] == ["solution", "found_error", "solution", "bad_problem", "give_up"]
    first, error, human, _, _ = examples
    assert first.problem == "What is $3 + 4 \\cdot 2$?" and first.source == f"{FIXTURE}:1"
    assert first.steps[1] == "Hmm, let me think about the order of operations."  # the chosen completion, not the −1 one
    assert first.labels == (1, 1, 1, 1)  # the neutral step counts as right by default
    assert error.labels == (1, 0) and error.steps[1] == "So the count is $(2)(1) = 2$."  # stops at the first error
    # the labeller rewrote step 2 after rating a completion −1: that error is the last labelled step
    assert human.labels == (1, 0) and human.steps[1] == "$2^4 = 14$."
    assert load_prm800k(FIXTURE, neutral="negative", finish_reasons=ALL_REASONS)[0].labels == (1, 0, 1, 1)
    assert [e.finish_reason for e in load_prm800k(FIXTURE)] == ["solution", "found_error", "solution"]


def _row(**label):
    steps = [{"completions": [{"text": "$1 + 1 = 2$.", "rating": 1, "flagged": False}], "human_completion": None,
              "chosen_completion": 0}]
    return {"question": {"problem": "What is 1 + 1?"}, "label": {"steps": steps, "finish_reason": "solution", **label}}


def _bad_rows():
    no_problem = _row()
    del no_problem["question"]["problem"]
    bad_rating = _row()
    bad_rating["label"]["steps"][0]["completions"][0]["rating"] = 5
    bad_chosen = _row()
    bad_chosen["label"]["steps"][0]["chosen_completion"] = 3
    bad_text = _row()
    bad_text["label"]["steps"][0]["completions"][0]["text"] = None
    no_completions = _row()
    del no_completions["label"]["steps"][0]["completions"]
    return [
        ("{not json", "not valid JSON"),
        (no_problem, "question.problem: missing"),
        (_row(finish_reason="done"), "label.finish_reason: expected one of"),
        (_row(steps={"0": 1}), "label.steps: expected list, got dict"),
        (_row(steps=["a step"]), "label.steps[0]: expected an object"),
        (no_completions, "label.steps[0].completions: missing"),
        (bad_rating, "label.steps[0].completions[0].rating: expected -1, 0, 1 or null, got 5"),
        (bad_chosen, "label.steps[0].chosen_completion: expected an index into 1 completions or null, got 3"),
        (bad_text, "label.steps[0].completions[0].text: expected str, got NoneType"),
    ]


@pytest.mark.parametrize("bad, message", _bad_rows())
def test_prm800k_errors_name_file_line_and_field(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    line = bad if isinstance(bad, str) else json.dumps(bad)
    path.write_text(json.dumps(_row()) + "\n\n" + line + "\n")
    with pytest.raises(DatasetError) as err:
        load_prm800k(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


# ---- a PRM trained on lab step labels, and the `creditrl prm` commands --------------------------

@pytest.mark.slow
def test_trained_prm_round_trip_and_cli(tmp_path):
    from typer.testing import CliRunner

    from creditrl.cli import app

    out = tmp_path / "prm"
    runner = CliRunner()
    result = runner.invoke(app, ["prm", "train", "--out", str(out), "problems=8", "group_size=4", "epochs=2",
                                 "max_new_tokens=48", "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "prm_train.json").read_text())
    assert report["epoch_losses"][-1] < report["epoch_losses"][0]
    assert report["after"]["steps"] > 0 and 0 <= report["after"]["step_accuracy"] <= 1

    r = make_rollouts([1.0, 0.0], [0, 0], [4, 2], step_ids=[[0, 0, 1, 2], [0, 1, -1, -1]])
    r.response_ids = torch.tensor([[5, 6, 7, 8], [5, 9, 0, 0]])
    prm = TrainedPRM(out)
    scores = prm.score_steps(r)
    assert scores.shape == (2, 3) and torch.isnan(scores[1, 2]) and not torch.isnan(scores[:, :2]).any()
    assert ((scores[:, :2] > 0) & (scores[:, :2] < 1)).all() and prm.metrics() == {"prm_forward_passes": 2.0}
    half = TrainedPRM(out, dtype=torch.bfloat16).score_steps(r)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, scores, atol=0.05, rtol=0.05, equal_nan=True)
    from creditrl.prm import PRMConfig, build_prm

    config = PRMConfig(kind="trained", path=str(out), device="cpu")
    build_prm(config, str, prm.tokenizer.get_vocab())  # the policy's tokenizer: accepted
    with pytest.raises(ValueError, match="has another tokenizer than the policy's"):
        build_prm(config, str, {**prm.tokenizer.get_vocab(), "an extra token": 10_000})

    result = runner.invoke(app, ["prm", "score", "--prm", str(out), "--n", "3", "--problems", "2",
                                 "--max-new-tokens", "48", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "best_of_n_product" in result.output and "majority_vote" in result.output
    from factories import save_lab_model

    from creditrl.lab.tokenizer import build_char_tokenizer

    other = save_lab_model(tmp_path / "other-policy", hidden=16, layers=1, heads=2, ffn=32)
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["<an extra token>"])
    tokenizer.save_pretrained(other)
    result = runner.invoke(app, ["prm", "score", "--prm", str(out), "--model", str(other), "--n", "2",
                                 "--problems", "1"])
    assert result.exit_code == 2 and "another tokenizer than the policy's" in " ".join(result.output.split())

    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", "method=pure", "prm.kind=trained", f"prm.path={out}",
                             "train.steps=1", "rollout.prompts_per_step=2", "rollout.group_size=3",
                             "task.lab.train_size=20", "task.lab.eval_size=2", "eval.k=1", "eval.before=false",
                             "sampling.max_new_tokens=48"])
    Trainer(cfg, show_progress=False).train()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["prm_forward_passes"] == 6 and math.isfinite(record["adv_abs_mean"])


def test_best_of_n_with_the_oracle_prm_beats_single_samples():
    from creditrl.policy.loading import load_policy
    from creditrl.policy.transformers_backend import SamplingConfig
    from creditrl.prm.rerank import rerank_report
    from creditrl.tasks.lab import LabTask, LabTaskConfig

    task = LabTask(LabTaskConfig(train_size=10, eval_size=6))
    report = rerank_report(load_policy("lab"), task, task.eval_problems(), OracleLabPRM(), 4,
                           SamplingConfig(max_new_tokens=64), seed=0)
    # an exact PRM ranks responses whose steps are all right first, and those are (nearly always) the right ones
    assert report["pass"] >= report["best_of_n_product"] >= report["avg"]
    assert report["pass"] >= report["best_of_n_min"] >= report["avg"]
    assert 0 <= report["majority_vote"] <= report["pass"]


def test_a_trained_prm_needs_a_path():
    with pytest.raises(ConfigError, match="prm.path"):
        load_config(None, ["method=pure", "prm.kind=trained"])


# ---- published-PRM interfaces, with tiny random models ------------------------------------------

def _tokenizer():
    from creditrl.lab.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["<extra_0>", "ки"])
    return tokenizer


def _llama(kind, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=2,
                         pad_token_id=tokenizer.pad_token_id)
    return (LlamaForTokenClassification if kind == "qwen" else LlamaForCausalLM)(config).eval()


STEPS = ["3*4=12", "12+5=17"]


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


QWEN_LIKE_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}")


def _scores_at(model, tokenizer, text, marker, classes):
    """The model card's reading: softmax over `classes` at every position holding the marker's id."""
    ids = tokenizer.encode(text)
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    marks = [i for i, t in enumerate(ids) if t == _ids(tokenizer, marker)[0]]
    return torch.softmax(logits[marks][:, classes], dim=-1)


@pytest.mark.parametrize("chat", [True, False])
def test_qwen_style_reads_class_one_at_each_separator_of_the_model_cards_chat(chat):
    from creditrl.prm.published import QwenStyleReader

    tokenizer = _tokenizer()
    if chat:
        tokenizer.chat_template = QWEN_LIKE_TEMPLATE
        text = ("<|im_start|>system\nPlease reason step by step, and put your final answer "
                "within \\boxed{}.<|im_end|>\n"
                "<|im_start|>user\n3*4+5?<|im_end|>\n"
                "<|im_start|>assistant\n3*4=12<extra_0>12+5=17<extra_0><|im_end|>\n")
    else:
        text = "3*4+5?\n3*4=12<extra_0>12+5=17<extra_0>"
    model = _llama("qwen", tokenizer)
    expected = _scores_at(model, tokenizer, text, "<extra_0>", [0, 1])[:, 1]
    reader = QwenStyleReader(model, tokenizer)
    assert reader.text("3*4+5?", STEPS) == text
    assert torch.allclose(torch.tensor(reader.score("3*4+5?", STEPS)), expected, atol=1e-6)
    # a separator written inside a step is not a step's end
    assert torch.allclose(torch.tensor(reader.score("3*4+5?", ["3*4=12<extra_0>", " 12+5=17"])), expected, atol=1e-6)
    with pytest.raises(ValueError, match="must be one token"):
        QwenStyleReader(model, tokenizer, separator="<sep>")


def test_shepherd_style_reads_p_plus_at_each_step_tag_of_the_model_cards_input():
    from creditrl.prm.published import ShepherdStyleReader

    tokenizer = _tokenizer()
    model = _llama("shepherd", tokenizer)
    text = "3*4+5? Step 1: 3*4=12 ки\nStep 2: 12+5=17 ки"
    plus, minus = (_ids(tokenizer, t)[0] for t in ("+", "-"))
    expected = _scores_at(model, tokenizer, text, "ки", [plus, minus])[:, 0]
    reader = ShepherdStyleReader(model, tokenizer)
    # numbered steps keep their numbers; a tag inside is dropped
    for steps in (STEPS, ["Step 1: 3*4=12", "12+5=17 ки"]):
        assert reader.text("3*4+5?", steps) == text
        assert torch.allclose(torch.tensor(reader.score("3*4+5?", steps)), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["qwen", "shepherd"])
def test_published_prm_scores_rollouts_from_config(tmp_path, kind):
    from creditrl.prm import PRMConfig, build_prm
    from creditrl.tasks.base import Problem

    tokenizer = _tokenizer()
    _llama(kind, tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    response = _ids(tokenizer, "3*4=12\n12+5=17")
    r = make_rollouts([1.0, 0.0], [0, 0], [len(response), 3],
                      step_ids=[[0] * 7 + [1] * 7, [0, 0, 0] + [-1] * 11])
    r.response_ids = torch.tensor([response, response[:3] + [0] * 11])
    r.problems = [Problem("p0", "3*4+5?", "17")] * 2
    prm = build_prm(PRMConfig(kind=kind, path=str(tmp_path)), decode)
    scores = prm.score_steps(r)
    assert scores.shape == (2, 2) and torch.isnan(scores[1, 1]) and not torch.isnan(scores[0]).any()
    assert torch.allclose(scores[0], torch.tensor(prm.reader.score("3*4+5?", ["3*4=12\n", "12+5=17"])))
    assert prm.metrics() == {"prm_forward_passes": 2.0}
    # the same PRM with bf16 weights: its weights are bf16, its scores close to float32's
    half = build_prm(PRMConfig(kind=kind, path=str(tmp_path), device="cpu", dtype="bfloat16"), decode)
    assert next(half.reader.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(half.score_steps(r), scores, atol=0.05, rtol=0.05, equal_nan=True)
    with pytest.raises(ValueError, match="prm.device: 'nowhere' is not a torch device"):
        build_prm(PRMConfig(kind=kind, path=str(tmp_path), device="nowhere"), decode)


def test_prm_trains_on_prm800k_examples(tmp_path):
    from typer.testing import CliRunner

    from creditrl.cli import app
    from creditrl.lab.tokenizer import build_char_tokenizer
    from creditrl.prm.train import examples_to_rollouts

    examples = load_prm800k(FIXTURE)
    data = examples_to_rollouts(examples, build_char_tokenizer())
    assert data.step_labels.tolist() == [[1, 1, 1, 1], [1, 0, -1, -1], [1, 0, -1, -1]]
    assert data.num_steps.tolist() == [4, 2, 2] and data.group_ids.tolist() == [0, 1, 2]
    last = data.response_mask.sum(1) - 1
    assert data.step_ids[torch.arange(3), last].tolist() == [3, 1, 1]  # each response ends with its last step
    out = tmp_path / "prm"
    result = CliRunner().invoke(app, ["prm", "train", "--out", str(out), "--prm800k", str(FIXTURE), "heldout=0.3",
                                      "epochs=1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "prm_train.json").read_text())
    assert (report["train_responses"], report["heldout_responses"]) == (2, 1)  # round(0.3 · 3 problems) = 1 held out


@pytest.mark.parametrize(("heldout", "held"), [(0.3, 1), (0.75, 2), (0.99, 2), (0.01, 1)])
def test_split_holds_out_at_least_one_problem_and_trains_on_at_least_one(heldout, held):
    from creditrl.prm.train import split_groups

    rows = make_rollouts([0.0] * 6, [0, 0, 1, 1, 2, 2], [2] * 6)
    train, heldout_rows = split_groups(rows, heldout, seed=0)
    assert heldout_rows.batch_size == 2 * held and train.batch_size == 6 - 2 * held
    assert not set(train.group_ids.tolist()) & set(heldout_rows.group_ids.tolist())
    with pytest.raises(ValueError, match="at least 2 problems"):
        split_groups(make_rollouts([0.0] * 2, [0, 0], [2, 2]), 0.5, seed=0)


def test_prm_commands_explain_bad_input(tmp_path):
    """No traceback: a PRM800K file without a usable row, or with one problem only."""
    from typer.testing import CliRunner

    from creditrl.cli import app

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    unusable = tmp_path / "give_up.jsonl"
    unusable.write_text(json.dumps({**rows[0], "label": {**rows[0]["label"], "finish_reason": "give_up"}}) + "\n")
    result = CliRunner().invoke(app, ["prm", "train", "--out", str(tmp_path / "a"), "--prm800k", str(unusable)])
    assert result.exit_code == 2 and "give_up.jsonl" in result.output and "no row has" in " ".join(
        result.output.split())
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(rows[0]) + "\n")
    result = CliRunner().invoke(app, ["prm", "train", "--out", str(tmp_path / "b"), "--prm800k", str(one), "epochs=1"])
    assert result.exit_code == 2 and "at least 2 problems" in " ".join(result.output.split())


def test_prm_only_rewards_draw_a_warning(tmp_path):
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", "method=prm", "method_params.outcome_weight=0",
                             "task.lab.train_size=10", "task.lab.eval_size=2"])
    Trainer(cfg, console=Console(file=buffer, width=300), show_progress=False)
    assert "reward hacking" in buffer.getvalue()
