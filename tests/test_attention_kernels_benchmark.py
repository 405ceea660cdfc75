"""benchmarks/attention_kernels.py on the CPU: a row per backend and kv layout; a backend that cannot run says so."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_kernels.py"


def test_rows_for_each_backend_and_kv_layout_and_unavailable_backends_named(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("attention_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["attention_kernels.py", "--device", "cpu", "--shapes", "2x16",
                                      "--backends", "math", "cudnn", "--iters", "2"])
    module.main()
    rows = capsys.readouterr().out.splitlines()[1:]
    math_rows = [r.split() for r in rows if r.split()[1] == "math"]
    assert [r[2] for r in math_rows] == ["True", "False"]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in math_rows)  # first call and median, in ms
    assert sum("cudnn" in r and "not available" in r for r in rows) == 2  # no cuDNN kernel on a CPU
