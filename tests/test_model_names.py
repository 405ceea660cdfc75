"""A model name that loads nothing fails at once, saying what was probably meant, and never waits on the hub."""

import pytest
from typer.testing import CliRunner

import creditrl.policy.loading as loading
from creditrl.cli import app


def _refuse(*args, **kwargs):
    raise AssertionError("the Hugging Face hub was contacted")


@pytest.fixture()
def no_hub(monkeypatch, tmp_path):
    """The probe and transformers' downloads fail the test if called; the hub cache is an empty folder."""
    monkeypatch.setattr(loading, "get_session", _refuse)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", _refuse)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", _refuse)
    monkeypatch.setattr(loading.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture()
def online(monkeypatch):
    """Offline mode off, whatever the environment running the tests sets."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(loading, "is_offline_mode", lambda: False)


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


def test_a_bare_typo_with_the_hub_unreachable_names_the_built_in(no_hub, online, monkeypatch):
    class Unreachable:
        def head(self, url, timeout):
            assert timeout <= 2
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(loading, "get_session", Unreachable)
    with pytest.raises(FileNotFoundError) as err:
        loading.load_model_and_tokenizer("smollm")
    assert str(err.value).startswith("no such model: smollm (not a built-in model — did you mean smollm2? — nor a "
                                     "local folder")
    assert "hub is unreachable: https://huggingface.co did not answer (Name or service not known)" in str(err.value)


def test_offline_mode_never_calls_the_hub_and_reads_only_its_cache(no_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"^no such model: org/model \(not a built-in model, .*HF_HUB_OFFLINE"):
        loading.load_model_and_tokenizer("org/model")
    (tmp_path / "hf-cache" / "models--org--model").mkdir(parents=True)
    asked = []

    def cached(source, **kwargs):
        asked.append((source, kwargs))
        raise OSError("stop here")

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", cached)
    with pytest.raises(OSError, match="stop here"):
        loading.load_model_and_tokenizer("org/model")
    assert asked == [("org/model", {"local_files_only": True})]


def test_an_existing_folder_still_loads_without_the_hub(tiny_lab_model_dir, monkeypatch):
    monkeypatch.setattr(loading, "get_session", _refuse)
    model, tokenizer = loading.load_model_and_tokenizer(str(tiny_lab_model_dir))
    assert model.config.num_hidden_layers == 2 and tokenizer.padding_side == "left"


def test_eval_of_a_missing_folder_exits_2_at_once(no_hub, tmp_path):
    result = CliRunner().invoke(app, ["eval", "task.lab.eval_size=4", "task.lab.train_size=4",  # a quick task build
                                      "--model", str(tmp_path / "nope")])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and f"no such model folder: {tmp_path / 'nope'}" in out and "Traceback" not in out
