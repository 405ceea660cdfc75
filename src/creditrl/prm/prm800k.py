"""Step-labelled solutions from PRM800K jsonl files (Lightman et al. 2023, github.com/openai/prm800k).

One JSON object per line; the fields read here:

    question.problem                       the problem text
    label.finish_reason                    found_error | solution | bad_problem | give_up
    label.steps[i].completions[k].text     a candidate step
    label.steps[i].completions[k].rating   −1 (wrong), 0 (neutral), +1 (right), or null
    label.steps[i].chosen_completion       index of the completion the solution went on with, or null
    label.steps[i].human_completion        a step the labeller wrote instead (or null)

The solution is the chain of chosen steps (the human completion where there is one).  Where a
step has no chosen completion, or an unrated human rewrite, the labelling stopped there: its
first −1-rated completion is taken as the solution's last step (the first error, which the
rewrite replaced), or, with none, the solution ends before it.
Labels: +1 → 1, −1 → 0, and 0 → 1 under `neutral="positive"` (the common convention) or 0 under
`neutral="negative"`.  A step with a null rating (a human completion, usually) ends the labelled
part.  Each error names file:line: and the field.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from creditrl.tasks.errors import DatasetError

FINISH_REASONS = ("found_error", "solution", "bad_problem", "give_up")


@dataclass(frozen=True)
class StepExample:
    """One labelled solution: its problem, steps, and a 1 (right) / 0 (wrong) label per step."""

    problem: str
    steps: tuple[str, ...]
    labels: tuple[int, ...]
    finish_reason: str
    source: str  # "file:line"


def load_prm800k(path: Path | str, neutral: Literal["positive", "negative"] = "positive",
                 finish_reasons: tuple[str, ...] = ("found_error", "solution")) -> list[StepExample]:
    """Labelled solutions of the rows whose `finish_reason` is in `finish_reasons` (and have a step)."""
    if neutral not in ("positive", "negative"):
        raise ValueError(f"neutral must be 'positive' or 'negative', got {neutral!r}")
    path = Path(path)
    examples = []
    if not path.is_file():
        raise DatasetError(path, None, "no such file")
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise DatasetError(path, line_no, f"invalid UTF-8 at byte {err.start}") from None
            except json.JSONDecodeError as err:
                raise DatasetError(path, line_no, f"not valid JSON: {err.msg}") from None
            example = _example(row, neutral, f"{path}:{line_no}", functools.partial(DatasetError, path, line_no))
            if example.finish_reason in finish_reasons and example.steps:
                examples.append(example)
    if not examples:
        raise DatasetError(path, None, f"no row has a label.finish_reason in {', '.join(finish_reasons)} and a step")
    return examples


def _example(row: Any, neutral: str, source: str, error) -> StepExample:
    problem = _field(row, ("question", "problem"), str, error)
    finish = _field(row, ("label", "finish_reason"), str, error)
    if finish not in FINISH_REASONS:
        raise error(f"label.finish_reason: expected one of {', '.join(FINISH_REASONS)}, got {finish!r}")
    steps_field = _field(row, ("label", "steps"), list, error)
    texts, labels = [], []
    for i, step in enumerate(steps_field):
        where = f"label.steps[{i}]"
        completion, where = _step_completion(step, where, error)
        if completion is None:
            break
        text = _field(completion, ("text",), str, error, where)
        rating = _rating(completion, where, error)
        if rating is None:
            break
        texts.append(text)
        labels.append(0 if rating == -1 or (rating == 0 and neutral == "negative") else 1)
        if rating == -1:
            break
    return StepExample(problem, tuple(texts), tuple(labels), finish, source)


def _step_completion(step: Any, where: str, error) -> tuple[dict | None, str]:
    """The completion the solution takes at this step (and its field path), or None where it ends."""
    if not isinstance(step, dict):
        raise error(f"{where}: expected an object, got {type(step).__name__}")
    completions = _field(step, ("completions",), list, error, where)
    human = step.get("human_completion")
    chosen = step.get("chosen_completion")
    if human is not None:
        if not isinstance(human, dict):
            raise error(f"{where}.human_completion: expected an object or null, got {type(human).__name__}")
        if human.get("rating") is None:  # the labeller rewrote the step: the completion it rejected is the error
            rejected = _first_rejected(completions, where, error)
            if rejected is not None:
                return rejected
        return human, f"{where}.human_completion"
    if chosen is not None:
        if isinstance(chosen, bool) or not isinstance(chosen, int) or not 0 <= chosen < len(completions):
            raise error(f"{where}.chosen_completion: expected an index into {len(completions)} completions or null, "
                        f"got {chosen!r}")
        return _completion(completions, chosen, where, error), f"{where}.completions[{chosen}]"
    return _first_rejected(completions, where, error) or (None, where)


def _first_rejected(completions: list, where: str, error) -> tuple[dict, str] | None:
    """The first completion rated −1 and its field path, or None."""
    for k in range(len(completions)):
        if _rating(_completion(completions, k, where, error), f"{where}.completions[{k}]", error) == -1:
            return completions[k], f"{where}.completions[{k}]"
    return None


def _completion(completions: list, k: int, where: str, error) -> dict:
    if not isinstance(completions[k], dict):
        raise error(f"{where}.completions[{k}]: expected an object, got {type(completions[k]).__name__}")
    return completions[k]


def _rating(completion: dict, where: str, error) -> int | None:
    rating = completion.get("rating")
    if rating is not None and (isinstance(rating, bool) or rating not in (-1, 0, 1)):
        raise error(f"{where}.rating: expected -1, 0, 1 or null, got {rating!r}")
    return rating


def _field(obj: Any, keys: tuple[str, ...], kind: type, error, prefix: str = "") -> Any:
    """obj[k1][k2]... checked to be of `kind`; errors name the dotted field."""
    name = prefix
    for key in keys:
        name = f"{name}.{key}" if name else key
        if not isinstance(obj, dict) or key not in obj:
            raise error(f"{name}: missing")
        obj = obj[key]
    if not isinstance(obj, kind):
        raise error(f"{name}: expected {kind.__name__}, got {type(obj).__name__}")
    return obj
