"""The sampling-engine registry: how responses are drawn, with per-token log-probs where the engine has them.

An engine is `sample(policy, prompt_ids, n, cfg, seed) -> Generation`: n responses per prompt, rows
prompt-major, reproducible from `seed`.  `sampling.engine` names one:

| engine     | samples with                                                | log-probs | LoRA |
|------------|-------------------------------------------------------------|-----------|------|
| `kv-cache` | the project's loop (`decoding.py`): prompt prefilled once   | yes       | yes  |
| `generate` | transformers' `model.generate`                              | no        | yes  |
| `vllm`     | a vLLM engine in this process (`vllm_engine.py`, optional)  | no        | no   |

A user's package adds one with `@register_engine("name")` on such a function, declared in the
entry-point group `creditrl.engines` so that it is imported when its name is first asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from creditrl.config import SamplingConfig
from creditrl.config.plugins import load_plugins
from creditrl.policy import vllm_engine
from creditrl.policy.generation import Generation

ENTRY_POINT_GROUP = "creditrl.engines"

SampleFn = Callable[..., Generation]  # (policy, prompt_ids, n, cfg, seed) -> Generation


@dataclass(frozen=True)
class Engine:
    name: str
    sample: SampleFn
    takes_lora: bool = True  # samples from the policy's own (adapter-wrapped) weights


ENGINES: dict[str, Engine] = {}


def register_engine(name: str, takes_lora: bool = True) -> Callable[[SampleFn], SampleFn]:
    """Register `fn(policy, prompt_ids, n, cfg, seed) -> Generation` as the engine `name`."""
    def decorate(fn: SampleFn) -> SampleFn:
        if name in ENGINES and ENGINES[name].sample is not fn:
            raise ValueError(f"sampling engine {name!r} is already registered")
        ENGINES[name] = Engine(name, fn, takes_lora)
        return fn

    return decorate


def get_engine(name: str) -> Engine:
    """The engine called `name`; a ValueError lists the known engines."""
    if name not in ENGINES:
        load_plugins(ENTRY_POINT_GROUP, "engine")
    if name not in ENGINES:
        raise ValueError(f"unknown sampling engine {name!r}; known engines: {', '.join(sorted(ENGINES))}")
    return ENGINES[name]


@register_engine("kv-cache")
def sample_with_kv_cache(policy, prompt_ids: list[list[int]], n: int, cfg: SamplingConfig, seed: int) -> Generation:
    """The project's sampler: each prompt prefilled once for its n samples, finished rows dropped."""
    return policy.sample_in_calls(prompt_ids, n, cfg, seed, policy.sample_kv_cache_call)


@register_engine("generate")
def sample_with_generate(policy, prompt_ids: list[list[int]], n: int, cfg: SamplingConfig, seed: int) -> Generation:
    """transformers' `model.generate`, each prompt repeated n times."""
    return policy.sample_in_calls(prompt_ids, n, cfg, seed, lambda chunk, n, cfg: policy.generate_call(
        [p for p in chunk for _ in range(n)], cfg))


@register_engine("vllm", takes_lora=False)
def sample_with_vllm(policy, prompt_ids: list[list[int]], n: int, cfg: SamplingConfig, seed: int) -> Generation:
    """A vLLM engine built from the policy's folder, its weights kept in step with the policy's."""
    return vllm_engine.sample_with_vllm(policy, prompt_ids, n, cfg, seed)
