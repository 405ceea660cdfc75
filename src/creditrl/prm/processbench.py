"""ProcessBench: does a step scorer find a solution's first wrong step? (Zheng et al. 2024, arXiv 2412.06559)

A file holds rows `{"problem": str, "steps": [str, ...], "label": int}`, `label` the index of the first
wrong step or −1 when every step is right; other fields are ignored.  It is a JSON array (ProcessBench's
release) or one object per line.  A PRM's prediction is its first step with P(correct) < `threshold`
(ProcessBench: 0.5), or −1 when there is none.  err = the share of rows with an error (label ≥ 0)
predicted exactly; ok = the share of rows without one (label −1) predicted −1; F1 = 2·err·ok / (err + ok).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from creditrl.credit_metrics import processbench_f1
from creditrl.prm.model import TrainedPRM
from creditrl.prm.prm800k import StepExample
from creditrl.prm.train import examples_to_rollouts
from creditrl.tasks.errors import DatasetError

THRESHOLD = 0.5


@dataclass(frozen=True)
class ProcessBenchRow:
    problem: str
    steps: tuple[str, ...]
    label: int  # the first wrong step, −1 for none


def load_processbench(path: Path | str) -> list[ProcessBenchRow]:
    """The rows of a ProcessBench file (a JSON array, or JSON lines); errors name the file, row and field."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, None, "no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(path, None, f"invalid UTF-8 at byte {err.start}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(path, err.lineno, f"not valid JSON: {err.msg}") from None
        parsed = [_row(row, lambda reason, i=i: DatasetError(path, None, f"row {i}: {reason}"))
                  for i, row in enumerate(rows)]
    else:
        parsed = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(path, line_no, f"not valid JSON: {err.msg}") from None
            parsed.append(_row(row, lambda reason, n=line_no: DatasetError(path, n, reason)))
    if not parsed:
        raise DatasetError(path, None, "no rows")
    return parsed


def _row(row: Any, error) -> ProcessBenchRow:
    if not isinstance(row, dict):
        raise error(f"expected an object, got {type(row).__name__}")
    problem, steps, label = row.get("problem"), row.get("steps"), row.get("label")
    if not isinstance(problem, str):
        raise error(f"field 'problem': expected text, got {problem!r}")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise error(f"field 'steps': expected a non-empty list of text, got {steps!r}")
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
        raise error(f"field 'label': expected −1 or a step index below {len(steps)}, got {label!r}")
    return ProcessBenchRow(problem, tuple(steps), label)


def step_scores(prm: TrainedPRM, rows: list[ProcessBenchRow]) -> list[list[float]]:
    """A trained PRM's P(correct) for every step of every row, the steps read as `prm train` reads PRM800K's."""
    examples = [StepExample(r.problem, r.steps, tuple(1 if r.label < 0 or j < r.label else 0 if j == r.label else -1
                                                      for j in range(len(r.steps))), "", "") for r in rows]
    scores = prm.score_steps(examples_to_rollouts(examples, prm.tokenizer))
    return [scores[i, : len(r.steps)].tolist() for i, r in enumerate(rows)]


def predicted_error(scores: list[float], threshold: float = THRESHOLD) -> int:
    """The first step whose P(correct) is below `threshold`, or −1."""
    return next((j for j, s in enumerate(scores) if s < threshold), -1)


def processbench_scores(rows: list[ProcessBenchRow], predictions: list[int]) -> dict[str, float]:
    """err, ok and F1 of the predicted first errors against the rows' labels."""
    errors = [p == r.label for r, p in zip(rows, predictions) if r.label >= 0]
    clean = [p == -1 for r, p in zip(rows, predictions) if r.label < 0]
    err = sum(errors) / len(errors) if errors else float("nan")
    ok = sum(clean) / len(clean) if clean else float("nan")
    return {"error_accuracy": err, "correct_accuracy": ok, "f1": processbench_f1(err, ok),
            "n_error": len(errors), "n_correct": len(clean)}
