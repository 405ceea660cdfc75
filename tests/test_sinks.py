"""Sinks: a short lab run's metrics arrive in TensorBoard, W&B (offline) and trackio (a local store), read back."""

import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from creditrl.config import ConfigError
from creditrl.configure import load_config
from creditrl.sinks import TensorBoardSink, WandbSink, build_sinks
from creditrl.trainer import Trainer, TrainingStopped


def _overrides(model_dir, run_dir, *sinks):
    """Two steps of a tiny lab run reporting to `sinks`."""
    return [f"model.name={model_dir}", f"output.dir={run_dir}", f"output.report_to=[{','.join(sinks)}]",
            "train.steps=2", "rollout.prompts_per_step=3", "rollout.group_size=4", "task.lab.eval_size=6",
            "task.lab.train_size=200", "eval.k=2", "eval.behaviour=false", "sampling.max_new_tokens=24",
            "output.checkpoint_every=2", "train.lr=1e-3"]


def _records(run_dir):
    """The run's own record of what it logged: metrics.jsonl and eval.jsonl."""
    return [[json.loads(line) for line in (run_dir / name).read_text().splitlines()]
            for name in ("metrics.jsonl", "eval.jsonl")]


def _train(model_dir, run_dir, *sinks):
    Trainer(load_config(None, _overrides(model_dir, run_dir, *sinks)), show_progress=False).train()
    return _records(run_dir)


def _expected(train_records, eval_records):
    """{(name, step): value} of what the sinks should have got: every metric, as `train/...` or `eval/...`."""
    expected = {}
    for prefix, records in (("train", train_records), ("eval", eval_records)):
        for record in records:
            expected.update({(f"{prefix}/{name}", record["step"]): value
                             for name, value in record.items() if name != "step"})
    return expected


def _assert_arrived(expected, received, rel=0.0):
    assert {("train/reward", 1), ("train/reward", 2), ("eval/avg@k", 0), ("eval/avg@k", 2)} <= expected.keys()
    assert received.keys() == expected.keys()
    for key, value in expected.items():
        assert received[key] == pytest.approx(value, rel=rel, nan_ok=True), key


def test_an_unknown_sink_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown sink 'mlflow'; known sinks: jsonl, tensorboard, trackio, wandb"):
        build_sinks(["mlflow"], tmp_path, "run", {}, first_step=1)
    with pytest.raises(ConfigError, match="output.report_to: unknown sink 'mlflow'; known sinks: jsonl, tensorboard, "):
        load_config(None, ["output.report_to=[mlflow]"])


@pytest.mark.parametrize("package", ["tensorboard", "wandb", "trackio"])
def test_a_missing_package_names_its_extra(package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)  # imported afresh, so it imports it
    with pytest.raises(ImportError, match=rf"pip install 'creditrl\[{package}\]'"):
        build_sinks([package], tmp_path, "run", {}, first_step=1)


def test_a_run_that_fails_still_closes_its_sinks(tiny_lab_model_dir, tmp_path, monkeypatch):
    class Recorder:
        def __init__(self):
            self.logged, self.closed = [], False

        def log(self, prefix, metrics, step):
            self.logged.append((prefix, step))

        def close(self):
            self.closed = True

    def full_disk(trainer):
        raise TrainingStopped("disk full")

    recorder = Recorder()
    monkeypatch.setattr("creditrl.trainer.build_sinks", lambda *args, **kwargs: [recorder])
    monkeypatch.setattr(Trainer, "_checkpoint", full_disk)  # at step 2, checkpoint_every's
    with pytest.raises(TrainingStopped, match="disk full"):
        _train(tiny_lab_model_dir, tmp_path / "run")
    assert recorder.logged == [("eval", 0), ("train", 1), ("train", 2)] and recorder.closed


def test_tensorboard_gets_the_runs_metrics(tiny_lab_model_dir, tmp_path):
    EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator
    train_records, eval_records = _train(tiny_lab_model_dir, tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    received = {(tag, event.step): event.value for tag in events.Tags()["scalars"] for event in events.Scalars(tag)}
    _assert_arrived(_expected(train_records, eval_records), received, rel=1e-6)  # stored as float32


def test_tensorboard_purges_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator
    killed = TensorBoardSink(tmp_path, "run", {}, first_step=1)
    for step in (1, 2, 3):
        killed.log("train", {"reward": float(step)}, step)
    killed.close()
    resumed = TensorBoardSink(tmp_path, "run", {}, first_step=3)  # resumes from the checkpoint of step 2
    resumed.log("train", {"reward": 30.0}, 3)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(event.step, event.value) for event in events.Scalars("train/reward")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


@pytest.fixture()
def wandb_offline(tmp_path, monkeypatch):
    """W&B writing offline runs under tmp_path, its settings and caches there too."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def _wandb_records(offline_run: Path):
    """The protobuf Records of an offline run's `.wandb` file.  Its format is LevelDB's log: after a 7-byte
    header (":W&B", magic, version), 32 KiB blocks of chunks, each a 7-byte header (crc32, length, type: 1
    a whole record, 2/3/4 its first/middle/last part) and its data; a block's tail shorter than a header
    is padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    block, header = 32 * 1024, 7
    data = next(offline_run.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    position, parts = header, b""
    while position + header <= len(data):
        if block - position % block < header:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + header])
        parts += data[position + header:position + header + length]
        position += header + length
        if kind in (1, 4):
            yield Record.FromString(parts)
            parts = b""


@pytest.mark.slow
def test_wandb_gets_the_runs_metrics(wandb_offline, tiny_lab_model_dir, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-runs"))
    monkeypatch.setenv("WANDB_PROJECT", "creditrl-tests")
    train_records, eval_records = _train(tiny_lab_model_dir, tmp_path / "lab-run", "wandb")
    wandb.teardown()  # W&B's service writes a finished run's file in its own time: wait for it
    [offline_run] = (tmp_path / "wandb-runs" / "wandb").glob("offline-run-*")
    records = list(_wandb_records(offline_run))

    [run] = [record.run for record in records if record.HasField("run")]
    assert (run.run_id, run.project, run.display_name) == (
        (tmp_path / "lab-run" / "wandb_id").read_text(), "creditrl-tests", "lab-run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["method"] == "grpo" and config["train"]["steps"] == 2

    received = {}
    for history in (record.history for record in records if record.HasField("history")):
        received.update({("/".join(item.nested_key) or item.key, history.step.num): json.loads(item.value_json)
                         for item in history.item})
    received = {key: value for key, value in received.items() if not key[0].startswith("_")}  # W&B's own _step, ...
    _assert_arrived(_expected(train_records, eval_records), received)


def test_a_resumed_run_continues_its_wandb_run(wandb_offline, tmp_path):
    """The id is kept for a resumed run (first step past 1); a run started afresh in the folder gets a new one."""
    ids = []
    for first_step in (1, 3, 1):
        WandbSink(tmp_path, "run", {}, first_step).close()
        ids.append((tmp_path / "wandb_id").read_text())
    assert ids[0] == ids[1] != ids[2]
    run_files = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # W&B's files are in the run folder
    assert {file.stem.removeprefix("run-") for file in run_files} == set(ids)


@pytest.mark.slow
def test_trackio_gets_the_runs_metrics(tiny_lab_model_dir, tmp_path):
    """Through the command line: trackio reads TRACKIO_DIR once, on import (TRL imports it too), so a fresh
    interpreter is the one place its store can be moved to a temporary folder."""
    pytest.importorskip("trackio")
    store, run_dir = tmp_path / "trackio", tmp_path / "lab-run"
    subprocess.run([sys.executable, "-m", "creditrl.cli", "train", "--quiet",
                    *_overrides(tiny_lab_model_dir, run_dir, "trackio"), "train.threads=1"],
                   env={**os.environ, "TRACKIO_DIR": str(store)}, check=True, capture_output=True)
    with sqlite3.connect(store / "creditrl.db") as db:
        rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = 'lab-run'").fetchall()
    received = {}
    for step, metrics in rows:
        received.update({(name, step): value for name, value in json.loads(metrics).items()})
    _assert_arrived(_expected(*_records(run_dir)), received)
