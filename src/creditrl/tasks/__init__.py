"""Tasks: the lab, countdown, knights and knaves and trace (generated, exact step labels), code (unit tests in a
sandbox), GSM8K, MATH-500, generic jsonl files, hub datasets and reasoning-gym's datasets, each registered by
name (`registry.py`)."""

from creditrl.tasks import code, countdown, knights_knaves, lab, math, rg, trace  # noqa: F401  (registers them)
from creditrl.tasks.base import Problem, Task, Verdict
from creditrl.tasks.lab import LabTask
from creditrl.tasks.registry import TASK_BUILDERS, build_task, register_task

__all__ = ["TASK_BUILDERS", "LabTask", "Problem", "Task", "Verdict", "build_task", "register_task"]
