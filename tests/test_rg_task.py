import pytest

from creditrl.config import task_config
from creditrl.tasks import build_task

pytest.importorskip("reasoning_gym")


@pytest.fixture(scope="module")
def arithmetic():
    return build_task(task_config(name="reasoning_gym", rg={"dataset": "basic_arithmetic",
                                                           "config": {"max_terms": 2, "max_digits": 1}},
                                  train_size=40, eval_size=8, seed=0))


def test_a_question_its_answer_and_the_score_worked_by_hand(arithmetic):
    problem = arithmetic.eval_problems()[0]
    question = problem.prompt.split("\n")[0]
    assert question == "Calculate 2 - -1." and problem.answer == "3"  # 2 − (−1) = 3
    assert "<answer>answer here</answer>" in problem.prompt  # reasoning-gym's default instruction
    right = arithmetic.verify(problem, "2 minus -1 is 2 + 1.\n<answer>3</answer>")
    assert right.correct and right.score == 1.0 and right.failure is None and right.step_correct is None
    wrong = arithmetic.verify(problem, "<answer>1</answer>")
    assert not wrong.correct and wrong.score == 0.0 and wrong.failure == "wrong_answer" and wrong.format_ok
    untagged = arithmetic.verify(problem, "The answer is 3.")
    assert untagged.score == 0.0 and untagged.failure == "no_answer" and not untagged.format_ok
    last = arithmetic.verify(problem, "<answer>1</answer> no, <answer> 3 </answer>")  # the last pair, stripped
    assert last.correct


def test_untagged_answers_score_their_last_number_when_asked(arithmetic):
    problem = arithmetic.eval_problems()[0]  # Calculate 2 - -1. = 3
    assert arithmetic.verify(problem, "2 - -1 = 3").score == 0.0  # reasoning-gym's way: no tags, no answer
    lenient = build_task(task_config(name="reasoning_gym", rg={"dataset": "basic_arithmetic",
                                                              "config": {"max_terms": 2, "max_digits": 1}},
                                     train_size=4, eval_size=8, untagged="last_number"))
    verdict = lenient.verify(problem, "2 - -1 = 3")
    assert verdict.correct and verdict.answer == "3" and not verdict.format_ok  # right, but not in the tags
    assert lenient.verify(problem, "2 - -1 = 3 <answer>1</answer>").score == 0.0  # tags, when present, decide
    assert lenient.verify(problem, "no number").failure == "no_answer"


def test_partial_credit_is_the_datasets_own():
    # leg_counting keeps reasoning-gym's default score_answer: an answer that contains the oracle answer gets
    # len(oracle) / len(answer); e.g. oracle "6" inside "6 legs" scores 1/6
    task = build_task(task_config(name="reasoning_gym", rg={"dataset": "leg_counting"}, train_size=4, eval_size=2))
    problem = task.eval_problems()[0]
    oracle = problem.answer
    verdict = task.verify(problem, f"<answer>{oracle} legs</answer>")
    assert verdict.score == pytest.approx(len(oracle) / len(oracle + " legs")) and not verdict.correct


def test_held_out_questions_never_train(arithmetic):
    held_out = {p.prompt for p in arithmetic.eval_problems()}
    train = arithmetic.train_problems()
    assert len(train) == 40 and not held_out & {p.prompt for p in train}
    assert train[5] is train[5] and train[-1] is train[39]


def test_unknown_dataset_and_setting_are_named():
    with pytest.raises(ValueError, match=r"no dataset 'basic_arithmetc'; close names: basic_arithmetic"):
        build_task(task_config(name="reasoning_gym", rg={"dataset": "basic_arithmetc"}))
    with pytest.raises(ValueError, match=r"task\.rg\.config: basic_arithmetic does not accept .*bogus"):
        build_task(task_config(name="reasoning_gym", rg={"dataset": "basic_arithmetic", "config": {"bogus": 1}}))
    with pytest.raises(ValueError, match=r"task\.rg\.dataset: name a reasoning-gym dataset"):
        build_task(task_config(name="reasoning_gym"))


def test_eval_from_the_command_line(tiny_lab_model_dir):
    from typer.testing import CliRunner

    from creditrl.cli import app

    result = CliRunner().invoke(app, ["eval", "task.name=reasoning_gym", "task.rg.dataset=basic_arithmetic",
                                      "task.rg.config={max_terms: 2, max_digits: 1}", "task.eval_size=2",
                                      "sampling.max_new_tokens=8", "--model", str(tiny_lab_model_dir), "--k", "2"])
    assert result.exit_code == 0 and "avg@2" in result.output, result.output
