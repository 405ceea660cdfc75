"""The command line as a new user meets it: clear errors with exit code 2, never a traceback."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from creditrl.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())  # rich wraps lines at the terminal width


def test_unknown_method_lists_the_known_ones():
    code, out = _invoke("train", "method=magic")
    assert code == 2 and "unknown method 'magic'" in out and "grpo" in out and "Traceback" not in out


def test_bad_config_value_and_unknown_key_are_named(tmp_path):
    code, out = _invoke("train", "train.lr=fast")
    assert code == 2 and "train.lr" in out
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  group_sise: 8\n")
    code, out = _invoke("train", str(path))
    assert code == 2 and "unknown key 'rollout.group_sise'" in out and "c.yaml" in out


def test_a_malformed_first_override_is_not_called_a_missing_file():
    code, out = _invoke("train", "train.lr")
    assert code == 2 and "train.lr: neither a config file" in out and "key=value" in out
    code, out = _invoke("train", "nowhere.yaml")
    assert code == 2 and "config file not found: nowhere.yaml" in out


def test_list_options_name_themselves_when_empty_or_unreadable():
    for args, message in [(["compare", "--seeds", ","], "--seeds: no items in ','"),
                          (["compare", "--seeds", "a,b"], "--seeds: 'a,b' is not a comma-separated list of int"),
                          (["compare", "--methods", " , "], "--methods: no items"),
                          (["credit", "--methods", ","], "--methods: no items")]:
        code, out = _invoke(*args)
        assert code == 2 and message in out and "Traceback" not in out, (args, out)


def test_malformed_dataset_names_file_and_line(tmp_path):
    code, out = _invoke("eval", "task.name=jsonl", f"task.eval_path={FIXTURES / 'bad_rows.jsonl'}")
    assert code == 2 and "bad_rows.jsonl:" in out and "Traceback" not in out


def test_methods_lists_the_registry():
    code, out = _invoke("methods")
    assert code == 0 and all(name in out for name in ("grpo", "dr_grpo", "dapo", "rloo", "process_grpo"))


@pytest.mark.slow
def test_train_then_eval_a_tiny_model(tiny_lab_model_dir, tmp_path):
    run = tmp_path / "run"
    code, out = _invoke("train", "--quiet", f"model.name={tiny_lab_model_dir}", f"output.dir={run}", "train.steps=2",
                        "rollout.prompts_per_step=2", "rollout.group_size=2", "task.lab.eval_size=4", "eval.k=1",
                        "sampling.max_new_tokens=16")
    assert code == 0, out
    assert "before" in out and "after" in out and "wall time" in out and "checkpoints" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    code, out = _invoke("eval", "task.lab.eval_size=4", "sampling.max_new_tokens=16", "--model", str(run / "final"),
                        "--k", "2", "--json", str(tmp_path / "eval.json"))
    assert code == 0, out
    assert "avg@2" in out and "pass@2" in out and "greedy" in out
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["problems"] == 4 and 0.0 <= metrics["avg@k"] <= 1.0 and metrics["k"] == 2
    code, out = _invoke("eval", "--model", str(run / "final"), "--json", str(tmp_path / "no-such-folder" / "e.json"))
    assert code == 2 and "--json: the folder" in out and "does not exist" in out  # said before evaluating

    # without an evaluation at step 0 there is no "before": the summary says so and the table shows "after" only
    code, out = _invoke("train", "--quiet", f"model.name={tiny_lab_model_dir}", f"output.dir={tmp_path / 'run2'}",
                        "train.steps=1", "rollout.prompts_per_step=2", "rollout.group_size=2", "task.lab.eval_size=4",
                        "eval.k=1", "sampling.max_new_tokens=16", "eval.before=false")
    assert code == 0, out
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["before"] is None
    assert "accuracy after 1 steps" in out and "pts" not in out


def test_eval_of_a_runs_final_model_with_its_config_reproduces_the_runs_final_table(tiny_lab_model_dir, tmp_path):
    run = tmp_path / "run"
    code, out = _invoke("train", "--quiet", f"model.name={tiny_lab_model_dir}", f"output.dir={run}", "train.steps=1",
                        "rollout.prompts_per_step=2", "rollout.group_size=2", "task.lab.eval_size=6", "eval.k=3",
                        "eval.before=false", "sampling.max_new_tokens=16", "train.seed=5")
    assert code == 0, out
    summary = json.loads((run / "summary.json").read_text())
    assert f"evaluation sampling seed {summary['eval_seed']}" in out
    final = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()][-1]
    result = runner.invoke(app, ["eval", str(run / "config.yaml"), "--model", str(run / "final"),
                                 "--json", str(tmp_path / "eval.json")], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    table = result.output[result.output.index("held-out problems"):]
    assert max(len(line) for line in table.splitlines()) <= 80
    assert all(f" {name} " in table for name in ("avg@3", "pass@1", "pass@3", "maj@3", "greedy"))
    assert f"sampling seed {summary['eval_seed']}" in " ".join(result.output.split())
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["seed"] == summary["eval_seed"]
    assert {key: metrics[key] for key in final if key != "step"} == {k: v for k, v in final.items() if k != "step"}


@pytest.mark.slow
def test_lab_pretrain_on_a_tiny_budget(tmp_path):
    out_dir = tmp_path / "lab"
    code, out = _invoke("lab", "pretrain", "--out", str(out_dir), "--quiet", "steps=3", "batch_size=4",
                        "eval_samples=4", "task.lab.eval_size=4")
    assert code == 0, out
    for name in ("model.safetensors", "config.json", "tokenizer.json", "pretrain.json"):
        assert (out_dir / name).exists()
    assert json.loads((out_dir / "pretrain.json").read_text())["history"][-1]["step"] == 3
    code, out = _invoke("lab", "pretrain", "--out", str(out_dir), "steps=-1")
    assert code == 2 and "steps" in out
