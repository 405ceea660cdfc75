"""A study: the grid file `creditrl compare --grid studies/<name>.yaml` runs, resumes and reports.

    methods: [grpo, capo, prm]        # the registered methods compared ("all": every registered one)
    baseline: grpo                    # each entry's paired difference is against it
    seeds: [0, 1, 2, 3, 4]
    steps: 15                         # policy-update steps per run
    eval_every: 5
    eval_size: 200                    # held-out problems per evaluation (null: the task's whole held-out set)
    task: lab                         # task.name
    overrides: [rollout.group_size=8] # dotted settings for every run
    sweeps:                           # the cartesian product of these: each combination is a cell
      - set: critic.recall            # one setting, or several set together:
        values: [1, 0.8, 0.6]         #   set: [prm.false_positive, prm.false_negative] with values
        methods: [capo]               #   [0, 0.1] (both get each value) or [[0, 0], [0.1, 0.2]]
    detect: 0.05                      # the difference the power calculation sizes seeds for
    out: docs/studies/credit-precision   # report.md, plots, results.json and metrics/<run>/ (the runs' logs)
    runs: runs/studies/credit-precision  # the run folders, checkpoints included (not committed)

A sweep applies to the methods it names (default: every method); a method runs once per
combination of the sweeps that apply to it.  Every key is checked: an unknown one is an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from creditrl.config.files import read_config_file, validated


class Sweep(BaseModel):
    """One axis of the grid: the dotted settings it sets and the values it takes."""

    model_config = ConfigDict(extra="forbid")

    set: list[str] = Field(min_length=1, description="the dotted settings set together (one, or several)")
    values: list[Any] = Field(min_length=1, description="a scalar gives every setting that value; a list gives "
                                                        "one value per setting")
    methods: list[str] | None = Field(None, description="the methods it applies to (None: all)")

    @field_validator("set", mode="before")
    @classmethod
    def _one_setting_is_a_list_of_one(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _values_fit_the_settings(self) -> Sweep:
        for i, value in enumerate(self.values):
            if isinstance(value, list) and len(value) != len(self.set):
                raise ValueError(f"values[{i}] has {len(value)} items for the {len(self.set)} settings {self.set}")
        return self

    def overrides(self, index: int) -> list[str]:
        """The `key=value` overrides of value number `index`."""
        value = self.values[index]
        values = value if isinstance(value, list) else [value] * len(self.set)
        return [f"{key}={written(v)}" for key, v in zip(self.set, values)]

    def label(self, index: int) -> str:
        """`critic.recall=0.8`, or `a+b=0.1` for settings set together to one value."""
        value = self.values[index]
        if isinstance(value, list):
            return ",".join(self.overrides(index))
        return f"{'+'.join(self.set)}={written(value)}"

    def applies_to(self, method: str) -> bool:
        return self.methods is None or method in self.methods


class Study(BaseModel):
    """The grid file's schema."""

    model_config = ConfigDict(extra="forbid")

    methods: list[str] | Literal["all"] = Field(description="the methods compared; 'all': every registered method "
                                                            "when the grid runs")
    baseline: str = "grpo"
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    steps: int = Field(15, ge=1)
    eval_every: int = Field(5, ge=0)
    eval_size: int | None = Field(200, ge=1, description="held-out problems per evaluation (None: the task's own)")
    task: str | None = Field(None, description="task.name (None: the base config's)")
    config: Path | None = Field(None, description="a run config YAML every run starts from")
    overrides: list[str] = Field(default_factory=list)
    sweeps: list[Sweep] = Field(default_factory=list)
    detect: float = Field(0.05, gt=0.0, le=1.0, description="the accuracy difference the power calculation sizes "
                                                            "seeds for")
    out: Path | None = Field(None, description="the report folder (None: docs/studies/<file name>)")
    runs: Path | None = Field(None, description="the run folders, checkpoints included (None: "
                                                "runs/studies/<file name>); their logs are copied to <out>/metrics/")

    @model_validator(mode="after")
    def _names_are_the_grids(self) -> Study:
        if not self.methods:
            raise ValueError("methods: name at least one method, or 'all'")
        if self.methods != "all" and self.baseline not in self.methods:
            raise ValueError(f"baseline {self.baseline!r} is not among the methods {self.methods}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        for i, sweep in enumerate(self.sweeps):
            unknown = [] if self.methods == "all" else sorted(set(sweep.methods or []) - set(self.methods))
            if unknown:
                raise ValueError(f"sweeps[{i}].methods names {unknown}, which are not among the methods")
        return self


def written(value: Any) -> str:
    """A YAML value as the text of a dotted override: strings as they are, the rest as JSON (true, null)."""
    return value if isinstance(value, str) else json.dumps(value)


def load_study(path: Path) -> Study:
    """The study in a grid file; `out` defaults to docs/studies/<name>, `runs` to runs/studies/<name> (<name>: the
    file's name without .yaml)."""
    study = validated(Study, read_config_file(path), where=path)
    name = Path(path).stem
    return study.model_copy(update={"out": study.out or Path("docs/studies") / name,
                                    "runs": study.runs or Path("runs/studies") / name})
