"""The verl recipes' launch scripts: the GSM8K conversion they run, and their refusal of a machine
that cannot run verl (no GPU, no vLLM) before Ray starts."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).parents[1] / "recipes" / "verl"
METHODS = sorted(p.name for p in RECIPES.iterdir() if (p / "config.yaml").exists())
# run.sh calls `python`: this interpreter's, as in an activated environment
ENV = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}


def prepare_gsm8k():
    spec = importlib.util.spec_from_file_location("prepare_gsm8k", RECIPES / "prepare_gsm8k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_gsm8k_row_in_verls_layout():
    row = {"question": "Tom has 3 boxes of 400 pens. How many pens?",
           "answer": "3 boxes × 400 = <<3*400=1200>>1200 pens.\n#### 1,200"}
    got = prepare_gsm8k().verl_row(row, "train", 5)
    assert got["data_source"] == "openai/gsm8k"  # selects verl's own GSM8K scorer
    assert got["reward_model"] == {"style": "rule", "ground_truth": "1200"}  # the number after ####, no comma
    assert got["prompt"][0]["role"] == "user" and got["prompt"][0]["content"].startswith(row["question"])
    assert "####" in got["prompt"][0]["content"]  # the scorer reads the answer after ####
    assert got["extra_info"] == {"split": "train", "index": 5, "question": row["question"], "answer": row["answer"]}


def test_a_gsm8k_row_without_a_final_answer_is_named():
    with pytest.raises(ValueError, match="gsm8k test row 7: field 'answer'"):
        prepare_gsm8k().verl_row({"question": "q", "answer": "no final line"}, "test", 7)


@pytest.mark.parametrize("method", METHODS)
def test_every_recipe_launches_through_the_shared_checks(method):
    script = (RECIPES / method / "run.sh").read_text()
    assert 'source "$HERE/../common.sh" "$@"' in script and "python -m verl.trainer.main_ppo" in script
    assert "## First step" in (RECIPES / method / "README.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: run.sh would train")
def test_run_sh_names_what_is_missing_before_starting():
    done = subprocess.run(["bash", str(RECIPES / "grpo" / "run.sh")], env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "missing vllm" in done.stderr and "rollout engine" in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: run.sh would train")
def test_run_sh_refuses_a_trl_that_verls_model_patch_cannot_import():
    """verl 0.9.1's `apply_monkey_patch` imports `AutoModelForCausalLMWithValueHead` from TRL whenever TRL is
    installed; TRL 1.16 (creditrl's `trl` extra) has none, so the actor would fail to build on the GPU."""
    trl = pytest.importorskip("trl")
    if hasattr(trl, "AutoModelForCausalLMWithValueHead"):
        pytest.skip("this TRL still has AutoModelForCausalLMWithValueHead")
    done = subprocess.run(["bash", str(RECIPES / "fipo" / "run.sh")], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "AutoModelForCausalLMWithValueHead" in done.stderr
