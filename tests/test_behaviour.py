import pytest

from creditrl.behaviour import (
    VERIFY_PHRASES,
    accuracy_by_length,
    answer_revisions,
    behaviour_metrics,
    correct_diversity,
    length_stats,
    self_verify_rate,
)
from creditrl.cli import _format_metric
from creditrl.configure import load_config
from creditrl.evaluate import by_difficulty, difficulty_breakdown, evaluate, majority_correct, pass_at_k
from creditrl.policy.transformers_backend import SamplingConfig
from creditrl.tasks.base import Problem, Verdict
from creditrl.tasks.lab import LabTask, LabTaskConfig


def test_length_stats_interpolate_percentiles():
    assert length_stats([1, 2, 3, 4, 10]) == pytest.approx(
        {"length_p10": 1.4, "length_p50": 3.0, "length_p90": 7.6, "length_max": 10.0})


def test_self_verify_rate_matches_whole_phrases_in_any_case():
    texts = ["Wait, 3+4=7", "I awaited the answer", "Let me CHECK: ok", "we double-check it", "Answer: 3"]
    assert self_verify_rate(texts) == pytest.approx(3 / 5)
    assert self_verify_rate(["Hmm.", "hmmm"], phrases=["hmm"]) == 0.5
    assert self_verify_rate(texts, phrases=[]) == 0.0


def test_answer_revisions_count_changes_between_stated_answers():
    assert answer_revisions("1+2=3\nAnswer: 3\nAnswer: 4\nAnswer: 4\nAnswer: 3") == 2
    assert answer_revisions("1+2=3\nAnswer: 3") == 0
    assert answer_revisions("Answer: 3\nAnswer: 3") == 0
    assert answer_revisions("no answer at all") == 0
    assert answer_revisions("so \\boxed{2}\nwait\n#### 3\nThe final answer is \\boxed{3}") == 1
    assert answer_revisions("Answer: \\boxed{3}\n\\boxed{3}") == 0


def test_correct_diversity_per_prompt_with_two_correct_samples():
    texts = ["A b", "a  B", "c d", "x y", "only one", "p q p q", "p q"]
    correct = [True, True, True, False, True, True, True]
    problem = [0, 0, 0, 0, 1, 2, 2]
    # prompt 0: solutions {"a b", "c d"} of 3 -> 2/3; bigrams (a,b) (a,b) (c,d) -> 2/3
    # prompt 1: one correct sample, left out; prompt 2: 2/2 solutions; bigrams (p,q) (q,p) (p,q) (p,q) -> 2/4
    assert correct_diversity(texts, correct, problem) == pytest.approx(
        {"distinct_correct_ratio": (2 / 3 + 1) / 2, "distinct_2gram_ratio": (2 / 3 + 1 / 2) / 2})
    assert correct_diversity(texts, [False] * 7, problem) == {}


def test_accuracy_by_length_quartiles():
    lengths = [1, 2, 3, 4, 5, 6, 7, 8]  # quartile edges 2.75, 4.5, 6.25
    correct = [True, True, False, False, True, False, False, False]
    assert accuracy_by_length(lengths, correct) == {"acc_len_q1": 1.0, "acc_len_q2": 0.0, "acc_len_q3": 0.5,
                                                    "acc_len_q4": 0.0}
    assert accuracy_by_length([5, 5, 5, 5], [True, False, False, False]) == {"acc_len_q1": 0.25}


def test_behaviour_metrics_is_flat_and_numeric():
    texts = ["Answer: 1\nWait\nAnswer: 2", "Answer: 2", "Answer: 2"]
    metrics = behaviour_metrics(texts, [False, True, True], [0, 0, 0], [5, 2, 2])
    assert metrics["self_verify_rate"] == pytest.approx(1 / 3)
    assert metrics["answer_revisions_mean"] == pytest.approx(1 / 3)
    assert metrics["revised_rate"] == pytest.approx(1 / 3)
    assert metrics["distinct_correct_ratio"] == 0.5
    assert all(isinstance(v, float) for v in metrics.values())


def _verdicts(*rows: str) -> list[list[Verdict]]:
    """'3+3-' -> answers 3, 3, 3 with the first two correct (a trailing sign per sample)."""
    return [[Verdict(correct=ok == "+", answer=a) for a, ok in zip(row[::2], row[1::2])] for row in rows]


def test_by_difficulty_applies_pass_at_k_and_maj_at_k_per_group():
    problems = [Problem(str(i), "q", "3", {"steps": s}) for i, s in enumerate([2, 3, 2])]
    per_problem = _verdicts("3+4-5-", "1-1-1-", "3+3+1-")
    metrics = by_difficulty(problems, per_problem)
    two = [per_problem[0], per_problem[2]]
    assert metrics["avg@k_steps=2"] == pytest.approx(3 / 6)
    assert metrics["pass@k_steps=2"] == pytest.approx(sum(pass_at_k(3, c, 3) for c in (1, 2)) / 2)
    assert metrics["maj@k_steps=2"] == pytest.approx(
        sum(majority_correct([v.answer for v in vs], [v.correct for v in vs]) for vs in two) / 2)
    assert metrics["maj@k_steps=2"] == 1.0  # problem 0 is a three-way tie: the first seen (correct) answer wins
    assert (metrics["avg@k_steps=3"], metrics["pass@k_steps=3"], metrics["maj@k_steps=3"]) == (0.0, 0.0, 0.0)


def test_by_difficulty_reads_math_level_and_skips_problems_without_one():
    problems = [Problem("a", "q", "3", {"level": 5}), Problem("b", "q", "3", {})]
    assert set(by_difficulty(problems, _verdicts("3+", "3+"))) == {"avg@k_level=5", "pass@k_level=5", "maj@k_level=5"}
    assert by_difficulty([Problem("c", "q", "3")], _verdicts("3+")) == {}


def test_a_generated_tasks_difficulty_is_broken_down_into_rows():
    problems = [Problem(str(i), "q", "3", {"difficulty": d}) for i, d in enumerate([4, 3, 4])]
    metrics = {"avg@k": 0.5, **by_difficulty(problems, _verdicts("3+3-", "3-3-", "3+3+"))}
    # difficulty 3: no right sample; difficulty 4: 3 of 4 right, both problems solved, both majorities right
    assert difficulty_breakdown(metrics) == ("difficulty", {"3": {"avg@k": 0.0, "pass@k": 0.0, "maj@k": 0.0},
                                                            "4": {"avg@k": 0.75, "pass@k": 1.0, "maj@k": 1.0}})
    assert difficulty_breakdown({"avg@k": 0.5, "greedy": 0.25}) is None


@pytest.mark.slow
def test_evaluate_reports_behaviour_and_difficulty_metrics(tiny_policy):
    task = LabTask(LabTaskConfig(eval_size=3))
    problems = task.eval_problems()
    sampling = SamplingConfig(max_new_tokens=8)
    metrics = evaluate(tiny_policy, task, problems, 2, sampling, seed=0, greedy=False)
    for key in ("length_p10", "length_p50", "length_p90", "length_max", "self_verify_rate", "answer_revisions_mean",
                "acc_len_q1"):
        assert key in metrics
    steps = {p.meta["steps"] for p in problems}
    assert {f"pass@k_steps={s}" for s in steps} <= set(metrics)
    plain = evaluate(tiny_policy, task, problems, 2, sampling, seed=0, greedy=False, behaviour=False)
    assert set(plain) == {"avg@k", "avg@k_se", "pass@1", "pass@2", "maj@k", "mean_length", "k"}


def test_config_and_cli_formatting():
    assert load_config(None, []).eval.verify_phrases == list(VERIFY_PHRASES)
    assert load_config(None, ["eval.verify_phrases=[hmm, oops]"]).eval.verify_phrases == ["hmm", "oops"]
    assert _format_metric("pass@k_steps=3", 0.25) == "25.0%"
    assert _format_metric("acc_len_q2", 0.5) == "50.0%"
    assert _format_metric("length_p90", 37.5) == "37.5"
    assert _format_metric("answer_revisions_mean", 0.25) == "0.25"
