"""A PRM trained here: a causal LM with a classification head read at each step's last token.

    h = last hidden layer of the LM over [prompt; response]            (B, Tp + T, D)
    logit_bj = w · h[b, e_bj] + c,   e_bj = last response token of step j  (B, S)
    P(step j correct) = σ(logit_bj)

It reads a rollout's own token ids and step spans (`step_ids`), so it must share the policy's
tokenizer (the lab model's, for the lab task).  Saved as a folder: the LM (`save_pretrained`),
its tokenizer, and the head in `prm_head.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from creditrl.rollouts import Rollouts

HEAD_FILE = "prm_head.safetensors"


def step_end_positions(step_ids: Tensor, n_steps: int) -> Tensor:
    """(B, T) token -> step index -> (B, S) index of each step's last token, −1 where absent."""
    positions = torch.arange(step_ids.shape[1], device=step_ids.device)[None, :, None]
    match = step_ids[:, :, None] == torch.arange(n_steps, device=step_ids.device)[None, None, :]
    return torch.where(match, positions, -1).max(dim=1).values


class StepClassifier(nn.Module):
    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)

    def step_logits(self, rollouts: Rollouts, n_steps: int) -> Tensor:
        """(B, S = n_steps) logits of P(step correct), NaN where a response has no step j."""
        input_ids = torch.cat([rollouts.prompt_ids, rollouts.response_ids], dim=1)
        mask = torch.cat([rollouts.prompt_mask, rollouts.response_mask], dim=1).long()
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                            output_hidden_states=True, use_cache=False, logits_to_keep=1)
        hidden = out.hidden_states[-1][:, rollouts.prompt_ids.shape[1]:]  # (B, T, D)
        ends = step_end_positions(rollouts.step_ids, n_steps)
        picked = hidden.gather(1, ends.clamp(min=0)[:, :, None].expand(-1, -1, hidden.shape[-1]))
        logits = self.head(picked).squeeze(-1)
        return torch.where(ends >= 0, logits, torch.nan)

    def save(self, folder: Path | str, tokenizer) -> None:
        folder = Path(folder)
        self.backbone.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(folder / HEAD_FILE))

    @classmethod
    def load(cls, folder: Path | str, dtype: torch.dtype = torch.float32) -> tuple[StepClassifier, object]:
        """(classifier, tokenizer) from a folder written by `save`, its weights in `dtype`."""
        folder = Path(folder)
        if not (folder / HEAD_FILE).exists():
            raise FileNotFoundError(f"{folder} holds no trained PRM ({HEAD_FILE} is missing); "
                                    "train one with `creditrl prm train`")
        model = cls(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype))
        model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        return model.to(dtype).eval(), AutoTokenizer.from_pretrained(folder)


class TrainedPRM:
    """The trainer resource for a `StepClassifier`: step scores σ(logits), one forward per response."""

    def __init__(self, folder: Path | str, batch_size: int = 32, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.model, self.tokenizer = StepClassifier.load(folder, dtype)
        self.model.to(device).requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.reset(0)

    def reset(self, seed: int) -> None:
        self.forward_passes = 0

    @torch.no_grad()
    def score_steps(self, rollouts: Rollouts) -> Tensor:
        """(B, S) P(step correct), S = the most steps in any response; NaN where absent."""
        n_steps = max(int(rollouts.num_steps.max()), 1) if rollouts.batch_size else 1
        rows = torch.arange(rollouts.batch_size).split(self.batch_size)
        scores = [torch.sigmoid(self.model.step_logits(rollouts.select(r).to(self.device), n_steps).float()).cpu()
                  for r in rows]
        self.forward_passes += rollouts.batch_size
        return torch.cat(scores) if scores else torch.empty(0, n_steps)

    def metrics(self) -> dict[str, float]:
        return {"prm_forward_passes": float(self.forward_passes)}
