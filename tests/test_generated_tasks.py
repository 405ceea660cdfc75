"""What every generated task shares: its bundled model as the default, a tokenizer from its alphabet, and
pretraining on its noisy solutions (the lab being the default, unchanged)."""

import json
import random
from typing import Literal

import pytest

from creditrl.config import TaskConfig
from creditrl.configure import load_config
from creditrl.lab.model import bundled_model_dir
from creditrl.lab.pretrain import PretrainConfig, _batch, problem_stream
from creditrl.lab.tokenizer import build_char_tokenizer
from creditrl.tasks import TASK_BUILDERS, LabTask, register_task
from creditrl.tasks.base import Problem
from creditrl.tasks.lab import LabTaskConfig, noisy_chain_solution, sample_chain


def test_the_lab_tokenizer_is_the_bundled_models():
    bundled = json.loads((bundled_model_dir("lab") / "tokenizer.json").read_text())["model"]["vocab"]
    assert build_char_tokenizer(LabTask.alphabet).get_vocab() == bundled == build_char_tokenizer().get_vocab()


def test_an_alphabet_gives_one_token_per_distinct_character_after_the_special_ones():
    tok = build_char_tokenizer("ab\nba")
    assert tok.get_vocab() == {"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3, "b": 4, "\n": 5}
    assert tok.decode(tok("ab\nb", add_special_tokens=False)["input_ids"]) == "ab\nb"


def test_lab_pretraining_draws_a_chain_then_its_noisy_solution_per_row():
    """The stream the bundled lab model was trained on, written out: each row samples a chain outside the
    held-out set, then its noisy solution, from the one generator."""
    task = LabTask(LabTaskConfig(train_size=10, eval_size=50))
    cfg = PretrainConfig(batch_size=5, error_rate=0.5)
    tok = build_char_tokenizer()
    ids, labels = _batch(task, problem_stream(task), tok, random.Random(3), cfg)
    rng, expected = random.Random(3), []
    for _ in range(5):
        chain = sample_chain(rng, task.cfg)
        while chain.question() in task.held_out:
            chain = sample_chain(rng, task.cfg)
        expected.append((chain.question() + "\n", noisy_chain_solution(chain, rng, 0.5)))
    for row, row_labels, (prompt, response) in zip(ids, labels, expected):
        n = len(prompt) + len(response) + 1
        assert tok.decode(row[:n]) == prompt + response + "<eos>"
        assert (row[n:] == tok.pad_token_id).all()
        assert (row_labels[:len(prompt)] == -100).all() and (row_labels[len(prompt):n] == row[len(prompt):n]).all()


def test_lab_problems_carry_their_step_count_as_difficulty():
    assert all(p.meta["difficulty"] == p.meta["steps"] == p.prompt.count(".") - 1
               for p in LabTask(LabTaskConfig(train_size=5, eval_size=5)).eval_problems())


class _Split:
    def train_problems(self):
        return [Problem(str(i), f"q{i}", "a") for i in range(3)]


def test_a_task_without_draw_problem_is_pretrained_on_uniform_draws_from_its_train_split():
    draw, rng, reference = problem_stream(_Split()), random.Random(0), random.Random(0)
    assert [draw(rng).id for _ in range(20)] == [str(reference.randrange(3)) for _ in range(20)]


class _BundledSection(TaskConfig):
    name: Literal["bundled_toy"] = "bundled_toy"


@pytest.fixture()
def bundled_toy():
    register_task("bundled_toy", config=_BundledSection, bundled_model="toy")(lambda cfg: LabTask())
    yield
    from creditrl.config.tasks import BUNDLED_MODELS, TASK_SECTIONS

    TASK_SECTIONS.pop("bundled_toy")
    BUNDLED_MODELS.pop("bundled_toy")
    TASK_BUILDERS.pop("bundled_toy")


def test_model_name_defaults_to_the_tasks_bundled_model(bundled_toy):
    assert load_config(None, ["task.name=bundled_toy"]).model.name == "toy"
    assert load_config(None, ["task.name=bundled_toy", "model.name=lab"]).model.name == "lab"  # explicit wins
    assert load_config(None, []).model.name == "lab"
    assert load_config(None, ["task.name=gsm8k"]).model.name == "lab"  # a task without a bundled model


def test_a_missing_bundled_model_says_how_to_rebuild_it(bundled_toy):
    from creditrl.policy.loading import load_model_and_tokenizer

    with pytest.raises(FileNotFoundError, match="creditrl lab pretrain task.name=toy"):
        load_model_and_tokenizer("toy")


def test_pretraining_a_task_that_is_not_generated_names_the_field(tmp_path):
    from creditrl.lab.pretrain import pretrain

    (tmp_path / "test.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    with pytest.raises(ValueError, match="task.name: 'jsonl' is not a generated task"):
        pretrain(PretrainConfig(task={"name": "jsonl", "eval_path": str(tmp_path / "test.jsonl")}), tmp_path)
