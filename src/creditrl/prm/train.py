"""Train a `StepClassifier` PRM on labelled steps, and measure it on held-out problems.

Data: either the policy samples G responses to each of N lab problems and the verifier labels
every step (1 right, 0 wrong), or PRM800K solutions (`examples_to_rollouts`).  Whole problems
(groups) are held out, so no held-out prompt is trained on.
Loss: binary cross-entropy of P(step correct) on every labelled step.
Held-out metrics: step accuracy (P ≥ ½ counts as "right") and step AUC (rank AUC of the scores).
"""

from __future__ import annotations

import copy

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn import functional as F

from creditrl.collect import collect_rollouts
from creditrl.credit_metrics import rank_auc
from creditrl.policy.transformers_backend import SamplingConfig, TransformersPolicy
from creditrl.prm.model import StepClassifier
from creditrl.prm.prm800k import StepExample
from creditrl.rewards import RewardConfig
from creditrl.rollouts import Rollouts, pad_right
from creditrl.tasks.base import Task


class PRMTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    problems: int = Field(64, ge=2, description="lab problems sampled for labelled responses")
    group_size: int = Field(4, ge=1, description="responses per problem")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    heldout: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of problems held out")
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-4, gt=0.0)
    seed: int = 0


def lab_step_data(policy: TransformersPolicy, task: Task, cfg: PRMTrainConfig) -> Rollouts:
    """Sampled responses with verifier step labels (B, S) for the first `cfg.problems` training problems."""
    sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    problems = task.train_problems()[: cfg.problems]
    return collect_rollouts(policy, task, problems, cfg.group_size, sampling, RewardConfig(), seed=cfg.seed)


def examples_to_rollouts(examples: list[StepExample], tokenizer) -> Rollouts:
    """Labelled text solutions as a batch the classifier reads: prompt = problem + "\n", response =
    Σ (step + "\n") encoded piece by piece, so each step's tokens are known; one group per problem."""
    prompts, responses, steps, labels, groups = [], [], [], [], {}
    for example in examples:
        prompts.append(torch.tensor(tokenizer.encode(example.problem + "\n", add_special_tokens=False)))
        ids, step_of = [], []
        for j, text in enumerate(example.steps):
            piece = tokenizer.encode(text.strip() + "\n", add_special_tokens=False)
            ids += piece
            step_of += [j] * len(piece)
        responses.append(torch.tensor(ids, dtype=torch.long))
        steps.append(torch.tensor(step_of, dtype=torch.long))
        labels.append(torch.tensor(example.labels, dtype=torch.long))
        groups.setdefault(example.problem, len(groups))
    response_ids = pad_right(responses, tokenizer.pad_token_id or 0)
    width = max(len(p) for p in prompts)
    prompt_ids = torch.stack([torch.cat([p.new_full((width - len(p),), tokenizer.pad_token_id or 0), p])
                              for p in prompts])
    prompt_mask = torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]
    n = len(examples)
    return Rollouts(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                    response_mask=(torch.arange(response_ids.shape[1])[None, :]
                                   < torch.tensor([len(r) for r in responses])[:, None]),
                    group_ids=torch.tensor([groups[e.problem] for e in examples]),
                    step_ids=pad_right(steps, -1, width=response_ids.shape[1]),
                    rewards=torch.zeros(n), correct=torch.zeros(n, dtype=torch.bool),
                    truncated=torch.zeros(n, dtype=torch.bool),
                    step_labels=pad_right(labels, -1))


def split_groups(rollouts: Rollouts, heldout: float, seed: int) -> tuple[Rollouts, Rollouts]:
    """(train, held-out) rows; a seeded `heldout` fraction of the groups is held out, at least one
    and at most all but one (so both sides have a problem)."""
    groups = torch.unique(rollouts.group_ids)
    if len(groups) < 2:
        raise ValueError(f"a PRM needs at least 2 problems to train on one and evaluate on another, got {len(groups)}")
    order = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))]
    held = order[: min(max(1, round(heldout * len(groups))), len(groups) - 1)]
    is_held = torch.isin(rollouts.group_ids, held)
    return rollouts.select((~is_held).nonzero().squeeze(1)), rollouts.select(is_held.nonzero().squeeze(1))


def _labelled(model: StepClassifier, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and float labels of the labelled steps, flattened."""
    labels = rollouts.step_labels
    logits = model.step_logits(rollouts, labels.shape[1])
    keep = (labels >= 0) & ~torch.isnan(logits)
    return logits[keep], labels[keep].float()


def train_classifier(model: StepClassifier, rollouts: Rollouts, cfg: PRMTrainConfig) -> list[float]:
    """AdamW on the step BCE over `cfg.epochs` shuffled passes; the mean loss of each epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    history = []
    for _ in range(cfg.epochs):
        losses = []
        for rows in torch.randperm(rollouts.batch_size, generator=generator).split(cfg.batch_size):
            logits, labels = _labelled(model, rollouts.select(rows))
            if labels.numel() == 0:
                continue
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append(sum(losses) / max(len(losses), 1))
    return history


@torch.no_grad()
def step_metrics(model: StepClassifier, rollouts: Rollouts) -> dict[str, float]:
    """Held-out `step_accuracy`, `step_auc` and the number of labelled `steps`."""
    model.eval()
    logits, labels = _labelled(model, rollouts)
    probs = torch.sigmoid(logits)
    accuracy = ((probs >= 0.5).float() == labels).float().mean().item() if labels.numel() else float("nan")
    auc = rank_auc(probs[labels == 1].tolist(), probs[labels == 0].tolist())
    return {"step_accuracy": accuracy, "step_auc": auc, "steps": float(labels.numel())}


def train_prm(backbone, data: Rollouts, cfg: PRMTrainConfig) -> tuple[StepClassifier, dict]:
    """A PRM initialised from a copy of the LM `backbone`, trained on `data`'s step labels; (model, report)."""
    train, held = split_groups(data, cfg.heldout, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = StepClassifier(copy.deepcopy(backbone))
    before = step_metrics(model, held)
    losses = train_classifier(model, train, cfg)
    report = {"train_responses": train.batch_size, "heldout_responses": held.batch_size, "epoch_losses": losses,
              "before": before, "after": step_metrics(model, held)}
    return model, report


def train_lab_prm(policy: TransformersPolicy, task: Task, cfg: PRMTrainConfig) -> tuple[StepClassifier, dict]:
    """A PRM trained on the lab verifier's labels of the policy's own samples."""
    return train_prm(policy.model, lab_step_data(policy, task, cfg), cfg)
