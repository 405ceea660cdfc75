"""The policy backend over transformers: batched sampling and per-token log-probs.

Prompts are left-padded, responses right-padded; position ids come from the attention mask,
so a row's numbers do not depend on what else is in its batch (tests check batched = unbatched).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from creditrl.methods.loss import token_entropy
from creditrl.rollouts import pad_right


class SamplingConfig(BaseModel):
    """How responses are sampled (temperature 0 means greedy)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    stop: list[str] = Field(default_factory=list, description="stop strings (kept in the response)")
    batch_size: int = Field(256, ge=1, description="sequences per generate call")


@dataclass
class Generation:
    """Sampled responses, row-aligned with the prompts they continue (prompt-major)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    truncated: list[bool]


@dataclass
class TokenScores:
    """Per-token outputs of one forward over prompt+response (response positions only)."""

    logprobs: Tensor  # (B, T)
    entropy: Tensor | None = None  # (B, T)
    hidden_states: Tensor | None = None  # (B, T, D), last decoder layer before the final norm


class TransformersPolicy:
    """A causal LM and its tokenizer, with the two operations RL needs."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = False,
                 autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self.autocast_dtype = autocast_dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- prompts ---------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt: the chat template for chat models, else the text and a newline."""
        if self.use_chat_template:
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                           add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        return self.tokenizer(text + "\n", add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], n: int, cfg: SamplingConfig, seed: int) -> Generation:
        """n responses per prompt, rows prompt-major (prompt 0's n samples first)."""
        rows = [ids for ids in prompt_ids for _ in range(n)]
        torch.manual_seed(seed)
        responses: list[list[int]] = []
        truncated: list[bool] = []
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(rows), cfg.batch_size):
            chunk = rows[start:start + cfg.batch_size]
            out_ids, out_trunc = self._generate(chunk, cfg)
            responses += out_ids
            truncated += out_trunc
        self.model.train(was_training)
        return Generation(rows, responses, truncated)

    def _generate(self, rows: list[list[int]], cfg: SamplingConfig) -> tuple[list[list[int]], list[bool]]:
        ids, mask = left_pad(rows, self.pad_id, self.device)
        greedy = cfg.temperature == 0.0
        gen_cfg = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else cfg.temperature,
            top_p=None if greedy else cfg.top_p, top_k=None, max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, stop_strings=cfg.stop or None,
        )
        with self._autocast():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                      tokenizer=self.tokenizer if cfg.stop else None)
        new = out[:, ids.shape[1]:].tolist()
        responses, truncated = [], []
        for row in new:
            cut = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), None)
            if cut is None and cfg.stop:
                cut = _stop_string_end(self.tokenizer, row, cfg.stop)
            responses.append(row[:cut] if cut is not None else row)
            truncated.append(cut is None and len(row) >= cfg.max_new_tokens)
        return responses, truncated

    # ---- scoring ---------------------------------------------------------------------------
    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
              temperature: float = 1.0, with_entropy: bool = False, with_hidden: bool = False,
              entropy_grad: bool = False) -> TokenScores:
        """log π(response token | prefix) for every response position, in one forward.

        Gradients flow when called outside `torch.no_grad()` (the update uses it that way); the
        entropy carries them only with `entropy_grad` (an entropy bonus), else it is a logged
        number whose vocabulary-sized intermediates need not be kept for the backward pass.
        Logits are divided by the sampling temperature, so log-probs match the sampling policy.
        """
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)
        mask = torch.cat([prompt_mask, response_mask], dim=1).long()
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        tp, t = prompt_ids.shape[1], response_ids.shape[1]
        with self._capture_last_layer(with_hidden) as captured, self._autocast():
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                use_cache=False, logits_to_keep=t + 1).logits
        logits = logits[:, :-1].float()  # position tp-1+k predicts response token k
        if temperature > 0 and temperature != 1.0:
            logits = logits / temperature
        log_z = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) - log_z
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            entropy = token_entropy(logits) if with_entropy else None
        hidden = captured[0][:, tp - 1: tp - 1 + t] if with_hidden else None
        return TokenScores(logprobs, entropy, hidden)

    @contextmanager
    def _capture_last_layer(self, enabled: bool):
        captured: list[Tensor] = []
        if not enabled:
            yield captured
            return
        layer = self.model.get_decoder().layers[-1]
        handle = layer.register_forward_hook(
            lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).detach()))
        try:
            yield captured
        finally:
            handle.remove()


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
    ids = pad_right(tensors, pad_id)
    mask = pad_right([torch.ones(len(r), dtype=torch.bool) for r in rows], False)
    return ids.to(device), mask.to(device)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _stop_string_end(tokenizer: PreTrainedTokenizerBase, row: list[int], stops: list[str]) -> int | None:
    """Number of tokens up to and including the first token that completes a stop string."""
    text = ""
    for i, tok in enumerate(row):
        text = tokenizer.decode(row[: i + 1], skip_special_tokens=True)
        if any(s in text for s in stops):
            return i + 1
    return None
