"""The whole run's configuration: the sections, the method, and the task chosen by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from creditrl.config.sections import (
    CriticConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OutputConfig,
    PRMConfig,
    RewardConfig,
    RolloutConfig,
    SamplingConfig,
    TrainConfig,
)
from creditrl.config.tasks import LabSection, TaskConfig, task_bundled_model, task_config


class MethodSpec(BaseModel):
    """A method composed from registered pieces instead of named: `method: {advantage: capo, token_weight: fipo}`
    (or `method.advantage=capo method.token_weight=fipo`).  Its parameters are the pieces' own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    advantage: str
    ratio_transform: str | None = None
    token_weight: str | None = None

    @property
    def name(self) -> str:
        """`capo+fipo`: the pieces' names joined, used for the run folder."""
        return "+".join(p for p in (self.advantage, self.ratio_transform, self.token_weight) if p is not None)


class RunConfig(BaseModel):
    """The whole run.  Sections validate on assignment; this top level validates on construction.

    `method` and `sampling.engine` are names checked against their registries by
    `creditrl.configure.load_config`, which also applies the method's published defaults.
    """

    model_config = ConfigDict(extra="forbid")

    method: str | MethodSpec = "grpo"
    method_params: dict[str, Any] = Field(default_factory=dict)
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: SerializeAsAny[TaskConfig] = Field(default_factory=LabSection)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_new_tokens=96))
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    prm: PRMConfig = Field(default_factory=PRMConfig)

    @field_validator("task", mode="before")
    @classmethod
    def _task_by_name(cls, value: Any) -> Any:
        """A mapping becomes the section model of the task it names (lab when it names none)."""
        return task_config(**value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _task_model(self) -> RunConfig:
        """An unset `model.name` becomes the task's bundled model, when the task names one."""
        bundled = task_bundled_model(self.task.name)
        if "name" not in self.model.model_fields_set and bundled is not None:
            self.model.name = bundled
        return self

    @model_validator(mode="after")
    def _dr_grpo_length(self) -> RunConfig:
        if self.loss.agg == "seq-mean-token-sum-norm" and self.loss.norm_length is None:
            self.loss.norm_length = self.sampling.max_new_tokens
        return self

    @property
    def method_name(self) -> str:
        return self.method if isinstance(self.method, str) else self.method.name

    def run_dir(self) -> Path:
        return self.output.dir or Path("runs") / f"{self.task.name}-{self.method_name}-seed{self.train.seed}"
