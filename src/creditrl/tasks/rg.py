"""reasoning-gym's procedural datasets as tasks, each scored by the dataset's own `score_answer`.

`task.name=reasoning_gym task.rg.dataset=basic_arithmetic task.rg.config={max_terms: 3}` draws a
train and a held-out split from the dataset (seeded; a training question that is also held out is
redrawn).  The prompt is the question followed by one of reasoning-gym's instructions, which ask
for the final answer in `<answer>...</answer>` tags; the answer is what the last such pair holds
(reasoning-gym's `extract_answer`) and the score is `score_answer(answer, entry)` in [0, 1]
(some datasets give partial credit).  A response is correct when it scores 1.  With
`untagged: last_number`, a response without the tags is scored on its last number instead of 0
(SmolLM2-135M-Instruct, for one, answers `1 + 5 = 6` and never writes the tags).  Needs
`pip install 'creditrl[rg]'`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from creditrl.config import ReasoningGymSection
from creditrl.tasks.base import Problem
from creditrl.tasks.registry import register_task
from creditrl.tasks.verdicts import ScoredVerdict

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError("task.name=reasoning_gym needs the reasoning-gym package: pip install 'creditrl[rg]' "
                          "(or pip install reasoning-gym)") from error
    return reasoning_gym


def create(name: str | None, config: dict[str, Any], size: int, seed: int):
    """reasoning-gym's dataset `name` with `config`; an unknown name or setting is an error naming it."""
    rg = _reasoning_gym()
    known = sorted(rg.factory.DATASETS)
    if name is None:
        raise ValueError("task.rg.dataset: name a reasoning-gym dataset, e.g. basic_arithmetic")
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"close names: {', '.join(close)}" if close else f"known: {', '.join(known)}"
        raise ValueError(f"task.rg.dataset: reasoning-gym has no dataset {name!r}; {hint}")
    try:
        return rg.create_dataset(name, **{**config, "size": size, "seed": seed})
    except (TypeError, ValueError, AssertionError) as error:
        raise ValueError(f"task.rg.config: {name} does not accept {config}: {error}") from None


class HeldOutExcluded(Sequence[Problem]):
    """The dataset's entries as problems, an entry whose question is held out replaced by a later one."""

    def __init__(self, dataset, instruction: str, held_out: frozenset[str]):
        self.dataset, self.instruction, self.held_out = dataset, instruction, held_out
        self._made: dict[int, Problem] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        if index not in self._made:
            source = index
            entry = self.dataset[source]
            while entry["question"] in self.held_out:
                source += len(self)  # reasoning-gym draws entry i from seed + i: any index gives an entry
                entry = self.dataset[source]
            self._made[index] = problem(entry, f"{self.dataset.config.seed}-{index}", self.instruction)
        return self._made[index]


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def problem(entry: dict, problem_id: str, instruction: str) -> Problem:
    return Problem(id=problem_id, prompt=f"{entry['question']}\n\n{instruction}", answer=str(entry["answer"]),
                   meta={"entry": entry})


class ReasoningGymTask:
    """Seeded splits of one reasoning-gym dataset, scored by its `score_answer`."""

    name = "reasoning_gym"
    step_splitter = "math"

    def __init__(self, cfg: ReasoningGymSection):
        rg = _reasoning_gym()
        if cfg.instruction not in rg.utils.SYSTEM_PROMPTS:
            raise ValueError(f"task.instruction: reasoning-gym has no prompt {cfg.instruction!r}; known: "
                             f"{', '.join(rg.utils.SYSTEM_PROMPTS)}")
        self.instruction = rg.utils.SYSTEM_PROMPTS[cfg.instruction].strip()
        self._extract = rg.utils.extract_answer
        self.last_number = cfg.untagged == "last_number"
        held_out = create(cfg.rg.dataset, cfg.rg.config, cfg.eval_size, cfg.seed * 2 + 2)
        self.dataset = held_out
        self._eval = [problem(held_out[i], f"eval-{i}", self.instruction) for i in range(len(held_out))]
        train = create(cfg.rg.dataset, cfg.rg.config, cfg.train_size, cfg.seed * 2 + 1)
        self._train = HeldOutExcluded(train, self.instruction, frozenset(held_out[i]["question"]
                                                                         for i in range(len(held_out))))

    def train_problems(self) -> Sequence[Problem]:
        return self._train

    def eval_problems(self) -> list[Problem]:
        return self._eval

    def verify(self, problem: Problem, response: str) -> ScoredVerdict:
        tagged = self._extract(response)
        answer = tagged if tagged is not None or not self.last_number else _last_number(response)
        try:
            score = float(self.dataset.score_answer(answer, problem.meta["entry"]))
        except Exception:  # a dataset's scorer that cannot read this answer scores it 0
            score = 0.0
        return ScoredVerdict(correct=score >= 1.0, step_correct=None, format_ok=tagged is not None, answer=answer,
                             score=score, failure=None if score >= 1.0 else
                             "no_answer" if answer is None else "wrong_answer")


@register_task("reasoning_gym", config=ReasoningGymSection)
def reasoning_gym_task(cfg: ReasoningGymSection) -> ReasoningGymTask:
    """The dataset `task.rg.dataset` with `task.rg.config`."""
    return ReasoningGymTask(cfg)
