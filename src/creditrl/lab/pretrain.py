"""Supervised pretraining of a generated task's tiny model on traces with injected step errors.

Each training trace is the task's `noisy_solution`: a correct solution in which every step, with
probability `error_rate`, is replaced by a plausible wrong one, the solution continuing from it.
The model thus learns the format and most of the steps but keeps an imperfect, *localised* error
habit: the starting point RL needs, with errors whose position the verifier knows exactly.  The
character tokenizer holds the task's alphabet; the lab is the default task.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator
from rich.progress import Progress
from transformers import LlamaForCausalLM

from creditrl.config import LabSection, TaskConfig, task_config
from creditrl.evaluate import evaluate_accuracy
from creditrl.lab.model import new_lab_model
from creditrl.lab.tokenizer import build_char_tokenizer
from creditrl.policy.transformers_backend import TransformersPolicy
from creditrl.tasks.base import GeneratedTask, Problem
from creditrl.tasks.registry import build_task


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1600, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    error_rate: float = Field(0.15, ge=0, le=1)
    seed: int = 0
    init_from: Path | None = Field(None, description="continue from this model folder instead of a fresh model")
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    eval_samples: int = Field(800, ge=1)
    max_new_tokens: int = Field(96, ge=1, description="the evaluations' response length limit")
    task: SerializeAsAny[TaskConfig] = Field(default_factory=LabSection,
                                             description="the generated task's section (task.name picks it)")

    @field_validator("task", mode="before")
    @classmethod
    def _task_by_name(cls, value: Any) -> Any:
        """A mapping becomes the section model of the task it names (lab when it names none)."""
        return task_config(**value) if isinstance(value, dict) else value


def generated_task(section: TaskConfig) -> GeneratedTask:
    """The task a section names, checked to be a generated one (a noisy solution and an alphabet)."""
    task = build_task(section)
    if not (hasattr(task, "noisy_solution") and hasattr(task, "alphabet")):
        raise ValueError(f"task.name: {section.name!r} is not a generated task (it has no noisy_solution and "
                         "alphabet), so no model can be pretrained on it")
    return task


def problem_stream(task: GeneratedTask) -> Callable[[random.Random], Problem]:
    """`draw(rng) -> Problem`: the task's fresh problems (`draw_problem`) when it has them, else uniform draws
    from its train split."""
    if hasattr(task, "draw_problem"):
        return task.draw_problem
    train = task.train_problems()
    return lambda rng: rng.choice(train)


def pretrain(cfg: PretrainConfig, out_dir: Path, show_progress: bool = True) -> dict:
    """Train a fresh model on the task; save model, tokenizer and a `pretrain.json` summary to out_dir."""
    task = generated_task(cfg.task)
    tok = build_char_tokenizer(task.alphabet)
    model = LlamaForCausalLM.from_pretrained(cfg.init_from) if cfg.init_from else \
        new_lab_model(seed=cfg.seed, vocab_size=len(tok))
    rng = random.Random(cfg.seed)
    draw = problem_stream(task)
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
        bar = progress.add_task(f"pretraining {task.name} model", total=cfg.steps)
        for step in range(cfg.steps):
            ids, labels = _batch(task, draw, tok, rng, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            progress.update(bar, advance=1, description=f"pretraining {task.name} model  loss {loss.item():.3f}")
            last = step + 1 == cfg.steps
            if last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                model.eval()
                acc = evaluate_accuracy(policy, task, cfg.eval_samples, cfg.seed, cfg.max_new_tokens)
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


def _batch(task: GeneratedTask, draw: Callable[[random.Random], Problem], tok, rng: random.Random,
           cfg: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+trace ids and labels that score the response (and its <eos>) only; each row draws
    its problem, then its noisy solution, from `rng`."""
    rows, labels = [], []
    for _ in range(cfg.batch_size):
        problem = draw(rng)
        prompt = tok(problem.prompt + "\n", add_special_tokens=False)["input_ids"]
        response = tok(task.noisy_solution(problem, rng, cfg.error_rate), add_special_tokens=False)["input_ids"]
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
