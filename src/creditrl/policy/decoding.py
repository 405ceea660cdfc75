"""Sampling over the KV cache: each prompt prefilled once, finished rows dropped as they end.

`model.generate` prefills every copy of a prompt, and keeps decoding a row after it has ended
until the longest row of the batch stops.  In RL both are waste: a group of n samples shares
one prompt, and response lengths vary widely.  `sample_with_cache` prefills the distinct prompts,
copies their cache n times (`DynamicCache.batch_repeat_interleave`), and after each step keeps
only the rows still running (`batch_select_indices`).  It also returns the log-prob of every
sampled token under the temperature-scaled distribution, the number `policy.score` computes.

Top-p follows Holtzman et al. (2020): keep the smallest set of most likely tokens whose
probability reaches p (at least one token), renormalise, sample (by inverse CDF).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer


@dataclass
class Decoded:
    """Sampled tokens of each row (prompt-major: prompt 0's n rows first), their log-probs and the
    entropy of the distribution each was drawn from."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    entropies: list[list[float]]
    ended: list[bool]  # the row stopped on an end token or a stop check, not on the length limit


@torch.no_grad()
def sample_with_cache(model: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor, n: int, max_new_tokens: int,
                      temperature: float, top_p: float, end_ids: list[int],
                      stopped: Callable[[int, list[int]], bool] | None = None) -> Decoded:
    """n samples for each left-padded prompt (P, L); `stopped(row, tokens)` may end a row early.

    Temperature 0 is greedy decoding.  Every step draws one uniform for every row of the batch,
    finished or not, from torch's global generator: a row's sample depends on the caller's
    `torch.manual_seed` and its own place, not on when the other rows ended.
    """
    cache = DynamicCache(config=model.config)
    longest = prompt_ids.shape[1] + max_new_tokens  # the cache never holds more
    cache.layers = [GrowingLayer(longest) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    cache_arg = {_cache_argument(model): cache}
    mask = prompt_mask.long()
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, **cache_arg,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, mask = logits.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
    rows = prompt_ids.shape[0] * n
    next_position = mask.sum(dim=1, keepdim=True)
    running = torch.arange(rows)  # which output row each cache row belongs to
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    entropies: list[list[float]] = [[] for _ in range(rows)]
    ended = [False] * rows
    end = torch.tensor(end_ids, dtype=torch.long, device=prompt_ids.device)
    for step in range(max_new_tokens):
        uniforms = torch.rand(rows, dtype=torch.float64)[running].to(logits.device)  # one per row and step
        token, logprob, entropy = _draw(logits.float(), temperature, top_p, uniforms)
        is_end = torch.isin(token, end)
        keep: list[int] = []
        for i, (row, tok, lp, h, stop) in enumerate(zip(running.tolist(), token.tolist(), logprob.tolist(),
                                                        entropy.tolist(), is_end.tolist())):
            tokens[row].append(tok)
            logprobs[row].append(lp)
            entropies[row].append(h)
            if stop or (stopped is not None and stopped(row, tokens[row])):
                ended[row] = True
            else:
                keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(running):
            index = torch.tensor(keep, device=prompt_ids.device)
            cache.batch_select_indices(index)
            running, token, mask, next_position = running[keep], token[index], mask[index], next_position[index]
        mask = torch.cat([mask, mask.new_ones(len(running), 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                       **cache_arg, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    return Decoded(tokens, logprobs, entropies, ended)


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that appends in place into spare capacity.

    `DynamicLayer` concatenates on every token, copying the whole cache each step (O(T²) traffic
    over a response); here the buffer doubles when full, up to `max_length` positions, and
    keys/values are views of its filled part.
    """

    def __init__(self, max_length: int | None = None):
        super().__init__()
        self.max_length = max_length

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.device, self.is_initialized, self.length = key_states.device, True, 0
            self._keys = self._values = None
        new = key_states.shape[-2]
        if self._keys is None or self.length + new > self._keys.shape[-2]:
            doubled = max(2 * self.length, 16)
            capacity = max(self.length + new, min(doubled, self.max_length or doubled))
            self._keys = _grown(self._keys, key_states, self.length, capacity)
            self._values = _grown(self._values, value_states, self.length, capacity)
        self._keys[..., self.length:self.length + new, :] = key_states
        self._values[..., self.length:self.length + new, :] = value_states
        self.length += new
        self.keys, self.values = self._keys[..., :self.length, :], self._values[..., :self.length, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.keys, self.values = self._keys[..., :self.length, :], self._values[..., :self.length, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self._keys[..., :self.length, :], self._values[..., :self.length, :]


def _grown(buffer: Tensor | None, like: Tensor, length: int, capacity: int) -> Tensor:
    shape = (*like.shape[:-2], capacity, like.shape[-1])
    grown = like.new_empty(shape)
    if buffer is not None:
        grown[..., :length, :] = buffer[..., :length, :]
    return grown


def _cache_argument(model: PreTrainedModel) -> str:
    """The forward's name for the KV cache: `cache` in recent transformers, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _draw(logits: Tensor, temperature: float, top_p: float, uniforms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One token per row, its log-prob under p = softmax(logits / temperature) and the entropy
    H(p) = −Σ p log p; `uniforms` (B,) in [0, 1).  Temperature 0 takes the argmax and reports
    log-prob and entropy at temperature 1 (as scoring does); top-p truncates the draw, not p."""
    log_p = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
    probs = log_p.exp()
    entropy = torch.special.entr(probs).sum(-1)
    if temperature == 0.0:
        token = logits.argmax(dim=-1)
        return token, log_p.gather(-1, token[:, None]).squeeze(1), entropy
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    token = _inverse_cdf(probs, uniforms)
    return token, log_p.gather(-1, token[:, None]).squeeze(1), entropy


def _inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Per row of unnormalised probabilities (B, V), the first token whose cumulative mass exceeds
    u · total.  One uniform per row; `torch.multinomial` draws an exponential for every
    vocabulary entry, which dominates a decode step for large vocabularies on a CPU."""
    cdf = probs.double().cumsum(dim=-1)
    target = uniforms.to(torch.float64)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)
