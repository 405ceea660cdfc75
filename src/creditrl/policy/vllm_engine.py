"""Optional sampling through vLLM (`sampling.engine: vllm`), for users who have it on a GPU.

One `vllm.LLM` per policy, built from the model's folder with prefix caching on, so VinePPO's
K continuations of one prefix share its KV blocks.  The engine runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`; by default vLLM's V1 engine runs its model in a child
process, out of reach of the weight push below).  Before each call the policy's current
weights are pushed into the engine when they have changed since the last push (the trainer
counts its optimizer steps in `policy.updates`, since a fused AdamW step leaves the
parameters' `_version` as it was; any other in-place update bumps `_version`), and the
prefix cache is reset, since blocks computed by older weights are stale.  vLLM's log-probs come
from other kernels than training's, so the trainer recomputes the old log-probs with a forward.
"""

from __future__ import annotations

import os

from creditrl.config import SamplingConfig
from creditrl.policy.generation import Generation

MISSING = ("sampling.engine=vllm needs the vllm package (pip install vllm, on a machine with a GPU); "
           "sampling.engine=kv-cache samples without it")
NO_LORA = ("sampling.engine=vllm does not take LoRA adapters (model.lora): their parameter names are not the base "
           "model's; use sampling.engine=kv-cache")


def sample_with_vllm(policy, prompt_ids: list[list[int]], n: int, cfg: SamplingConfig, seed: int) -> Generation:
    """n responses per prompt through vLLM, rows prompt-major, in the shape the other engines return."""
    vllm = _import_vllm()
    engine = _engine(policy, vllm)
    _push_weights_if_changed(policy, engine)
    # vLLM seeds a prompt's j-th sample with seed + j: n seeds apart, no two samples of the call share a stream
    params = [vllm.SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                  stop=cfg.stop or None, include_stop_str_in_output=True, seed=seed + i * n)
              for i in range(len(prompt_ids))]
    outputs = engine.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=params,
                              use_tqdm=False)
    rows, responses, truncated = [], [], []
    for ids, output in zip(prompt_ids, outputs):
        for completion in output.outputs:
            rows.append(ids)
            responses.append(list(completion.token_ids))
            truncated.append(completion.finish_reason == "length")
    if policy.on_sampled is not None:
        policy.on_sampled(len(prompt_ids))
    return Generation(rows, responses, truncated)


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(MISSING) from err
    return vllm


def _engine(policy, vllm):
    engine = getattr(policy, "_vllm_engine", None)
    if engine is None:
        if hasattr(policy.model, "peft_config"):
            raise ValueError(NO_LORA)
        source = policy.model.config._name_or_path
        if not source:
            raise ValueError("sampling.engine=vllm: the policy's model has no folder to load from "
                             "(model.config._name_or_path is empty); save it with save_pretrained first")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine is built
        engine = vllm.LLM(model=source, tokenizer=source, enable_prefix_caching=True, dtype="bfloat16",
                          gpu_memory_utilization=0.4)
        policy._vllm_engine, policy._vllm_weights = engine, None
    return engine


def _push_weights_if_changed(policy, engine) -> None:
    fingerprint = (policy.updates, sum(p._version for p in policy.model.parameters()))
    if policy._vllm_weights == fingerprint:
        return
    executor = getattr(engine.llm_engine, "model_executor", None)
    if executor is None:
        raise RuntimeError("sampling.engine=vllm: vLLM runs its model in another process, where the policy's "
                           "weights cannot be pushed; creditrl builds the engine with "
                           "VLLM_ENABLE_V1_MULTIPROCESSING=0, which this vLLM version did not honour")
    target = executor.driver_worker.model_runner.model
    target.load_weights((name, param.data) for name, param in policy.model.named_parameters())
    engine.reset_prefix_cache()
    policy._vllm_weights = fingerprint
