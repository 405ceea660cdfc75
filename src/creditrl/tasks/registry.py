"""The task registry: a task is a config section model and a builder `fn(section) -> Task`.

    @register_task("countdown", config=CountdownSection, bundled_model="countdown")
    def countdown_task(cfg: CountdownSection) -> Task: ...

`register_task` adds the section to the config's union (`task.name: countdown` then validates
against `CountdownSection`) and the builder here; `bundled_model` names the checkpoint under
creditrl/assets that `model.name` defaults to for the task (an explicit `model.name` wins).  A user's
package declares its module in the entry-point group `creditrl.tasks`; the config imports it the first
time the name is not found.
"""

from __future__ import annotations

from collections.abc import Callable

from creditrl.config import TaskConfig, register_task_section, task_section_model
from creditrl.tasks.base import Task

TaskBuilder = Callable[[TaskConfig], Task]
TASK_BUILDERS: dict[str, TaskBuilder] = {}


def register_task(name: str, config: type[TaskConfig],
                  bundled_model: str | None = None) -> Callable[[TaskBuilder], TaskBuilder]:
    """Register `fn(section) -> Task` as the task `name`, configured by the section model `config`, trained by
    default from the bundled model `bundled_model` (None: the model section's default)."""
    if config.model_fields["name"].default != name:
        raise ValueError(f"task {name!r}: {config.__name__}.name must default to {name!r}")

    def decorate(fn: TaskBuilder) -> TaskBuilder:
        if TASK_BUILDERS.get(name, fn) is not fn:
            raise ValueError(f"task {name!r} is already registered")
        register_task_section(config, bundled_model)
        TASK_BUILDERS[name] = fn
        return fn

    return decorate


def build_task(cfg: TaskConfig) -> Task:
    """The task a config section names; file-backed tasks read (and validate) their files here."""
    task_section_model(cfg.name)  # loads plugins; an unknown name lists the known tasks
    if cfg.name not in TASK_BUILDERS:
        raise ValueError(f"task {cfg.name!r} has a config section but no builder (register it with register_task)")
    return TASK_BUILDERS[cfg.name](cfg)
