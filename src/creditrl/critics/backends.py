"""Critic backends: a frozen LLM that writes k critiques of each prompt (CAPO, methods.md §5).

A backend never stops training: a critique it could not get is None (counted in
`stats.failures`).  `TransformersCritic` samples a local model through the policy backend;
`OpenAICompatibleCritic` calls any OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang,
hosted APIs) with the standard library only.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol, Sequence

from creditrl.config import CriticConfig, SamplingConfig
from creditrl.jsonl import append_jsonl, read_jsonl
from creditrl.policy.loading import load_policy

log = logging.getLogger(__name__)


@dataclass
class CriticStats:
    """What critiquing cost since the last `reset`; `metrics()` names them `critic_<field>`.

    calls: critiques asked for (prompts × k); cache_hits, failures: of those, served from the
    cache, and lost (None); unparsed: returned but without a verdict; no_verdict: responses none
    of whose critiques gave a verdict; requests: HTTP requests (retries included) or generate
    calls sent; seconds: wall time.  The backend counts calls..requests, `StepCritic` the parsing.
    """

    calls: int = 0
    cache_hits: int = 0
    failures: int = 0
    unparsed: int = 0
    no_verdict: int = 0
    requests: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def metrics(self) -> dict[str, float]:
        return {f"critic_{f.name}": float(getattr(self, f.name)) for f in fields(self)}


class Critic(Protocol):
    """k critique texts for each prompt (None where one could not be had), and their cost."""

    stats: CriticStats

    def critique(self, prompts: Sequence[str], k: int, seed: int) -> list[list[str | None]]: ...


class TransformersCritic:
    """A local causal LM, frozen, sampled with the project's policy backend (`load_policy(model)`).

    The prompt goes through the tokenizer's chat template when it has one.  A prompt too long for
    the model's context (`max_position_embeddings`) with `max_tokens` of critique after it gets no
    critiques (None, counted as failures) instead of positions the model never saw.  A local model
    that fails raises (that is a bug, not a flaky endpoint).  The bundled 'lab' model cannot
    critique: with it this backend only proves the plumbing.
    """

    def __init__(self, model: str = "lab", temperature: float = 0.7, max_tokens: int = 1024, batch_size: int = 64):
        self.policy = load_policy(model)
        self.policy.model.eval().requires_grad_(False)
        self.context = getattr(self.policy.model.config, "max_position_embeddings", None)
        if self.context is not None and max_tokens >= self.context:
            raise ValueError(f"critic.max_tokens {max_tokens} leaves no room for a prompt in the critic model's "
                             f"context of {self.context} positions ({model!r})")
        self.sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_tokens, batch_size=batch_size)
        self.stats = CriticStats()

    def critique(self, prompts: Sequence[str], k: int, seed: int) -> list[list[str | None]]:
        start = time.perf_counter()
        encoded = [self.policy.encode_prompt(p) for p in prompts]
        room = None if self.context is None else self.context - self.sampling.max_new_tokens
        fits = [i for i, ids in enumerate(encoded) if room is None or len(ids) <= room]
        gen = self.policy.sample([encoded[i] for i in fits], k, self.sampling, seed=seed)
        texts: list[list[str | None]] = [[None] * k for _ in prompts]
        for j, i in enumerate(fits):
            texts[i] = [self.policy.decode(ids) for ids in gen.response_ids[j * k:(j + 1) * k]]
        if len(fits) < len(prompts):
            log.warning("critic: %d of %d prompts are longer than the %d positions that %d critique tokens leave in "
                        "the model's context: no critiques for them", len(prompts) - len(fits), len(prompts), room,
                        self.sampling.max_new_tokens)
        self.stats.calls += len(prompts) * k
        self.stats.failures += (len(prompts) - len(fits)) * k
        self.stats.requests += math.ceil(len(fits) * k / self.sampling.batch_size)
        self.stats.seconds += time.perf_counter() - start
        return texts


class OpenAICompatibleCritic:
    """Critiques from an OpenAI-compatible chat-completions endpoint, `{base_url}/chat/completions`.

    Each of the k critiques of a prompt is its own request (sample index i), so each is cached
    and fails alone.  The cache key is sha256 of (model, prompt, i, temperature, max_tokens): a rerun, or a
    prompt seen again, reuses the critique instead of paying for it; with `cache_path` the cache
    is also a jsonl file (key and text per line) read at start and appended to.  The endpoint's
    sampling is not seeded (the cache is what makes reruns reproducible), so `seed` is unused.
    A request is retried up to `max_retries` times, after backoff_s, 2·backoff_s, 4·backoff_s, ...
    (±50% jitter; the server's `Retry-After` instead, up to a minute), on HTTP 429, 5xx, a timeout
    (`timeout_s` per socket operation) or a connection error; any other HTTP error and a reply without
    `choices[0].message.content` give None at once.  At most `concurrency` requests run at a time, and
    once 2·concurrency critiques in a row have failed, the call's remaining ones are not sent (an
    endpoint that is down costs one round of timeouts, not one per critique).  The API key is read
    from the environment variable `api_key_env` at each request (no header when it is unset) and
    is never stored on the object.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.7,
                 max_tokens: int = 1024, timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0,
                 concurrency: int = 8, cache_path: Path | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.temperature, self.max_tokens = temperature, max_tokens
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.concurrency = concurrency
        self.cache_path = None if cache_path is None else Path(cache_path)
        self.cache: dict[str, str] = {}
        if self.cache_path is not None:
            self.cache.update((entry["key"], entry["text"]) for entry in read_jsonl(self.cache_path))
        self.stats = CriticStats()

    def __repr__(self) -> str:
        return (f"OpenAICompatibleCritic(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"cache_path={self.cache_path!r})")

    def cache_key(self, prompt: str, index: int) -> str:
        # max_tokens too: a critique cut short is asked again once the limit is raised
        return hashlib.sha256(json.dumps([self.model, prompt, index, self.temperature, self.max_tokens]).encode()
                              ).hexdigest()

    def critique(self, prompts: Sequence[str], k: int, seed: int) -> list[list[str | None]]:
        start = time.perf_counter()
        keys = [[self.cache_key(p, i) for i in range(k)] for p in prompts]
        texts: list[list[str | None]] = [[self.cache.get(key) for key in row] for row in keys]
        missing = [(r, i) for r, row in enumerate(texts) for i, text in enumerate(row) if text is None]
        errors: list[str] = []
        if missing:
            breaker = _Breaker(limit=2 * self.concurrency)
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(missing))) as pool:
                replies = list(pool.map(lambda ri: self._complete(prompts[ri[0]], breaker), missing))
            new = {}
            for (r, i), (text, requests, error) in zip(missing, replies):
                texts[r][i] = text
                self.stats.requests += requests
                if text is None:
                    errors.append(error)
                else:
                    new[keys[r][i]] = text
            self._remember(new)
        self.stats.calls += len(prompts) * k
        self.stats.cache_hits += len(prompts) * k - len(missing)
        self.stats.failures += len(errors)
        self.stats.seconds += time.perf_counter() - start
        if errors:
            log.warning("critic %s: %d of %d critiques failed (last: %s)", self.url, len(errors), len(prompts) * k,
                        errors[-1])
        return texts

    def _remember(self, new: dict[str, str]) -> None:
        self.cache.update(new)
        if self.cache_path is not None and new:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            for key, text in new.items():
                append_jsonl(self.cache_path, {"key": key, "text": text})

    def _complete(self, prompt: str, breaker: _Breaker) -> tuple[str | None, int, str]:
        """(text or None, requests sent, why it failed) for one chat completion; none is sent once
        `breaker` has seen its limit of failed completions in a row (an endpoint that is down)."""
        text, sent, error = self._request(prompt, breaker)
        breaker.record(text is not None, error)
        return text, sent, error

    def _request(self, prompt: str, breaker: _Breaker) -> tuple[str | None, int, str]:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": self.temperature, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        error, wait = "", None
        for attempt in range(self.max_retries + 1):
            if breaker.tripped:
                return None, attempt, (f"not sent: {breaker.limit} critiques in a row failed "
                                       f"(last: {breaker.last_error})")
            if attempt:  # the server's Retry-After (up to a minute), else exponential backoff with jitter
                time.sleep(wait if wait is not None else self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    payload = reply.read()
            except urllib.error.HTTPError as err:
                with err:  # the server's own words name the field it refused
                    error = f"HTTP {err.code}: {err.read(500).decode(errors='replace').strip()}"
                    wait = _retry_after(err.headers.get("Retry-After"))
                if err.code == 429 or err.code >= 500:
                    continue
                return None, attempt + 1, error
            except (OSError, http.client.HTTPException) as err:  # timeouts, refused or dropped connections
                error, wait = type(err).__name__, None
                continue
            text, why = _message_content(payload)
            return text, attempt + 1, why
        return None, self.max_retries + 1, error


class _Breaker:
    """Counts failed completions in a row across a call's threads; `tripped` after `limit` of them."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.last_error = limit, 0, ""
        self.lock = threading.Lock()

    @property
    def tripped(self) -> bool:
        return self.in_a_row >= self.limit

    def record(self, ok: bool, error: str) -> None:
        with self.lock:
            self.in_a_row = 0 if ok else self.in_a_row + 1
            self.last_error = error or self.last_error


def _retry_after(value: str | None, cap_s: float = 60.0) -> float | None:
    """A Retry-After header's seconds (capped), or None when absent or not a number of seconds."""
    try:
        return min(max(float(value), 0.0), cap_s) if value is not None else None
    except ValueError:
        return None


def _message_content(payload: bytes) -> tuple[str | None, str]:
    """The reply's `choices[0].message.content`, or None and why not."""
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        content = None
    return (content, "") if isinstance(content, str) else (None, "reply without choices[0].message.content")


def build_critic(cfg: CriticConfig) -> Critic:
    """The text-generating backend a run's `critic` section names (transformers or openai)."""
    if cfg.backend == "oracle":
        raise ValueError("critic.backend 'oracle' writes no critique text: use build_step_critic")
    if cfg.backend == "transformers":
        return TransformersCritic(cfg.model, cfg.temperature, cfg.max_tokens)
    if cfg.base_url is None:
        raise ValueError("critic.backend 'openai' needs critic.base_url (e.g. http://127.0.0.1:8000/v1)")
    return OpenAICompatibleCritic(cfg.base_url, cfg.model, cfg.api_key_env, cfg.temperature, cfg.max_tokens,
                                  cfg.timeout_s, cfg.max_retries, cfg.backoff_s, cfg.concurrency, cfg.cache_path)
