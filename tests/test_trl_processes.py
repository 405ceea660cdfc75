"""CreditGRPOTrainer under accelerate with two processes (DDP over gloo on the CPU) trains as one process
does on the same global batch: the same per-token advantages on every row, the same final weights, the
same logged metrics.  The worker is tests/trl_processes_worker.py; its sampling depends only on a
completion's place in the generation batch, so both runs see the same completions.

Tolerance: the two runs differ only in the order of float32 sums (each process sums its rows' gradient,
gloo sums the two, DDP halves it).  With two SGD steps at lr 1 every weight tensor moves by up to 0.07-0.13,
and the runs' changes differ by at most 4e-5 of the tensor's own largest change (measured, all four
methods); the test allows 1e-3 of it.  A wrong reduction (a gradient halved, doubled, or one process's
alone) or a row given another row's advantage differs by a sizeable fraction of the change.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from trl_processes_worker import GLOBAL_BATCH, METHODS, train_method  # noqa: E402

from creditrl.policy.loading import load_model_and_tokenizer  # noqa: E402

TIMINGS = {"step_time"}


@pytest.fixture(scope="module")
def two_processes(tiny_lab_model_dir, tmp_path_factory):
    """Every method of the worker, trained by `accelerate launch` with two processes; its output folder."""
    out = tmp_path_factory.mktemp("two_processes")
    src = Path(__file__).parents[1] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(src), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    # --multi_gpu starts the processes through torchrun; with use_cpu=True they join a gloo group on the CPU
    # (--cpu alone starts one process unless an MPI hostfile is given)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", str(Path(__file__).parent / "trl_processes_worker.py"),
               str(tiny_lab_model_dir), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def step_logs(history: list[dict]) -> list[dict]:
    return [entry for entry in history if "loss" in entry]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_train_as_one(two_processes, tiny_lab_model_dir, tmp_path, method):
    two = torch.load(two_processes / f"{method}.pt")
    assert (two["backend"], two["processes"]) == ("gloo", 2)
    one = train_method(method, str(tiny_lab_model_dir), str(tmp_path), processes=1)

    # the advantages: rows 0-2 on process 0, 3-5 on process 1 (a group straddles them), each padded to its
    # own longest completion
    (reference,) = one.recorded_advantages
    assert reference.shape[0] == GLOBAL_BATCH and reference.abs().sum() > 0
    half = GLOBAL_BATCH // 2
    for rank in range(2):
        (local,) = torch.load(two_processes / f"{method}-rank{rank}.pt")
        assert local.shape[0] == half
        torch.testing.assert_close(local, reference[rank * half:(rank + 1) * half, :local.shape[1]])
        assert (reference[rank * half:(rank + 1) * half, local.shape[1]:] == 0).all()

    # the logged metrics (TRL's and creditrl's, the gradient norm included): reduced across the two
    # processes, they are the whole batch's
    for mine, theirs in zip(step_logs(two["logs"]), step_logs(one.state.log_history), strict=True):
        assert mine.keys() == theirs.keys() and "creditrl/pg_loss" in mine
        for key in theirs.keys() - TIMINGS:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key

    # the weights after two optimizer steps: each tensor's change, to 1e-3 of its largest entry
    start, _ = load_model_and_tokenizer(str(tiny_lab_model_dir))
    initial = dict(start.named_parameters())
    for name, param in one.model.named_parameters():
        change = param.detach() - initial[name]
        error = (two["weights"][name] - param.detach()).abs().max()
        assert change.abs().max() > 0 and error <= 1e-3 * change.abs().max(), name
