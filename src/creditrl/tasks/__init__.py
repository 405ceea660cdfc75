"""Tasks: the lab (synthetic, exact step labels), GSM8K, MATH-500 and generic jsonl files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from creditrl.tasks.base import Problem, Task, Verdict
from creditrl.tasks.lab import LabTask

if TYPE_CHECKING:
    from creditrl.config import TaskConfig


def build_task(cfg: "TaskConfig") -> Task:
    """The task a config names; file-backed tasks read (and validate) their files here."""
    if cfg.name == "lab":
        return LabTask(cfg.lab)
    from creditrl.tasks import math as math_tasks

    common = {"eval_size": cfg.eval_size, "seed": cfg.seed, "on_bad_row": cfg.on_bad_row,
              "require_format": cfg.require_format}
    if cfg.prompt_template is not None:
        common["prompt_template"] = cfg.prompt_template
    if cfg.name == "gsm8k":
        if cfg.data_dir is None:
            raise ValueError("task.data_dir: gsm8k needs the folder holding train.jsonl and test.jsonl")
        return math_tasks.gsm8k_task(cfg.data_dir, **common)
    if cfg.name == "math500":
        if cfg.eval_path is None:
            raise ValueError("task.eval_path: math500 needs the path of its test.jsonl")
        return math_tasks.math500_task(cfg.eval_path, train_path=cfg.train_path, **common)
    if cfg.name == "hub":
        if cfg.hub_name is None:
            raise ValueError("task.hub_name: name the hub dataset to load")
        return math_tasks.hub_task(cfg.hub_name, question_field=cfg.question_field, answer_field=cfg.answer_field,
                                   answer_is_solution=cfg.answer_is_solution, **common)
    if cfg.eval_path is None:
        raise ValueError("task.eval_path: a jsonl task needs eval_path (and optionally train_path)")
    return math_tasks.JsonlTask(train_path=cfg.train_path, eval_path=cfg.eval_path, question_field=cfg.question_field,
                                answer_field=cfg.answer_field, answer_is_solution=cfg.answer_is_solution, **common)


__all__ = ["Problem", "Task", "Verdict", "LabTask", "build_task"]
