"""GSM8K, MATH and generic jsonl tasks: answer extraction, verification, strict loading."""

from __future__ import annotations

import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from creditrl.tasks import math as math_tasks
from creditrl.tasks.base import Problem
from creditrl.tasks.errors import DatasetError
from creditrl.tasks.math import (
    JsonlTask,
    answers_match,
    check_format,
    extract_answer,
    gsm8k_task,
    hub_task,
    last_boxed,
    math500_task,
)

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{3}, then corrected: \\boxed{4}", "4"),
        ("\\boxed{\\{1, 2\\}} is the set", "\\{1, 2\\}"),
        ("\\boxed {7}", "7"),
        ("\\boxed{3} then \\boxed{12 is cut off", "#never#"),  # the last \boxed never closes
        ("48 + 24 = 72\n#### 72", "72"),
        ("#### 1,234\n", "1,234"),
        ("\\boxed{5}\n#### 6", "5"),  # \boxed comes first
        ("<think>maybe 3</think><answer> 7 </answer>", "7"),
        ("<think>it is \\boxed{3}</think> The answer is 4.", "4"),  # only after </think>
        ("Answer: $42$.", "42"),
        ("The final answer is 18 dollars", "18 dollars"),
        ("answer: 1\nAnswer: 2", "2"),
        ("The answer is 7, since 3+4=7.", "7"),  # to the end of its clause
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),  # the last phrase, $...$ whole
        ("The answer is $\\frac{1}{2}$, as shown.", "\\frac{1}{2}"),
        ("the answer is\n5", None),  # not across lines
        ("no answer here", None),
        ("the answer isn't obvious", None),
        ("\\boxed{} and nothing else", None),
    ],
)
def test_extract_answer(text: str, answer: str | None):
    if answer == "#never#":
        assert last_boxed(text) is None
        assert extract_answer(text) is None
    else:
        assert extract_answer(text) == answer


# ---------------------------------------------------------------- verification


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("1,234", "1234"),
        ("1234.0", "1,234"),
        ("\\$18", "18"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac12", "1/2"),
        ("\\frac{6}{8}", "\\frac34"),
        ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("2\\sqrt{3}", "\\sqrt{12}"),
        ("10080", "10,\\!080"),
        ("864", "864 \\mbox{ inches}^2"),
        ("x = 5", "5"),
        ("\\text{Evelyn}", "Evelyn"),
        ("\\begin{pmatrix}11\\\\4\\end{pmatrix}", "\\begin{pmatrix} 11 \\\\ 4 \\end{pmatrix}"),
        ("60\\%", "60"),  # a percent question's reference is the number
        ("60%", "60"),
        ("42 dollars", "42"),  # math_verify alone reads "dollars" as d·o·l·l·a·r·s and says no
        ("\\$1,250 dollars", "1250"),
        ("18 \\text{ cookies}", "18"),
        ("7 miles per hour", "7"),
    ],
)
def test_answers_match(predicted: str, reference: str):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [("3", "4"), ("1,2", "12"), ("1233", "1,234"), ("\\frac{1}{3}", "0.5"), ("(0,1]", "[0,1)"),
     ("", "1"), ("}{", "1"), ("\\boxed{", "1"), ("2x", "2"), ("10%", "0.1"), ("0,100", "100"),
     ("43 dollars", "42"), ("2 and a half", "2"), ("3 million", "3"), ("2 pi", "2"), ("2 x", "2"),
     ("5 hours 30 minutes", "5"), ("5 tenths", "5"), ("3 hundredths", "3"), ("5 factorial", "5")],
)
def test_answers_differ(predicted: str, reference: str):
    assert not answers_match(predicted, reference)


def test_majority_voting_counts_each_number_once_whatever_its_form():
    """maj@k on a math task: the verdicts carry the extracted answer, in the form votes are counted in."""
    from creditrl.evaluate import sampled_accuracy

    task = JsonlTask(eval_path=FIXTURES / "gsm8k_mini.jsonl", train_path=FIXTURES / "gsm8k_mini.jsonl")
    problem = Problem("p", "How many?", "2125")
    texts = ["\\boxed{2,125}", "#### 2125.0", "The answer is 17.", "The answer is 17.", "The answer is 17.",
             "The answer is 2125", "\\boxed{2125 apples}"]
    verdicts = [task.verify(problem, t) for t in texts]
    assert [v.answer for v in verdicts] == ["2125", "2125", "17", "17", "17", "2125", "2125"]
    assert sampled_accuracy([verdicts])["maj@k"] == 1.0  # 2125 four times against 17 three times


def test_answers_match_in_worker_threads():
    pairs = [("\\frac{10}{4}", "2.5"), ("\\sqrt{8}", "2\\sqrt{2}"), ("7/3", "\\frac{14}{6}"), ("4", "5")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda pair: answers_match(*pair), pairs))
    assert results == [True, True, True, False]


def test_answers_match_survives_a_timeout(monkeypatch):
    monkeypatch.setattr(math_tasks, "VERIFY_TIMEOUT_S", 1)
    start = time.monotonic()
    assert not answers_match("9^{9^{9^{9}}}", "1")  # math_verify gives up and we say no
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("<think>2 + 2 = 4</think><answer>4</answer>", True),
        ("  <think>\n2 + 2 = 4\n</think>\n<answer> 4 </answer>\n", True),
        ("<think>2 + 2 = 4</think> So the answer is \\boxed{4}.", True),
        ("<think>2 + 2 = 4</think><answer></answer>", False),
        ("<think> </think><answer>4</answer>", False),
        ("<think>2 + 2 = 4</think> so it is 4", False),
        ("<answer>4</answer>", False),
        ("2 + 2 = 4 \\boxed{4}", False),
        ("<think>a</think><think>b</think><answer>4</answer>", False),
        ("<think>2 + 2</think><answer>4</answer> and more", False),
    ],
)
def test_check_format(text: str, ok: bool):
    assert check_format(text) is ok


def test_verify_with_and_without_format():
    problem = Problem(id="p", prompt="2 + 2?", answer="4")
    plain = JsonlTask(eval_path=FIXTURES / "gsm8k_mini.jsonl", train_path=FIXTURES / "gsm8k_mini.jsonl")
    strict = JsonlTask(eval_path=FIXTURES / "gsm8k_mini.jsonl", train_path=FIXTURES / "gsm8k_mini.jsonl",
                       require_format=True)
    assert plain.verify(problem, "2 + 2 = \\boxed{4}") == plain.verify(problem, "#### 4")
    verdict = plain.verify(problem, "2 + 2 = \\boxed{4}")
    assert (verdict.correct, verdict.format_ok, verdict.step_correct) == (True, True, None)
    assert plain.verify(problem, "2 + 2 = \\boxed{5}").correct is False
    assert plain.verify(problem, "I think four").format_ok is False
    assert strict.verify(problem, "2 + 2 = \\boxed{4}").correct is False
    assert strict.verify(problem, "2 + 2 = \\boxed{4}").format_ok is False
    good = strict.verify(problem, "<think>2 + 2 = 4</think><answer>4</answer>")
    assert good.correct and good.format_ok


# ---------------------------------------------------------------- loading the fixtures


def test_gsm8k_fixture_loads():
    task = JsonlTask(train_path=FIXTURES / "gsm8k_mini.jsonl", eval_path=FIXTURES / "gsm8k_mini.jsonl",
                     answer_is_solution=True, step_splitter="gsm8k")
    problems = task.train_problems()
    assert len(problems) == 8 and task.skipped_rows == []
    assert [p.answer for p in problems] == ["27", "145", "164", "1,200", "26", "70", "16", "4.5"]
    assert problems[0].id == "gsm8k_mini:1"
    assert problems[0].prompt.startswith("Mia buys 3 packs") and problems[0].prompt.endswith("\\boxed{}.")
    assert task.verify(problems[3], "24 * 50 = 1200\nThe answer is 1200").correct


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path: Path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (FIXTURES / "gsm8k_mini.jsonl").read_bytes())
    task = JsonlTask(train_path=path, eval_path=path, answer_is_solution=True)
    assert len(task.train_problems()) == 8 and task.skipped_rows == []


def test_math500_takes_a_train_file_when_given_one(tmp_path: Path):
    from creditrl.config import task_config
    from creditrl.tasks import build_task

    train = tmp_path / "train.jsonl"
    train.write_text((FIXTURES / "math_mini.jsonl").read_text().splitlines()[0] + "\n")
    task = build_task(task_config(name="math500", eval_path=FIXTURES / "math_mini.jsonl", train_path=train))
    evaluated = len((FIXTURES / "math_mini.jsonl").read_text().splitlines())
    assert len(task.train_problems()) == 1 and len(task.eval_problems()) == evaluated  # no split of the eval file


def test_gsm8k_factory(tmp_path: Path):
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_bytes((FIXTURES / "gsm8k_mini.jsonl").read_bytes())
    task = gsm8k_task(tmp_path, eval_size=3, seed=1)
    assert (task.name, task.step_splitter) == ("gsm8k", "gsm8k")
    assert len(task.train_problems()) == 8 and len(task.eval_problems()) == 3
    assert all(p.id.startswith("test:") for p in task.eval_problems())


def test_math_fixture_loads():
    task = math500_task(FIXTURES / "math_mini.jsonl", eval_fraction=0.25, seed=3)
    assert (task.name, task.step_splitter) == ("math500", "math")
    problems = task.train_problems() + task.eval_problems()
    assert len(task.eval_problems()) == 2 and len(problems) == 8
    by_id = {p.id: p for p in problems}
    algebra = by_id["test/algebra/9003.json"]
    assert algebra.answer == "(-2,2)" and algebra.meta == {"level": 2, "subject": "Algebra"}
    for line in (FIXTURES / "math_mini.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert task.verify(by_id[row["unique_id"]], row["solution"]).correct


def test_custom_prompt_and_fields(tmp_path: Path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "What is {x} when x = 2?", "a": 2, "id": 7, "tag": ["t"]}\n')
    task = JsonlTask(eval_path=path, train_path=path, question_field="q", answer_field="a",
                     prompt_template="Q: {question}\nA:", id_field="id", meta_fields=("tag",))
    (problem,) = task.eval_problems()
    expected = Problem(id="7", prompt="Q: What is {x} when x = 2?\nA:", answer="2", meta={"tag": ["t"]})
    assert problem == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match="question"):
        JsonlTask(eval_path=FIXTURES / "math_mini.jsonl", prompt_template="no placeholder")
    with pytest.raises(ValueError, match="known: blank_line, gsm8k, math, newline"):
        JsonlTask(eval_path=FIXTURES / "math_mini.jsonl", step_splitter="words")


# ---------------------------------------------------------------- strict loading

GOOD_ROW = '{"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\\n#### 5"}'
BAD_ROWS = {
    "invalid JSON": (b'{"question": "What is 4 plus 4?", "answer": "#### 8"', r"invalid JSON"),
    "not an object": (b'["What is 1 plus 1?", "#### 2"]', r"expected a JSON object, got an array"),
    "missing field": (b'{"answer": "#### 4"}', r"field 'question' is missing"),
    "wrong type": (b'{"question": 12, "answer": "#### 4"}', "field 'question' must be a string, got a num"),
    "empty answer": (b'{"question": "What is 1 plus 1?", "answer": "   "}', r"field 'answer' is empty"),
    "null answer": (b'{"question": "1 + 1?", "answer": null}', "field 'answer' must be a string, got null"),
    "invalid UTF-8": (b'{"question": "Caf\xe9 prices?", "answer": "#### 3"}', r"invalid UTF-8 at byte 17"),
    "no final answer": (b'{"question": "6 * 7?", "answer": "6 * 7 = 42"}', "field 'answer' has no final answer"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_each_bad_row_names_file_line_and_field(tmp_path: Path, kind: str):
    row, reason = BAD_ROWS[kind]
    path = tmp_path / "x.jsonl"
    path.write_bytes(GOOD_ROW.encode() + b"\n\n" + row + b"\n" + GOOD_ROW.encode() + b"\n")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:3: ") + reason) as caught:
        JsonlTask(train_path=path, eval_path=path, answer_is_solution=True)
    assert (caught.value.path, caught.value.line) == (path, 3)


def test_skip_mode_counts_every_bad_row(caplog):
    path = FIXTURES / "bad_rows.jsonl"
    with caplog.at_level("WARNING"):
        task = JsonlTask(train_path=path, eval_path=path, answer_is_solution=True, on_bad_row="skip")
    assert [p.id for p in task.eval_problems()] == ["bad_rows:1", "bad_rows:10"]
    assert [line for line, _ in task.skipped_rows] == [2, 3, 4, 5, 6, 7, 9] * 2  # read as train and as eval
    assert task.skipped_rows[2][1] == f"{path}:4: field 'question' is missing"
    assert "skipped 7 of 9 rows" in caplog.text


def test_error_mode_stops_at_the_first_bad_row():
    with pytest.raises(DatasetError, match=r"bad_rows\.jsonl:2: invalid JSON"):
        JsonlTask(eval_path=FIXTURES / "bad_rows.jsonl", answer_is_solution=True)


def test_empty_missing_and_hopeless_files(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DatasetError, match=re.escape(f"{empty}: the file has no rows")):
        JsonlTask(eval_path=empty)
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file")):
        JsonlTask(eval_path=tmp_path / "nope.jsonl")
    hopeless = tmp_path / "hopeless.jsonl"
    hopeless.write_text('{"answer": "1"}\n')
    with pytest.raises(DatasetError, match="no usable rows"):
        JsonlTask(eval_path=hopeless, on_bad_row="skip")


def test_dataset_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(DatasetError("d/x.jsonl", 17, "field 'question' is missing")))
    assert str(error) == "d/x.jsonl:17: field 'question' is missing" and error.line == 17


# ---------------------------------------------------------------- splits


def test_split_is_deterministic_and_disjoint():
    def split(seed: int) -> tuple[list[str], list[str]]:
        task = math500_task(FIXTURES / "math_mini.jsonl", seed=seed, eval_fraction=0.5)
        return [p.id for p in task.train_problems()], [p.id for p in task.eval_problems()]

    train, evals = split(0)
    assert split(0) == (train, evals)
    assert len(train) == len(evals) == 4 and not set(train) & set(evals)
    file_order = [json.loads(line)["unique_id"] for line in (FIXTURES / "math_mini.jsonl").read_text().splitlines()]
    assert train == [i for i in file_order if i in train] and evals == [i for i in file_order if i in evals]
    assert any(split(seed) != (train, evals) for seed in range(1, 5))


def test_eval_size_samples_deterministically():
    path = FIXTURES / "math_mini.jsonl"
    task = math500_task(path, train_path=path, eval_size=3, seed=5)
    again = math500_task(path, train_path=path, eval_size=3, seed=5)
    assert len(task.eval_problems()) == 3 and task.eval_problems() == again.eval_problems()
    assert len(task.train_problems()) == 8


def test_hub_task_explains_missing_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        hub_task("openai/gsm8k", config="main")


# ---------------------------------------------------------------- the real data files

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not present")


@needs_data
def test_gsm8k_files_load_and_answers_verify():
    task = gsm8k_task(SHARED_DATA / "gsm8k")
    train, evals = task.train_problems(), task.eval_problems()
    assert (len(train), len(evals)) == (7473, 1319) and task.skipped_rows == []
    for problem in train + evals:
        assert re.fullmatch(r"-?\d{1,3}(,\d{3})*(\.\d+)?|-?\d+(\.\d+)?", problem.answer), problem
        value = float(problem.answer.replace(",", ""))
        written = f"{value:,.0f}" if value.is_integer() else f"{value}"
        assert task.verify(problem, f"So the total is \\boxed{{{written}}}.").correct, problem
        assert not task.verify(problem, f"#### {value + 1}").correct


@pytest.mark.slow
@needs_data
def test_math500_file_loads_and_answers_verify():
    path = SHARED_DATA / "math500" / "test.jsonl"
    task = math500_task(path)
    problems = task.train_problems() + task.eval_problems()
    assert len(problems) == 500 and len(task.eval_problems()) == 100
    assert {p.meta["level"] for p in problems} == {1, 2, 3, 4, 5}
    by_id = {p.id: p for p in problems}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        problem = by_id[row["unique_id"]]
        assert extract_answer(row["solution"]) == problem.answer
        # a different spelling of the same answer goes through math_verify, not string equality
        assert task.verify(problem, f"Thus $\\boxed{{\\displaystyle {problem.answer}}}$.").correct, problem
