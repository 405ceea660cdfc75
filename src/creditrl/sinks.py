"""Sinks: where a run's step metrics go: its own jsonl logs, TensorBoard, Weights & Biases, trackio.

The `jsonl` sink is always open: `metrics.jsonl` and `eval.jsonl` are the run's record, which a
resumed run cuts back to its checkpoint.  `output.report_to` names further destinations.  A sink is
opened when training starts, at `first_step` (past 1 when a run resumes), is given every step's
metrics as `log(prefix, metrics, step)`, which it records as `prefix/name` ("train/reward",
"eval/avg@k"), and is closed when training ends or fails.

Each sink is a class registered under its name, opened by its constructor:

    @register_sink("tensorboard")
    class TensorBoardSink:
        def __init__(self, run_dir: Path, run_name: str, config: dict, first_step: int): ...
        def log(self, prefix: str, metrics: dict[str, float], step: int) -> None: ...
        def close(self) -> None: ...
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from creditrl.config.plugins import load_plugins
from creditrl.jsonl import append_jsonl

PROJECT = "creditrl"  # the W&B project (unless WANDB_PROJECT names another) and the trackio project


class Sink(Protocol):
    """An open destination of one run's metrics."""

    def log(self, prefix: str, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


SinkFactory = Callable[[Path, str, dict[str, Any], int], Sink]
SINKS: dict[str, SinkFactory] = {}


def register_sink(name: str) -> Callable[[SinkFactory], SinkFactory]:
    """Register a sink class under `name`: `cls(run_dir, run_name, config, first_step)` opens the sink, `config`
    being the run's resolved configuration as a plain dict (W&B and trackio record it with the run)."""

    def decorate(cls: SinkFactory) -> SinkFactory:
        if name in SINKS and SINKS[name] is not cls:
            raise ValueError(f"sink {name!r} is already registered")
        SINKS[name] = cls
        return cls

    return decorate


ENTRY_POINT_GROUP = "creditrl.sinks"


def known_sinks() -> list[str]:
    """Names of every sink: built-in, and those of packages in the entry-point group `creditrl.sinks`."""
    load_plugins(ENTRY_POINT_GROUP, "sink")
    return sorted(SINKS)


def build_sinks(names: Iterable[str], run_dir: Path, run_name: str, config: dict[str, Any],
                first_step: int) -> list[Sink]:
    """Open the named sinks (each once) for a run that logs from `first_step` on.  An unknown name is a
    ValueError that lists the known ones; a sink that fails to open closes those opened before it."""
    names = list(dict.fromkeys(names))
    unknown = [name for name in names if name not in known_sinks()]
    if unknown:
        raise ValueError(f"unknown sink {unknown[0]!r}; known sinks: {', '.join(known_sinks())}")
    sinks: list[Sink] = []
    try:
        for name in names:
            sinks.append(SINKS[name](run_dir, run_name, config, first_step))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


@register_sink("jsonl")
class JsonlSink:
    """The run's own logs: one record `{"step": step, **metrics}` per line, train steps in `metrics.jsonl`
    and evaluations in `eval.jsonl`."""

    FILES = {"train": "metrics.jsonl", "eval": "eval.jsonl"}

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], first_step: int):
        self.run_dir = run_dir

    def log(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        append_jsonl(self.run_dir / self.FILES[prefix], {"step": step, **metrics})

    def close(self) -> None:
        pass


def _import_optional(module: str, extra: str) -> ModuleType:
    """Import `module`; when the package `extra` is missing, say how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != extra:  # the package is there but something it imports is not: its own error says what
            raise
        raise ImportError(f"the {extra} sink (output.report_to) needs the {extra} package: "
                          f"pip install 'creditrl[{extra}]'") from None


def _named(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{name}": value for name, value in metrics.items()}


@register_sink("tensorboard")
class TensorBoardSink:
    """Event files in `run_dir/tensorboard`.  Events an earlier writer logged there from `first_step` on
    (a killed run's, after the checkpoint it resumes from) are purged, as the jsonl logs are cut back."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], first_step: int):
        tensorboard = _import_optional("torch.utils.tensorboard", "tensorboard")
        self.writer = tensorboard.SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_step)

    def log(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        for name, value in _named(prefix, metrics).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@register_sink("wandb")
class WandbSink:
    """A Weights & Biases run named after the run folder, in the project WANDB_PROJECT (default "creditrl"),
    its local files in WANDB_DIR (default: the run folder); WANDB_MODE and W&B's other settings are read
    from the environment as usual.  The W&B run's id is kept in `run_dir/wandb_id`, so a resumed run
    continues the same W&B run.  W&B keeps the first values it got for a step: those a killed run logged
    after its checkpoint stay (on a CPU, the same values the resumed run computes again)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], first_step: int):
        wandb = _import_optional("wandb", "wandb")
        id_file = run_dir / "wandb_id"
        kept_id = id_file.read_text().strip() if first_step > 1 and id_file.exists() else None  # None: a new run
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, id=kept_id,
                              resume="allow", config=config, dir=os.environ.get("WANDB_DIR", run_dir))
        id_file.write_text(self.run.id)

    def log(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        self.run.log(_named(prefix, metrics), step=step)

    def close(self) -> None:
        self.run.finish()


@register_sink("trackio")
class TrackioSink:
    """A trackio run named after the run folder, in the project "creditrl", stored where trackio keeps its
    projects: TRACKIO_DIR (default ~/.cache/huggingface/trackio), or a Space with TRACKIO_SPACE_ID.  A
    resumed run continues the trackio run of its name; steps a killed run logged after its checkpoint stay,
    so those steps have two points."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], first_step: int):
        self.trackio = _import_optional("trackio", "trackio")
        self.trackio.init(project=PROJECT, name=run_name, config=config,
                          resume="allow" if first_step > 1 else "never")

    def log(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(_named(prefix, metrics), step=step)

    def close(self) -> None:
        self.trackio.finish()
