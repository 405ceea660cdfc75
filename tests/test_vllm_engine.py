"""The optional vLLM engine's wiring, against a stand-in `vllm` module (vLLM itself needs a GPU).

The stand-in records what the engine is asked (the constructor's and SamplingParams' arguments,
the weights pushed, the prefix-cache resets) and answers in vLLM's output shape
(`RequestOutput.outputs[i].token_ids` / `.finish_reason`); the real vLLM is not exercised here.
"""

import os
import sys
import types

import pytest
import torch

from creditrl.policy.transformers_backend import SamplingConfig


class _StandInLLM:
    """vLLM ≥ 0.10's `LLM`: its `llm_engine` has a `model_executor` (the model in this process) only when
    VLLM_ENABLE_V1_MULTIPROCESSING is 0 as the engine is built; by default the model runs in a child process."""

    def __init__(self, **kwargs):
        self.kwargs, self.pushes, self.resets, self.calls = kwargs, [], 0, []
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = types.SimpleNamespace()
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0":
            self.llm_engine.model_executor = types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=runner))

    def _load_weights(self, weights):
        self.pushes.append({name: tensor.clone() for name, tensor in weights})

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, sampling_params, use_tqdm):
        """vLLM takes one SamplingParams for all prompts, or a list of one per prompt."""
        self.calls.append((prompts, sampling_params))
        per_prompt = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(per_prompt) == len(prompts)
        return [types.SimpleNamespace(outputs=[
            types.SimpleNamespace(token_ids=[prompt["prompt_token_ids"][-1], j],
                                  finish_reason="length" if j else "stop")
            for j in range(p.n)]) for prompt, p in zip(prompts, per_prompt)]


@pytest.fixture()
def stand_in_vllm(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # vLLM's default (restored after the test)
    module = types.ModuleType("vllm")
    module.LLM = _StandInLLM
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_rows_params_and_weight_pushes(tiny_policy, stand_in_vllm):
    cfg = SamplingConfig(engine="vllm", temperature=0.6, top_p=0.9, max_new_tokens=7, stop=["\n"])
    prompts = [[5, 6], [7, 8, 9]]
    gen = tiny_policy.sample(prompts, 3, cfg, seed=11)
    engine = tiny_policy._vllm_engine
    assert engine.kwargs["enable_prefix_caching"] is True
    assert engine.kwargs["model"] == tiny_policy.model.config._name_or_path
    sent, params = engine.calls[0]
    assert sent == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7, 8, 9]}]
    assert [(p.n, p.temperature, p.top_p, p.max_tokens, p.stop, p.seed) for p in params] == \
           [(3, 0.6, 0.9, 7, ["\n"], 11), (3, 0.6, 0.9, 7, ["\n"], 14)]  # vLLM seeds sample j with seed + j:
    # prompt 0's samples draw with seeds 11, 12, 13 and prompt 1's with 14, 15, 16, no stream shared
    assert gen.prompt_ids == [[5, 6]] * 3 + [[7, 8, 9]] * 3
    assert gen.response_ids == [[6, 0], [6, 1], [6, 2], [9, 0], [9, 1], [9, 2]]
    assert gen.truncated == [False, True, True] * 2
    assert gen.logprobs is None  # the trainer recomputes old log-probs with its own forward

    # the first call pushed the policy's weights; an unchanged policy is not pushed again
    assert len(engine.pushes) == 1 and engine.resets == 1
    for name, param in tiny_policy.model.named_parameters():
        torch.testing.assert_close(engine.pushes[0][name], param.detach())
    tiny_policy.sample(prompts, 1, cfg, seed=0)
    assert len(engine.pushes) == 1

    # an optimizer step changes the weights in place: the next call pushes them and resets the prefix cache
    optimizer = torch.optim.SGD(tiny_policy.model.parameters(), lr=0.1)
    tiny_policy.model.get_output_embeddings().weight.sum().backward()
    optimizer.step()
    tiny_policy.sample(prompts, 1, cfg, seed=0)
    assert len(engine.pushes) == 2 and engine.resets == 2
    name = next(n for n, p in tiny_policy.model.named_parameters()
                if p is tiny_policy.model.get_output_embeddings().weight)
    torch.testing.assert_close(engine.pushes[1][name], tiny_policy.model.get_output_embeddings().weight.detach())
    assert not torch.equal(engine.pushes[1][name], engine.pushes[0][name])

    # the trainer's optimizer, a fused AdamW, updates in place without bumping the parameters' _version:
    # its steps reach vLLM through the trainer's count of updates
    fused = torch.optim.AdamW(tiny_policy.model.parameters(), lr=0.1, fused=True)
    tiny_policy.model.get_output_embeddings().weight.sum().backward()
    fused.step()
    tiny_policy.updates += 1  # what the trainer does after each optimizer step
    tiny_policy.sample(prompts, 1, cfg, seed=0)
    assert len(engine.pushes) == 3 and engine.resets == 3
    torch.testing.assert_close(engine.pushes[2][name], tiny_policy.model.get_output_embeddings().weight.detach())


@pytest.mark.slow
def test_the_trainer_counts_its_optimizer_steps_on_the_policy(tiny_lab_model_dir, tmp_path):
    import json

    from creditrl.configure import load_config
    from creditrl.trainer import Trainer

    cfg = load_config(None, [f"model.name={tiny_lab_model_dir}", f"output.dir={tmp_path / 'run'}", "train.steps=2",
                             "rollout.prompts_per_step=2", "rollout.group_size=3", "train.n_minibatches=2",
                             "task.lab.eval_size=2", "eval.k=1", "eval.before=false", "sampling.max_new_tokens=12",
                             "reward.overlong_max=8", "reward.overlong_buffer=6"])
    trainer = Trainer(cfg, show_progress=False)
    trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert trainer.policy.updates == sum(m.get("updates", 0) for m in logged) > 0


def test_a_missing_vllm_names_the_setting_and_the_alternative(tiny_policy, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails as when it is not installed
    with pytest.raises(ImportError, match=r"sampling.engine=vllm needs the vllm package.*sampling.engine=kv-cache"):
        tiny_policy.sample([[5, 6]], 2, SamplingConfig(engine="vllm"), seed=0)


def test_a_vllm_that_keeps_its_model_in_another_process_is_named(tiny_policy, stand_in_vllm, monkeypatch):
    class ChildProcessLLM(_StandInLLM):  # a vLLM that ignores VLLM_ENABLE_V1_MULTIPROCESSING
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.llm_engine = types.SimpleNamespace()

    monkeypatch.setattr(stand_in_vllm, "LLM", ChildProcessLLM)
    with pytest.raises(RuntimeError, match=r"sampling.engine=vllm: vLLM runs its model in another process"):
        tiny_policy.sample([[5, 6]], 2, SamplingConfig(engine="vllm"), seed=0)
