import math
from pathlib import Path

import pytest

from creditrl.config import ConfigError, parse_overrides
from creditrl.configure import load_config


def test_defaults_are_grpo_on_the_lab():
    cfg = load_config()
    assert cfg.method == "grpo" and cfg.task.name == "lab" and cfg.model.name == "lab"
    assert cfg.loss.agg == "seq-mean-token-mean"  # GRPO's published aggregation, from the method's defaults


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["train.lr=0.5", "loss.dual_clip=null", "sampling.stop=[a, b]"]) == {
        "train": {"lr": 0.5}, "loss": {"dual_clip": None}, "sampling": {"stop": ["a", "b"]}}
    cfg = load_config(None, ["train.lr=3e-5", "rollout.group_size=4"])
    assert cfg.train.lr == 3e-5 and cfg.rollout.group_size == 4


def test_method_defaults_sit_beneath_the_user(tmp_path):
    cfg = load_config(None, ["method=dapo"])
    assert (cfg.loss.eps_high, cfg.loss.agg, cfg.reward.wrong, cfg.rollout.dynamic_sampling) == (
        0.28, "token-mean", -1.0, True)
    path = tmp_path / "c.yaml"
    path.write_text("method: dapo\nloss:\n  eps_high: 0.3\n")
    cfg = load_config(path, ["reward.wrong=0"])
    assert cfg.loss.eps_high == 0.3 and cfg.reward.wrong == 0.0 and cfg.loss.agg == "token-mean"


def test_dapo_overlong_shaping_fills_in_only_what_the_user_left_unset():
    cfg = load_config(None, ["method=dapo", "sampling.max_new_tokens=100"])
    assert (cfg.reward.overlong_max, cfg.reward.overlong_buffer) == (100, 20)  # L_max, and a fifth as buffer
    cfg = load_config(None, ["method=dapo", "sampling.max_new_tokens=100", "reward.overlong_buffer=10"])
    assert (cfg.reward.overlong_max, cfg.reward.overlong_buffer) == (100, 10)  # the user's buffer stays
    cfg = load_config(None, ["method=fipo", "reward.overlong_max=50", "reward.overlong_buffer=5"])
    assert (cfg.reward.overlong_max, cfg.reward.overlong_buffer) == (50, 5)
    with pytest.raises(ConfigError, match=r"overlong_buffer \(200\) must not exceed .*max_new_tokens \(100\)"):
        load_config(None, ["method=dapo", "sampling.max_new_tokens=100", "reward.overlong_buffer=200"])


def test_dr_grpo_gets_a_constant_length_normaliser():
    cfg = load_config(None, ["method=dr_grpo", "sampling.max_new_tokens=77"])
    assert cfg.loss.agg == "seq-mean-token-sum-norm" and cfg.loss.norm_length == 77
    assert cfg.method_params["scale_by_std"] is False


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr'"):
        load_config(None, ["train.lrr=1"])
    path = tmp_path / "bad.yaml"
    path.write_text("loss:\n  agg: mean\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: loss\.agg"):
        load_config(path)


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"rollout\.group_size"):
        load_config(None, ["rollout.group_size=many"])


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'trpo'.*dapo.*grpo"):
        load_config(None, ["method=trpo"])


def test_bad_method_param_is_named():
    with pytest.raises(ConfigError, match=r"method_params\.scale_by_sd"):
        load_config(None, ["method_params.scale_by_sd=false"])


def test_malformed_yaml_and_missing_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.method in path.stem.replace("-", "_") or cfg.method in path.stem


def test_lab_grpo_yaml_is_the_default_run():
    shipped = load_config(Path(__file__).parents[1] / "configs" / "lab-grpo.yaml")
    assert shipped.model_dump() == load_config().model_dump()


def test_an_override_value_of_the_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"train.lr"):
        load_config(None, ["train.lr=:"])


@pytest.mark.parametrize(("raw", "value"), [
    ("0.5", 0.5), ("3e-5", "3e-5"), ("true", True),  # 3e-5 stays as written: pydantic reads a number setting from it
    ("null", None), ("[0.9, 0.99]", [0.9, 0.99]), ("-3", -3),
    ("Solve {question} # carefully", "Solve {question} # carefully"),  # not a YAML comment
    ("Q: {question}", "Q: {question}"),  # not a mapping
    ("{question} Answer=", "{question} Answer="),  # a template, not a flow mapping
    ("1:30", "1:30"),  # not YAML's base 60
    ("on", "on"),  # not YAML 1.1's true
])
def test_override_values_are_read_as_written(raw, value):
    assert parse_overrides([f"key={raw}"]) == {"key": value}
    assert math.isnan(parse_overrides(["key=.nan"])["key"])
    assert load_config(None, ["task.name=jsonl", "task.prompt_template=Solve {question} # carefully"]
                       ).task.prompt_template == "Solve {question} # carefully"


@pytest.mark.parametrize(("overrides", "ignored"), [
    (["task.name=gsm8k", "task.data_dir=/d", "task.train_path=/t.jsonl"], "task.train_path"),
    (["task.name=lab", "task.hub_name=gsm8k"], "task.hub_name"),
    (["task.name=math500", "task.eval_path=/e.jsonl", "task.question_field=q"], "task.question_field"),
])
def test_a_task_setting_the_task_does_not_read_is_an_error(overrides, ignored):
    with pytest.raises(ConfigError, match=f"unknown key '{ignored}'"):  # each task's section has its own keys
        load_config(None, overrides)
    load_config(None, ["task.name=math500", "task.eval_path=/e.jsonl", "task.train_path=/t.jsonl"])  # read


def test_a_number_given_to_a_text_setting_is_that_text():
    cfg = load_config(None, ["task.name=hub", "task.hub_name=2024", "model.name=123"])
    assert (cfg.task.hub_name, cfg.model.name) == ("2024", "123")
    for written in ("2024.10", "007", "1_000"):  # not 2024.1, 7.0, 1000.0
        assert load_config(None, ["task.name=hub", f"task.hub_name={written}"]).task.hub_name == written
    cfg = load_config(None, ["train.lr=3e-5", "train.steps=007", "loss.kl_coef=1E-4", "reward.correct=2",
                             "sampling.max_new_tokens=2.56e2", "method_params.eps=1e-4"])
    assert (cfg.train.lr, cfg.train.steps, cfg.loss.kl_coef, cfg.reward.correct) == (3e-5, 7, 1e-4, 2.0)
    assert load_config(None, ["train.steps=1e3"]).train.steps == 1000  # a whole number stays a number
    assert (cfg.sampling.max_new_tokens, cfg.method_params["eps"]) == (256, 1e-4)


def test_yaml_that_would_lose_settings_silently_is_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 5.0e-2\n  steps: 7\ntrain:\n  warmup_steps: 1\n")
    with pytest.raises(ConfigError, match=r"(?s)twice.yaml: not valid YAML: the key 'train' is given twice.*line 4"):
        load_config(twice)
    (tmp_path / "inner.yaml").write_text("train:\n  lr: 1.0e-3\n  lr: 5.0e-2\n")
    with pytest.raises(ConfigError, match="the key 'lr' is given twice"):
        load_config(tmp_path / "inner.yaml")
    (tmp_path / "merged.yaml").write_text("defaults: &d {temperature: 0.7, max_new_tokens: 32}\n"
                                          "sampling:\n  <<: *d\n  max_new_tokens: 64\n")
    with pytest.raises(ConfigError, match="unknown key 'defaults"):  # YAML merge keys still read (the anchor's
        load_config(tmp_path / "merged.yaml")  # own section is not a setting)
    (tmp_path / "merged.yaml").write_text("sampling:\n  <<: {temperature: 0.7, max_new_tokens: 32}\n"
                                          "  max_new_tokens: 64\n")
    merged = load_config(tmp_path / "merged.yaml").sampling
    assert (merged.temperature, merged.max_new_tokens) == (0.7, 64)  # an explicit key overrides a merged one
    (tmp_path / "value.yaml").write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"train: a section .* got 5"):
        load_config(tmp_path / "value.yaml", ["train.lr=2e-3"])  # the override must not hide the bad section
    (tmp_path / "latin1.yaml").write_bytes("method: grpo  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8"):
        load_config(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match=r"train.betas.0: Input should be less than 1"):
        load_config(None, ["train.betas=[2, 0.99]"])


def test_a_token_budget_is_refused_for_a_weight_that_ranks_the_minibatch():
    with pytest.raises(ConfigError, match=r"train\.max_tokens_per_microbatch: method 'high_entropy' ranks"):
        load_config(None, ["method=high_entropy", "train.max_tokens_per_microbatch=512"])
    assert load_config(None, ["method=grpo", "train.max_tokens_per_microbatch=512"]).train.max_tokens_per_microbatch
