"""A model name that loads nothing fails at once, saying what was probably meant, and never waits on the hub."""

import pytest
from typer.testing import CliRunner

import creditrl.policy.loading as loading
from creditrl.cli import app


def _refuse(*args, **kwargs):
    raise AssertionError("the Hugging Face hub was contacted")


@pytest.fixture()
def no_hub(monkeypatch):
    """transformers' loading (and so its downloads) fails the test if called."""
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", _refuse)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", _refuse)


def test_a_mistyped_run_folder_names_the_folder_meant(no_hub, tmp_path, monkeypatch):
    (tmp_path / "runs" / "lab-grpo-seed0" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for name, hint in [("runs/lab-grpo-seed0/fnal", "did you mean runs/lab-grpo-seed0/final?"),
                       ("runs/lab-grpo-sed0/final", "did you mean runs/lab-grpo-seed0/final?"),
                       ("./smollm", "did you mean the built-in model smollm2?"),
                       ("runs/zzz", f"{tmp_path / 'runs'} has no folder like 'zzz'")]:
        with pytest.raises(FileNotFoundError) as err:
            loading.load_model_and_tokenizer(name)
        assert str(err.value) == f"no such model folder: {name} — {hint}"


def test_a_hub_id_is_one_slash_between_names_and_no_local_namespace(tmp_path, monkeypatch):
    (tmp_path / "Qwen").mkdir()
    assert not any(loading.looks_like_path(name) for name in ("gpt2", "smollm", "Qwen/Qwen2.5-0.5B"))
    assert all(loading.looks_like_path(name) for name in ("runs/x", "a/b/c", "/abs", "org/", "./m", "~/m", "m.gguf"))
    monkeypatch.chdir(tmp_path)
    assert loading.looks_like_path("Qwen/Qwen2.5-0.5B")


def test_an_existing_folder_still_loads(tiny_lab_model_dir):
    model, tokenizer = loading.load_model_and_tokenizer(str(tiny_lab_model_dir))
    assert model.config.num_hidden_layers == 2 and tokenizer.padding_side == "left"


def test_eval_of_a_missing_folder_exits_2_at_once(no_hub, tmp_path):
    result = CliRunner().invoke(app, ["eval", "task.lab.eval_size=4", "task.lab.train_size=4",  # a quick task build
                                      "--model", str(tmp_path / "nope")])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and f"no such model folder: {tmp_path / 'nope'}" in out and "Traceback" not in out
