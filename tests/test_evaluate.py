from itertools import combinations

import pytest

from creditrl.evaluate import majority_correct, pass_at_k


@pytest.mark.parametrize("n,c,k", [(4, 0, 1), (4, 1, 1), (4, 2, 2), (5, 3, 2), (6, 1, 3), (8, 7, 4), (3, 3, 2)])
def test_pass_at_k_equals_the_fraction_of_k_subsets_holding_a_correct_sample(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 5"):
        pass_at_k(4, 1, 5)


def test_majority_vote():
    assert majority_correct(["3", "4", "3"], [True, False, True])
    assert not majority_correct(["4", "4", "3"], [False, False, True])
    assert not majority_correct([None, None], [False, False])
    assert majority_correct([None, "7"], [False, True])


def test_difficulty_values_of_mixed_types_are_reported_not_a_crash():
    from creditrl.evaluate import by_difficulty
    from creditrl.tasks.base import Problem, Verdict

    problems = [Problem(str(i), "q", "1", meta={"level": level}) for i, level in enumerate([2, "Level 3", 1, None])]
    verdicts = [[Verdict(correct=True)], [Verdict(correct=False)], [Verdict(correct=False)], [Verdict(correct=True)]]
    report = by_difficulty(problems, verdicts)
    assert [report[f"avg@k_level={v}"] for v in (1, 2, "Level 3", None)] == [0.0, 1.0, 0.0, 1.0]


def test_evaluation_reports_its_progress_call_by_call(tiny_policy):
    from creditrl.config import LabTaskConfig, SamplingConfig
    from creditrl.evaluate import evaluate, evaluation_steps
    from creditrl.tasks.lab import LabTask
    from creditrl.trainer import _bar_stats

    task = LabTask(LabTaskConfig(eval_size=5, train_size=10))
    problems = task.eval_problems()
    done = []
    evaluate(tiny_policy, task, problems, 2, SamplingConfig(max_new_tokens=4, batch_size=4), seed=0,
             progress=done.append)
    # 4 rows per call: 2 prompts × k = 2 per sampled call (2, 2, 1), then 4 greedy prompts per call (4, 1)
    assert done == [2, 2, 1, 4, 1] and sum(done) == evaluation_steps(problems, greedy=True)
    assert tiny_policy.on_sampled is None  # the callback lasts as long as the evaluation
    assert _bar_stats({}, [{"step": 0, "avg@k": 0.25}]) == "eval at step 0: avg@k 0.250"


def test_avg_at_k_standard_error_is_over_the_problems_shares_by_hand(tiny_policy):
    from creditrl.config import LabTaskConfig, SamplingConfig
    from creditrl.evaluate import evaluate, standard_error
    from creditrl.tasks.base import Verdict
    from creditrl.tasks.lab import LabTask

    class EveryOtherProblem(LabTask):
        """Problems 0, 2, 4 always solved, 1 and 3 never, whatever is sampled."""

        def verify(self, problem, text):
            return Verdict(correct=self.eval_problems().index(problem) % 2 == 0)

    task = EveryOtherProblem(LabTaskConfig(eval_size=5, train_size=10))
    metrics = evaluate(tiny_policy, task, task.eval_problems(), 2, SamplingConfig(max_new_tokens=4), seed=0,
                       greedy=False, behaviour=False)
    # shares 1, 0, 1, 0, 1: mean 0.6, sample variance (3·0.4² + 2·0.6²)/4 = 0.3, SE = √(0.3/5) = 0.24495
    assert metrics["avg@k"] == pytest.approx(0.6) and metrics["avg@k_se"] == pytest.approx(0.24495, abs=1e-5)
    assert standard_error([0.2, 0.4]) == pytest.approx(0.1)  # sd 0.1414 / √2
    one = evaluate(tiny_policy, task, task.eval_problems()[:1], 2, SamplingConfig(max_new_tokens=4), seed=0,
                   greedy=False, behaviour=False)
    assert "avg@k_se" not in one  # undefined for one problem
