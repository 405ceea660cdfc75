"""Run an untrusted Python program against unit tests in a separate, limited process.

Each run is a fresh interpreter (`python -I`) in a fresh empty temporary directory, in its own
session (so its whole process group is killed at the end, whatever it did), with every stream
but the result file closed to it.  Before the program runs, the trusted harness (`_HARNESS`):

- sets resource limits: CPU seconds, address space, file size, open files, processes, no core;
- moves into a new network namespace (`unshare(CLONE_NEWNET)`: no interface but a downed
  loopback, so no connection can be made).  Where the kernel refuses (no CAP_SYS_ADMIN, e.g. an
  unprivileged container), the run goes on with the host's network and `Execution.network`
  says "shared": sockets are then refused only by the in-process guard below;
- when started as root, drops to the user and group `nobody`, so the process limit applies and
  files outside its directory are not writable (the standard modules in `PRELOADED` are imported
  first, as `nobody` may not be able to read the standard library);
- disables what a test never needs: fork, exec and process spawning, signals to other
  processes, sockets, and opening files for writing outside its directory.

The program is the prompt plus the completion; each top-level statement of the test's `check`
function is one test (a statement holding an `assert`), run on its own so a share can be counted.
The wall-clock limit is enforced from outside.  The in-process guard protects the machine from
accidents, not the reward from a program written to forge it.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
# Standard modules imported before the run drops to `nobody` (who may not be able to read the standard library,
# e.g. under a root-only /root): what HumanEval's prompts and solutions import.
PRELOADED = ("typing", "math", "cmath", "re", "string", "collections", "itertools", "functools", "heapq", "bisect",
             "hashlib", "random", "statistics", "fractions", "decimal", "copy", "operator", "datetime", "json",
             "array", "numbers")


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024
    file_mb: int = 16
    processes: int = 64  # the limit of `nobody` as a user (threads count too)


@dataclass(frozen=True)
class Execution:
    """What one run gave: tests passed of total, and why it fell short (None: every test passed).

    Reasons: `tests_failed`, `syntax_error`, `error` (an exception while defining the solution),
    `missing_entry_point`, `timeout` (wall clock), `cpu_time`, `memory`, `file_size`, `exited`
    (the process ended without reporting, e.g. `os._exit`), `killed` (another signal).
    """

    passed: int
    total: int
    failure: str | None
    network: str = "isolated"

    @property
    def share(self) -> float:
        return self.passed / self.total if self.total else 0.0


def split_tests(test: str) -> tuple[str, str, list[tuple[str, bool]]]:
    """HumanEval's `test` field as (setup, the checker's argument name, its statements with whether each
    holds an assert).  The setup is everything at module level but `def check`."""
    tree = ast.parse(test)
    check = next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "check"), None)
    if check is None or not check.args.args:
        raise ValueError("the test defines no `check(candidate)` function")
    setup = ast.unparse(ast.Module([node for node in tree.body if node is not check], type_ignores=[]))
    statements = [(ast.unparse(node), any(isinstance(n, ast.Assert) for n in ast.walk(node))) for node in check.body]
    return setup, check.args.args[0].arg, statements


def run_tests(program: str, test: str, entry_point: str, limits: Limits = Limits()) -> Execution:
    """Run `program`, then each test statement of `test` with `entry_point` as the checker's argument."""
    setup, argument, statements = split_tests(test)
    total = sum(is_test for _, is_test in statements)
    spec = {"program": program, "setup": setup, "argument": argument, "statements": statements,
            "entry_point": entry_point, "cpu_s": limits.cpu_s, "memory": limits.memory_mb << 20,
            "file": limits.file_mb << 20, "processes": limits.processes, "nobody": NOBODY, "preload": PRELOADED}
    base = Path(tempfile.mkdtemp(prefix="creditrl-sandbox-"))
    try:
        work, result = base / "work", base / "result.json"
        work.mkdir()
        result.touch()
        if os.geteuid() == 0:
            os.chown(work, NOBODY, NOBODY)
            os.chown(result, NOBODY, NOBODY)
        (base / "spec.json").write_text(json.dumps(spec))
        with open(base / "spec.json") as spec_file, open(result, "r+b") as result_file:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", _HARNESS, str(result_file.fileno())], cwd=work,
                stdin=spec_file, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(result_file.fileno(),),
                start_new_session=True, env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"})
        start = time.monotonic()
        try:
            process.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _kill_group(process)
        timed_out = time.monotonic() - start >= limits.wall_s
        with open(result, "rb") as f:
            report = f.read(4096)
        return _execution(report, process.returncode, timed_out, total)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _execution(report: bytes, returncode: int, timed_out: bool, total: int) -> Execution:
    try:
        data = json.loads(report.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if isinstance(data, dict) and data.get("done"):
        passed = int(data["passed"])
        failure = data.get("failure") or (None if passed == total else "tests_failed")
        return Execution(passed, total, failure, data.get("network", "isolated"))
    network = data.get("network", "isolated") if isinstance(data, dict) else "isolated"
    if timed_out:
        failure = "timeout"
    elif returncode == -signal.SIGXCPU:
        failure = "cpu_time"
    elif returncode == -signal.SIGXFSZ:
        failure = "file_size"
    elif returncode is not None and returncode < 0:
        failure = "killed"
    else:
        failure = "exited"
    return Execution(0, total, failure, network)


# The trusted prelude run in the child: it reads its spec from stdin and writes one JSON report to the file
# descriptor named on its command line (first {"network": ...} when it starts, then the result).
_HARNESS = r'''
import builtins, ctypes, json, os, resource, sys
spec = json.load(sys.stdin)
out = os.fdopen(int(sys.argv[1]), "w")

def report(**fields):
    out.seek(0)
    out.truncate()
    out.write(json.dumps(fields))
    out.flush()

resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_s"], spec["cpu_s"] + 1))  # SIGXCPU at the soft limit
for limit, value in ((resource.RLIMIT_AS, spec["memory"]), (resource.RLIMIT_FSIZE, spec["file"]),
                     (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NPROC, spec["processes"])):
    resource.setrlimit(limit, (value, value))
import subprocess, socket
for module in spec["preload"]:  # imported while the standard library is surely readable
    __import__(module)
libc = ctypes.CDLL(None, use_errno=True)
network = "isolated" if libc.unshare(0x40000000) == 0 else "shared"
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(spec["nobody"])
    os.setuid(spec["nobody"])
report(network=network)

home = os.getcwd()
real_open = builtins.open

def guarded_open(file, mode="r", *args, **kwargs):
    if isinstance(file, int) or not any(c in mode for c in "wax+"):
        return real_open(file, mode, *args, **kwargs)
    path = os.path.realpath(file)
    if os.path.commonpath([path, home]) != home:
        raise PermissionError(f"writing outside the sandbox directory: {file}")
    return real_open(file, mode, *args, **kwargs)

def refused(*args, **kwargs):
    raise PermissionError("not allowed in the sandbox")

builtins.open = guarded_open
for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve",
             "posix_spawn", "posix_spawnp", "kill", "killpg", "remove", "unlink", "rmdir", "removedirs", "rename",
             "replace", "chmod", "chown", "truncate", "putenv", "setsid", "setpgid"):
    if hasattr(os, name):
        setattr(os, name, refused)
subprocess.Popen = refused
socket.socket = refused
sys.modules["ctypes"] = None
del ctypes, libc

namespace = {"__name__": "__main__"}
try:
    exec(compile(spec["program"], "solution.py", "exec"), namespace)
    exec(compile(spec["setup"], "test.py", "exec"), namespace)
except SyntaxError:
    report(done=True, passed=0, failure="syntax_error", network=network)
    sys.exit(0)
except MemoryError:
    report(done=True, passed=0, failure="memory", network=network)
    sys.exit(0)
except BaseException:
    report(done=True, passed=0, failure="error", network=network)
    sys.exit(0)
if spec["entry_point"] not in namespace:
    report(done=True, passed=0, failure="missing_entry_point", network=network)
    sys.exit(0)
namespace[spec["argument"]] = namespace[spec["entry_point"]]
passed, failure = 0, None
for source, is_test in spec["statements"]:
    try:
        exec(compile(source, "test.py", "exec"), namespace)
        passed += is_test
    except MemoryError:
        failure = "memory"
    except BaseException:
        pass
report(done=True, passed=passed, failure=failure, network=network)
'''
