"""Supervised pretraining of the lab model on traces with injected step errors.

Each training trace is a correct solution in which every step, with probability `error_rate`,
gets a wrong result, and the chain then continues from the wrong value.  The model thus learns
the format and most of the arithmetic but keeps an imperfect, *localised* error habit: the
starting point RL needs, with errors whose position the verifier knows exactly.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import Progress
from transformers import LlamaForCausalLM

from creditrl.evaluate import evaluate_accuracy
from creditrl.lab.model import new_lab_model
from creditrl.lab.tokenizer import build_char_tokenizer
from creditrl.policy.transformers_backend import TransformersPolicy
from creditrl.tasks.lab import Chain, LabTask, LabTaskConfig, apply, sample_chain


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1600, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    error_rate: float = Field(0.15, ge=0, le=1)
    seed: int = 0
    init_from: Path | None = Field(None, description="continue from this lab model folder instead of a fresh model")
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    eval_samples: int = Field(800, ge=1)
    task: LabTaskConfig = Field(default_factory=LabTaskConfig)


def noisy_solution(chain: Chain, rng: random.Random, error_rate: float) -> str:
    """The chain's solution with each step's result moved by ±1..10 with probability `error_rate`,
    clipped at 0 (so a result already 0 moved down stays right: 1.5% of moves at error_rate 1; the
    bundled checkpoint was trained on exactly this data, so it is kept)."""
    value, lines = chain.start, []
    for op, x in chain.ops:
        result = apply(value, op, x)
        if rng.random() < error_rate:
            result = max(0, result + rng.choice([-1, 1]) * rng.randint(1, 10))
        lines.append(f"{value}{op}{x}={result}")
        value = result
    return "\n".join(lines + [f"Answer: {value}"])


def pretrain(cfg: PretrainConfig, out_dir: Path, show_progress: bool = True) -> dict:
    """Train a fresh lab model; save model, tokenizer and a `pretrain.json` summary to out_dir."""
    tok = build_char_tokenizer()
    model = LlamaForCausalLM.from_pretrained(cfg.init_from) if cfg.init_from else new_lab_model(seed=cfg.seed)
    task = LabTask(cfg.task)
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    policy = TransformersPolicy(model, tok)
    history, start = [], time.time()
    model.train()
    with Progress(disable=not show_progress) as progress:
        bar = progress.add_task("pretraining lab model", total=cfg.steps)
        for step in range(cfg.steps):
            ids, labels = _batch(task, tok, rng, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            progress.update(bar, advance=1, description=f"pretraining lab model  loss {loss.item():.3f}")
            last = step + 1 == cfg.steps
            if last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                model.eval()
                acc = evaluate_accuracy(policy, task, cfg.eval_samples, seed=cfg.seed)
                model.train()
                history.append({"step": step + 1, "seconds": round(time.time() - start, 1), "loss": loss.item(), **acc})
                progress.console.print(history[-1])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    summary = {"config": cfg.model_dump(mode="json"), "history": history,
               "parameters": sum(p.numel() for p in model.parameters())}
    (out_dir / "pretrain.json").write_text(json.dumps(summary, indent=2))
    return summary


def _batch(task: LabTask, tok, rng: random.Random, cfg: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+trace ids and labels that score the response (and its <eos>) only."""
    rows, labels = [], []
    for _ in range(cfg.batch_size):
        chain = sample_chain(rng, task.cfg)
        while chain.question() in task.held_out:
            chain = sample_chain(rng, task.cfg)
        prompt = tok(chain.question() + "\n", add_special_tokens=False)["input_ids"]
        response = tok(noisy_solution(chain, rng, cfg.error_rate), add_special_tokens=False)["input_ids"]
        response.append(tok.eos_token_id)
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    for i, (row, row_labels) in enumerate(zip(rows, labels)):
        ids[i, : len(row)] = torch.tensor(row)
        lab[i, : len(row_labels)] = torch.tensor(row_labels)
    return ids, lab
