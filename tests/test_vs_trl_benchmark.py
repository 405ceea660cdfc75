"""benchmarks/vs_trl.py: both workers run one tiny step and report every phase."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_trl.py"


@pytest.fixture(scope="module")
def vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_trl"] = module  # dataclasses look the module up while the script loads
    spec.loader.exec_module(module)
    yield module
    del sys.modules["vs_trl"]


@pytest.mark.slow
@pytest.mark.parametrize("side", ["creditrl", "trl"])
def test_worker_reports_every_phase(vs_trl, side):
    work = vs_trl.Work(model="lab", prompts=2, group_size=2, max_new_tokens=8, steps=1,
                       threads=torch.get_num_threads())
    result = vs_trl.WORKERS[side](work)

    assert result["side"] == side
    assert len(result["steps"]) == 1
    step = result["steps"][0]
    for phase in vs_trl.PHASES:
        assert math.isfinite(step[phase]) and step[phase] >= 0, (phase, step[phase])
    # old/reference log-probs: no forward with one epoch × one minibatch and no KL (TRL: exactly 0)
    for phase in ("sample", "advantage", "update", "step"):
        assert step[phase] > 0, (phase, step[phase])
    parts = sum(step[p] for p in vs_trl.PHASES if p != "step")
    assert step["step"] >= parts - 1e-3
    assert 1 <= step["completion_tokens"] <= 8
    assert 0 <= step["accuracy"] <= 1
    assert 0 < result["setup_rss_mb"] <= result["peak_rss_mb"]


@pytest.mark.slow
def test_the_creditrl_worker_counts_the_graphs_each_step_compiles(vs_trl):
    """Compiled scoring compiles in its first step and, with every size symbolic, not in the next;
    eager scoring compiles nothing."""
    torch._dynamo.reset()  # graphs an earlier test compiled would be reused, and not counted
    for compile, expect_first in ((True, True), (False, False)):
        work = vs_trl.Work(model="lab", prompts=2, group_size=2, max_new_tokens=8, steps=2, compile=compile,
                           threads=torch.get_num_threads())
        first, second = [step["graphs_compiled"] for step in vs_trl.run_creditrl(work)["steps"]]
        assert (first > 0) == expect_first and second == 0
