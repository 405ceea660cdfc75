"""Tasks, sampling engines and composed methods, each chosen by name from a registry."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from factories import make_rollouts
from pydantic import Field

from creditrl.config import ConfigError, TaskConfig, known_tasks, task_config
from creditrl.configure import load_config
from creditrl.methods import compute_advantages, get_method, loss_hooks, resolve_method
from creditrl.policy.engines import ENGINES, get_engine, register_engine
from creditrl.tasks import TASK_BUILDERS, LabTask, build_task, register_task


# ---- methods composed in the config ----------------------------------------------------------------------
def test_a_method_composed_in_yaml_and_by_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method:\n  advantage: capo\n  token_weight: fipo\nmethod_params:\n  half_life: 8\n")
    cfg = load_config(path)
    method = resolve_method(cfg.method)
    assert (method.name, method.advantage, method.token_weight) == ("capo+fipo", "capo", "fipo")
    assert cfg.method_params["half_life"] == 8.0 and cfg.method_params["voting"] == "intersection"  # capo's default
    assert cfg.run_dir().name == "lab-capo+fipo-seed0"
    dotted = load_config(None, ["method.advantage=rloo", "method.token_weight=fipo"])
    assert resolve_method(dotted.method).pieces() == [("advantage", "rloo"), ("token weight", "fipo")]


def test_a_composed_method_validates_its_pieces_parameters():
    with pytest.raises(ConfigError, match="unknown key 'method_params.k'"):  # VinePPO's, not rloo's or fipo's
        load_config(None, ["method.advantage=rloo", "method.token_weight=fipo", "method_params.k=3"])
    with pytest.raises(ConfigError, match="method_params.half_life"):
        load_config(None, ["method.advantage=rloo", "method.token_weight=fipo", "method_params.half_life=-1"])
    with pytest.raises(ConfigError, match="unknown token weight 'nope'"):
        load_config(None, ["method.advantage=rloo", "method.token_weight=nope"])
    with pytest.raises(ConfigError, match="unknown key 'method.weight'"):
        load_config(None, ["method.advantage=rloo", "method.weight=fipo"])


def test_a_composed_method_computes_what_its_pieces_compute():
    rollouts = make_rollouts([1.0, 0.0, 0.5, 0.5], [0, 0, 1, 1], [3, 2, 3, 1])
    composed = resolve_method(load_config(None, ["method.advantage=rloo", "method.token_weight=fipo"]).method)
    torch.testing.assert_close(compute_advantages(composed, rollouts), compute_advantages("rloo", rollouts))
    weight = loss_hooks(composed)[1]
    delta = torch.full((4, 3), 0.01)
    torch.testing.assert_close(weight(torch.ones(4, 3), delta, rollouts.response_mask)[0],
                               loss_hooks("fipo")[1](torch.ones(4, 3), delta, rollouts.response_mask)[0])


@pytest.mark.parametrize("method", ["grpo", "rloo", "capo", "denser", "grpo_lambda", "prm", "pure", "dapo"])
def test_a_group_relative_method_needs_two_responses_per_prompt(method):
    assert get_method(method).group_relative
    with pytest.raises(ConfigError, match=r"rollout.group_size: .* needs at least 2 \(got 1\)"):
        load_config(None, [f"method={method}", "rollout.group_size=1"])


def test_vineppo_takes_one_response_per_prompt():
    assert not get_method("vineppo").group_relative
    assert load_config(None, ["method=vineppo", "rollout.group_size=1"]).rollout.group_size == 1


def test_compare_overrides_are_declared_by_the_method():
    assert "train.n_minibatches=4" in get_method("fipo").compare_overrides
    assert get_method("vineppo").compare_overrides == ("method_params.k=3", "method_params.max_steps=4")
    assert get_method("grpo").compare_overrides == ()


# ---- tasks ----------------------------------------------------------------------------------------------
def test_each_task_has_its_own_section():
    assert {"lab", "gsm8k", "math500", "jsonl", "hub"} <= set(known_tasks())
    with pytest.raises(ConfigError, match="unknown key 'task.lab'"):
        load_config(None, ["task.name=gsm8k", "task.lab.eval_size=3"])
    with pytest.raises(ConfigError, match="unknown key 'task.data_dir'"):
        load_config(None, ["task.data_dir=/data"])  # the lab reads no files
    with pytest.raises(ConfigError, match="unknown task 'nope'; known tasks: .*gsm8k.*lab"):
        load_config(None, ["task.name=nope"])


def test_hub_takes_a_dataset_config_split_and_fields():
    cfg = load_config(None, ["task.name=hub", "task.hub_name=openai/gsm8k", "task.hub_config=main",
                             "task.eval_split=test", "task.train_split=null", "task.answer_is_solution=true"])
    assert (cfg.task.hub_config, cfg.task.train_split, cfg.task.eval_split) == ("main", None, "test")


def test_a_registered_task_is_configured_and_built_by_name(tmp_path):
    class ShortLabSection(TaskConfig):
        name: Literal["short_lab"] = "short_lab"
        problems: int = Field(8, ge=1)

    @register_task("short_lab", config=ShortLabSection)
    def short_lab(cfg: ShortLabSection) -> LabTask:
        from creditrl.config import LabTaskConfig

        return LabTask(LabTaskConfig(train_size=cfg.problems, eval_size=cfg.problems))

    try:
        cfg = load_config(None, ["task.name=short_lab", "task.problems=5"])
        assert isinstance(cfg.task, ShortLabSection)
        assert len(build_task(cfg.task).eval_problems()) == 5
        assert cfg.model_dump()["task"] == {"name": "short_lab", "problems": 5}  # saved with its own fields
        with pytest.raises(ConfigError, match="task.problems"):
            load_config(None, ["task.name=short_lab", "task.problems=0"])
    finally:
        from creditrl.config.tasks import TASK_SECTIONS

        TASK_SECTIONS.pop("short_lab", None)
        TASK_BUILDERS.pop("short_lab", None)


def test_task_config_builds_the_named_section():
    assert task_config(name="gsm8k", data_dir="/d").data_dir.name == "d"
    assert task_config().lab.eval_size == 400


# ---- sampling engines -----------------------------------------------------------------------------------
def test_engines_are_chosen_by_name(tiny_policy):
    assert {"kv-cache", "generate", "vllm"} <= set(ENGINES)
    assert not get_engine("vllm").takes_lora
    with pytest.raises(ConfigError, match="sampling.engine: unknown sampling engine 'fast'; known engines: "):
        load_config(None, ["sampling.engine=fast"])
    with pytest.raises(ConfigError, match="does not take LoRA adapters"):
        load_config(None, ["sampling.engine=vllm", "model.lora.r=4"])

    calls = []

    @register_engine("recorded")
    def recorded(policy, prompt_ids, n, cfg, seed):
        calls.append((len(prompt_ids), n, seed))
        return get_engine("kv-cache").sample(policy, prompt_ids, n, cfg, seed)

    try:
        cfg = load_config(None, ["sampling.engine=recorded", "sampling.max_new_tokens=4"])
        generation = tiny_policy.sample([[1, 2], [3]], 2, cfg.sampling, seed=5)
        assert calls == [(2, 2, 5)] and len(generation.response_ids) == 4
    finally:
        ENGINES.pop("recorded")


# ---- users' packages, through entry points ---------------------------------------------------------------
class FakeEntryPoint:
    def __init__(self, name: str, load):
        self.name, self.value, self.load = name, f"{name}_pkg:module", load


def test_a_task_plugin_is_imported_when_its_name_is_first_asked_for(monkeypatch):
    import creditrl.config.plugins as plugins
    import creditrl.config.tasks as task_sections

    def load_plugin():  # what importing a user's module does: its decorator registers the task
        class PluginSection(TaskConfig):
            name: Literal["plugin_task"] = "plugin_task"

        register_task("plugin_task", config=PluginSection)(lambda cfg: LabTask(task_config().lab))

    def broken():
        raise ImportError("no module named nowhere")

    eps = [FakeEntryPoint("broken", broken), FakeEntryPoint("good", load_plugin)]
    monkeypatch.setattr(plugins, "entry_points", lambda group: eps if group == "creditrl.tasks" else [])
    monkeypatch.setattr(plugins, "_loaded", set())
    try:
        with pytest.warns(RuntimeWarning, match="task plugin 'broken'"):
            cfg = load_config(None, ["task.name=plugin_task"])
        assert cfg.task.name == "plugin_task" and isinstance(build_task(cfg.task), LabTask)
    finally:
        task_sections.TASK_SECTIONS.pop("plugin_task", None)
        TASK_BUILDERS.pop("plugin_task", None)


def test_an_engine_plugin_is_imported_when_its_name_is_first_asked_for(monkeypatch):
    import creditrl.config.plugins as plugins

    def load_plugin():
        register_engine("plugin_engine")(lambda policy, prompt_ids, n, cfg, seed: None)

    monkeypatch.setattr(plugins, "entry_points", lambda group: [FakeEntryPoint("good", load_plugin)]
                        if group == "creditrl.engines" else [])
    monkeypatch.setattr(plugins, "_loaded", set())
    try:
        assert load_config(None, ["sampling.engine=plugin_engine"]).sampling.engine == "plugin_engine"
        assert get_engine("plugin_engine").takes_lora
    finally:
        ENGINES.pop("plugin_engine", None)


def test_a_composed_method_trains_and_warns_as_its_pieces_say(tiny_lab_model_dir, tmp_path):
    import json

    from rich.console import Console

    from creditrl.trainer import Trainer

    cfg = load_config(None, [f"model.name={tiny_lab_model_dir}", f"output.dir={tmp_path / 'run'}", "train.steps=2",
                             "rollout.prompts_per_step=3", "rollout.group_size=4", "task.lab.eval_size=4",
                             "task.lab.train_size=50", "eval.k=1", "eval.before=false", "sampling.max_new_tokens=16",
                             "reward.overlong_max=10", "reward.overlong_buffer=6",  # reward spread for a random model
                             "method.advantage=rloo", "method.token_weight=fipo"])
    console = Console(record=True, width=200)
    summary = Trainer(cfg, console=console, show_progress=False).train()
    printed = console.export_text()  # (exporting clears the record)
    assert "token weight 'fipo'" in printed and "base method" in printed
    assert summary["method"] == "rloo+fipo"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["weight_mean"] == 1.0 for r in records)  # Δ = 0


def test_a_sink_plugin_is_imported_through_its_entry_point_group(monkeypatch, tmp_path):
    import creditrl.config.plugins as plugins
    import creditrl.sinks as sinks

    logged = []

    def load_plugin():
        @sinks.register_sink("plugin_sink")
        class Recorded:
            def __init__(self, run_dir, run_name, config, first_step):
                pass

            def log(self, prefix, metrics, step):
                logged.append((prefix, step, metrics))

            def close(self):
                pass

    monkeypatch.setattr(plugins, "entry_points", lambda group: [FakeEntryPoint("good", load_plugin)]
                        if group == "creditrl.sinks" else [])
    monkeypatch.setattr(plugins, "_loaded", set())
    try:
        cfg = load_config(None, ["output.report_to=[plugin_sink]"])
        opened = sinks.build_sinks(cfg.output.report_to, tmp_path, "run", {}, first_step=1)
        opened[0].log("train", {"reward": 0.5}, 1)
        assert logged == [("train", 1, {"reward": 0.5})]
    finally:
        sinks.SINKS.pop("plugin_sink", None)
