import ast
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from creditrl.config import TraceSection, task_config
from creditrl.tasks import build_task
from creditrl.tasks.lab import ALPHABET as LAB_ALPHABET
from creditrl.tasks.trace import (
    ALPHABET,
    TraceTask,
    judge,
    noisy_solution,
    run_traced,
    sample_program,
    solution,
    wrong_value,
)

LOOP = "a = 4\nxs = [a, 2]\nfor v in xs:\n    a = a + v\nprint(a)\n"
BRANCH = "a = 3\nif a > 4:\n    b = 1\nelse:\n    b = 2\nprint(b)\n"


# ---------------------------------------------------------------- golden examples, worked by hand


def test_the_solution_writes_every_state_change_then_the_output():
    assert solution(LOOP) == "a = 4\nxs = [4, 2]\nv = 4\na = 8\nv = 2\na = 10\nOutput: 10"
    v = judge(LOOP, solution(LOOP))
    assert v.correct and v.step_correct == (True,) * 7 and v.answer == "10"


def test_a_wrong_value_is_blamed_once_and_the_trace_goes_on_from_it():
    # a = 4 + 4 is 8, not 9; from a = 9 the loop gives a = 9 + 2 = 11 and prints 11: only line 4 is wrong
    v = judge(LOOP, "a = 4\nxs = [4, 2]\nv = 4\na = 9\nv = 2\na = 11\nOutput: 11")
    assert v.step_correct == (True, True, True, False, True, True, True)
    assert not v.correct and v.first_wrong_step == 3 and v.answer == "11"


def test_a_wrong_value_sends_the_program_down_the_other_branch():
    # a is 3; a response that writes a = 5 then takes the `if` branch: b = 1 and output 1 are right from a = 5
    v = judge(BRANCH, "a = 5\nb = 1\nOutput: 1")
    assert v.step_correct == (False, True, True) and not v.correct
    assert judge(BRANCH, "a = 3\nb = 2\nOutput: 2").step_correct == (True, True, True)
    assert judge(BRANCH, "a = 3\nb = 1\nOutput: 1").step_correct == (True, False, True)


def test_a_skipped_step_shifts_every_later_line():
    # the response leaves out a = 8: "v = 2" stands where the program sets a (wrong name, true state kept),
    # "a = 10" where it binds v = 2, "Output: 10" where it sets a = 10; the answer itself is right
    v = judge(LOOP, "a = 4\nxs = [4, 2]\nv = 4\nv = 2\na = 10\nOutput: 10")
    assert v.step_correct == (True, True, True, False, False, False) and v.correct


def test_wrong_kinds_unreadable_lines_extra_lines_and_no_output():
    assert judge(LOOP, "a = [4]\nxs = [4, 2]").step_correct == (False, True)  # a list where an int goes
    assert judge(LOOP, "a = four\nxs = 4").step_correct == (False, False)
    v = judge(BRANCH, "a = 3\nb = 2\nOutput: 2\nOutput: 2")
    # neither output line is both the last and the one right after the last change; the final answer is right
    assert v.step_correct == (True, True, False, False) and v.correct
    v = judge(BRANCH, "a = 3\nb = 2")
    assert v.step_correct == (True, True) and not v.correct and not v.format_ok
    v = judge(BRANCH, "")
    assert v.step_correct == (False,) and not v.format_ok
    assert judge(BRANCH, "a = 3\nb = 2\nOutput: True").step_correct == (True, True, False)  # bools are not ints


def test_a_carried_list_too_short_to_index_stops_the_program():
    program = "xs = [5, 6]\nb = xs[1]\nprint(b)\n"
    v = judge(program, "xs = [5]\nb = 6\nOutput: 6")
    assert v.step_correct == (False, False, False) and v.correct  # xs[1] fails from xs = [5]; the answer is right


# ---------------------------------------------------------------- an independent labeller


class _Crash(Exception):
    pass


class _Done(Exception):
    pass


def reference_labels(source: str, response: str) -> tuple[bool, ...]:
    """The same judging rules, by interpreting the program's syntax tree (no tracer, no exec)."""
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    state, steps, printed = {}, [], []

    def value_of(text):
        try:
            value = ast.literal_eval(text)
        except Exception:
            return None
        if type(value) is int or (type(value) is list and all(type(e) is int for e in value)):
            return value
        return None

    def change(name, value):
        if len(steps) == len(lines):
            raise _Done
        m = re.fullmatch(r"([a-z_][a-z0-9_]*) = (.+)", lines[len(steps)])
        claimed = value_of(m[2]) if m else None
        if m and m[1] == name and claimed is not None and type(claimed) is type(value):
            steps.append(claimed == value)
            state[name] = claimed
        else:
            steps.append(False)
            state[name] = value

    def ev(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return state[node.id]
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Subscript):
            items, k = state[node.value.id], ev(node.slice)
            if k >= len(items):
                raise _Crash
            return items[k]
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]
        if isinstance(node, ast.Compare):
            a, b = ev(node.left), ev(node.comparators[0])
            return {ast.Lt: a < b, ast.Gt: a > b, ast.Eq: a == b}[type(node.ops[0])]
        raise AssertionError(ast.dump(node))

    def block(body):
        for node in body:
            if isinstance(node, ast.Assign):
                change(node.targets[0].id, ev(node.value))
            elif isinstance(node, ast.If):
                block(node.body if ev(node.test) else node.orelse)
            elif isinstance(node, ast.For):
                it = node.iter
                items = list(range(ev(it.args[0]))) if isinstance(it, ast.Call) else list(state[it.id])
                for item in items:
                    change(node.target.id, item)
                    block(node.body)
            elif isinstance(node.value.func, ast.Name):  # print(x)
                printed.append(ev(node.value.args[0]))
            else:  # xs.append(e)
                name = node.value.func.value.id
                change(name, state[name] + [ev(node.value.args[0])])

    finished = False
    try:
        block(ast.parse(source).body)
        finished = True
    except (_Crash, _Done):
        pass
    n_changes = len(steps)
    for j in range(n_changes, len(lines)):
        m = re.fullmatch(r"Output: (.+)", lines[j])
        claimed = value_of(m[1]) if m else None
        steps.append(bool(m) and finished and j == n_changes == len(lines) - 1 and claimed is not None
                     and type(claimed) is type(printed[0]) and claimed == printed[0])
    return tuple(steps) if lines else (False,)


GARBAGE = ["a = 1", "xs = [1, 2]", "Output: 3", "b = -2", "i = 0", "v = 1", "nonsense", "a = [0]", "Output: [1]"]


@st.composite
def program_and_response(draw):
    cfg = TraceSection(min_statements=1, max_statements=draw(st.integers(1, 6)), loop_max=draw(st.integers(1, 4)),
                          value_max=draw(st.integers(1, 20)), body_max=draw(st.integers(1, 3)))
    source = sample_program(random.Random(draw(st.integers(0, 10**9))), cfg)
    error_rate = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    lines = noisy_solution(source, random.Random(draw(st.integers(0, 99))), error_rate).split("\n")
    for _ in range(draw(st.integers(0, 3))):  # drop, repeat or replace a line
        k = draw(st.integers(0, len(lines)))
        edit = draw(st.sampled_from(["drop", "repeat", "replace"]))
        if edit == "drop" and k < len(lines):
            del lines[k]
        elif edit == "repeat" and k < len(lines):
            lines.insert(k, lines[k])
        else:
            lines.insert(k, draw(st.sampled_from(GARBAGE)))
    return source, "\n".join(lines)


@settings(max_examples=300, deadline=None)
@given(program_and_response())
def test_the_tracer_labels_agree_with_an_independent_interpreter(case):
    source, response = case
    assert judge(source, response).step_correct == reference_labels(source, response)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**9), st.floats(0, 1))
def test_noisy_solutions_are_wrong_exactly_where_a_value_was_moved(seed, error_rate):
    source = sample_program(random.Random(seed), TraceSection())
    moved = []

    def carry(_name, value):  # the same draws noisy_solution makes, recording which were moved
        wrong = rng.random() < error_rate
        moved.append(wrong)
        return wrong_value(value, rng) if wrong else value

    rng = random.Random(seed)
    run_traced(source, carry)
    response = noisy_solution(source, random.Random(seed), error_rate)
    assert judge(source, response).step_correct == tuple(not m for m in moved) + (True,)


# ---------------------------------------------------------------- the task


def test_splits_difficulty_and_alphabet():
    task = TraceTask(TraceSection(train_size=300, eval_size=40, seed=3))
    held_out = {p.prompt for p in task.eval_problems()}
    assert len(held_out) == 40 and not held_out & {p.prompt for p in task.train_problems()}
    assert [p.prompt for p in TraceTask(TraceSection(train_size=300, eval_size=40, seed=3)).train_problems()[:50]] \
        == [p.prompt for p in task.train_problems()[:50]]
    rng = random.Random(0)
    for p in list(task.eval_problems()) + task.train_problems()[:100]:
        text = solution(p.prompt)
        assert p.meta["difficulty"] == p.meta["steps"] == len(text.splitlines()) - 1
        assert p.answer == text.splitlines()[-1].removeprefix("Output: ")
        noisy = task.noisy_solution(p, rng, 0.5)
        assert set(p.prompt + text + noisy) <= set(ALPHABET)
    assert set(ALPHABET) <= set(LAB_ALPHABET)  # the lab model's character tokenizer reads every character
    assert len(task.train_problems()) == 300 and task.train_problems()[-1] is task.train_problems()[299]
    drawn = [task.draw_problem(rng) for _ in range(200)]  # what pretraining draws: never a held-out program
    assert not held_out & {p.prompt for p in drawn}
    assert all(p.meta["difficulty"] == len(solution(p.prompt).splitlines()) - 1 for p in drawn)


def test_registered_with_its_own_section():
    task = build_task(task_config(name="trace", eval_size=5, train_size=10, max_statements=3))
    assert task.name == "trace" and len(task.eval_problems()) == 5
    with pytest.raises(ValueError, match="loop_bound"):
        task_config(name="trace", loop_bound=3)
    with pytest.raises(ValueError, match="min_statements"):
        task_config(name="trace", min_statements=4, max_statements=2)
    with pytest.raises(ValueError, match="distinct programs"):
        TraceTask(TraceSection(min_statements=1, max_statements=1, value_max=1, eval_size=200))


def test_train_eval_credit_and_compare_run_on_the_trace_task(tiny_lab_model_dir, tmp_path):
    from typer.testing import CliRunner

    from creditrl.cli import app

    runner = CliRunner()
    task = ["task.name=trace", "task.train_size=20", "task.eval_size=3", "sampling.max_new_tokens=12"]
    result = runner.invoke(app, ["train", "--quiet", *task, f"model.name={tiny_lab_model_dir}", "train.steps=1",
                                 f"output.dir={tmp_path / 'run'}", "rollout.prompts_per_step=2",
                                 "rollout.group_size=2", "eval.k=1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", *task, "--model", str(tmp_path / "run" / "final"), "--k", "2"])
    assert result.exit_code == 0 and "avg@2" in result.output, result.output
    result = runner.invoke(app, ["credit", *task, "--model", str(tiny_lab_model_dir), "--prompts", "2",
                                 "--group-size", "2", "--methods", "grpo", "--out", str(tmp_path / "credit.html")])
    assert result.exit_code == 0 and "credit accuracy" in " ".join(result.output.split()), result.output
    result = runner.invoke(app, ["compare", *task, f"model.name={tiny_lab_model_dir}", "rollout.prompts_per_step=2",
                                 "rollout.group_size=2", "eval.k=1", "--methods", "grpo", "--seeds", "0",
                                 "--steps", "1", "--eval-every", "1", "--eval-size", "2", "--jobs", "1",
                                 "--out", str(tmp_path / "compare")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "compare" / "report.md").is_file()
