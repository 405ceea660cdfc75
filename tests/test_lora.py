"""LoRA through peft: only the adapters train, a resumed run ends like an uninterrupted one, and
`final/` is a plain model folder holding W + (α/r)·B·A."""

import pytest
import torch
from safetensors.torch import load_file

from creditrl.config import ConfigError
from creditrl.configure import load_config
from creditrl.policy.loading import load_policy
from creditrl.trainer import OldLogprobs, Trainer

pytest.importorskip("peft")


def _cfg(model_dir, run_dir, *extra):
    return load_config(None, [f"model.name={model_dir}", f"output.dir={run_dir}", "train.steps=3",
                              "rollout.prompts_per_step=3", "rollout.group_size=4", "task.lab.eval_size=4",
                              "task.lab.train_size=100", "eval.k=1", "eval.before=false", "sampling.max_new_tokens=16",
                              "output.checkpoint_every=1", "train.lr=1e-2", "reward.overlong_max=10",
                              "reward.overlong_buffer=8", "model.lora.r=4", *extra])


def test_only_the_adapters_train_and_final_holds_the_merged_weights(tiny_lab_model_dir, tmp_path):
    base = load_file(tiny_lab_model_dir / "model.safetensors")
    trainer = Trainer(_cfg(tiny_lab_model_dir, tmp_path / "run"), show_progress=False)
    trainable = {n for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if not p.requires_grad}
    adapters_during, frozen_during = {}, {}
    trainer.on_step = lambda step: (
        adapters_during.update({n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()
                                if "lora_" in n}),
        frozen_during.update({n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()
                              if not p.requires_grad}))
    trainer.train()
    assert any(not torch.equal(lora[n], adapters_during[n]) for n in lora)  # the adapters moved
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert not any("lora" in k for k in final)
    # the merged q_proj of layer 0 is W + (α/r)·B·A with the adapters of the last step (independent arithmetic)
    name = "model.layers.0.self_attn.q_proj"
    a = adapters_during[f"base_model.model.{name}.lora_A.default.weight"]
    b = adapters_during[f"base_model.model.{name}.lora_B.default.weight"]
    torch.testing.assert_close(final[f"{name}.weight"], base[f"{name}.weight"] + (16.0 / 4) * b @ a)
    # every weight without an adapter is the base model's, untouched
    assert torch.equal(final["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert frozen_during.keys() == frozen.keys() and all(torch.equal(frozen_during[n], v) for n, v in frozen.items())
    load_policy(str(tmp_path / "run" / "final"))  # a plain model folder


def test_sampling_with_generate_under_lora_keeps_the_models_generation_config(tiny_lab_model_dir, tmp_path):
    """peft's generate copies the wrapper's (bare, for the call) config into the base model and leaves it
    there: the merged final/ lost its end tokens and the model's own defaults."""
    from creditrl.policy.lora import LoRAConfig, apply_lora, merged
    from creditrl.policy.transformers_backend import SamplingConfig

    policy = load_policy(str(tiny_lab_model_dir))
    policy.model.generation_config.top_k = 7  # a default of the model's own, to see it survive
    policy.model = apply_lora(policy.model, LoRAConfig(r=4))
    policy.sample([policy.encode_prompt("Start 1.")], 2, SamplingConfig(engine="generate", max_new_tokens=3), seed=0)
    kept = merged(policy.model).generation_config
    assert (kept.top_k, kept.eos_token_id) == (7, policy.tokenizer.eos_token_id)


@pytest.mark.slow
def test_a_resumed_lora_run_ends_like_an_uninterrupted_one(tiny_lab_model_dir, tmp_path):
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "clean"), show_progress=False).train()
    stopped = Trainer(_cfg(tiny_lab_model_dir, tmp_path / "killed", "train.steps=2"), show_progress=False)
    stopped.train()
    assert (tmp_path / "killed" / "checkpoints" / "step-000002" / "adapter_model.safetensors").exists()
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "killed"), show_progress=False).train(resume=True)
    clean = load_file(tmp_path / "clean" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)


def test_the_adapters_start_from_train_seed_whatever_ran_before(tiny_lab_model_dir, tmp_path):
    """Two runs in one process (as `creditrl compare` makes them) start from the same adapters."""
    def initial_adapters(run: str, seed: int):
        trainer = Trainer(_cfg(tiny_lab_model_dir, tmp_path / run, f"train.seed={seed}"), show_progress=False)
        return {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if "lora_A" in n}

    first = initial_adapters("a", seed=0)
    torch.rand(1000)  # whatever else used the global generator in between
    again, other_seed = initial_adapters("b", seed=0), initial_adapters("c", seed=1)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other_seed[n]) for n in first)


def test_a_bf16_model_merges_into_float32_weights_that_keep_the_small_updates(tiny_lab_model_dir, tmp_path):
    trainer = Trainer(_cfg(tiny_lab_model_dir, tmp_path / "run", "model.dtype=bfloat16", "train.lr=1e-6"),
                      show_progress=False)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
            for n, p in trainer.policy.model.named_parameters() if "lora_" not in n}
    adapters = {}
    trainer.on_step = lambda step: adapters.update(
        {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if "lora_" in n})
    trainer.train()
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    weight = base[f"{name}.weight"]
    assert weight.dtype == torch.bfloat16 and final[f"{name}.weight"].dtype == torch.float32
    update = (16.0 / 4) * adapters[f"base_model.model.{name}.lora_B.default.weight"] \
        @ adapters[f"base_model.model.{name}.lora_A.default.weight"]
    torch.testing.assert_close(final[f"{name}.weight"], weight.float() + update)
    # at an RL learning rate, bf16 weights would have rounded nearly all of these updates away
    kept_in_bf16 = ((weight.float() + update).to(torch.bfloat16) != weight).float().mean()
    kept = (final[f"{name}.weight"] != weight.float()).float().mean()
    assert kept > 0.9 and kept_in_bf16 < 0.1


def test_old_logprobs_are_scored_without_the_adapters_dropout(tiny_lab_model_dir, tmp_path):
    trainer = Trainer(_cfg(tiny_lab_model_dir, tmp_path / "run", "model.lora.dropout=0.5"), show_progress=False)
    with torch.no_grad():  # B = 0 at the start would hide the dropout on the adapter's input
        for name, param in trainer.policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    rollouts, _ = trainer.collect()
    trainer.policy.model.train()
    trainer._score_old(rollouts, OldLogprobs.RECOMPUTE)
    first = rollouts.old_logprobs.clone()
    trainer._score_old(rollouts, OldLogprobs.RECOMPUTE)
    assert torch.equal(first, rollouts.old_logprobs)  # no dropout noise
    assert trainer.policy.model.training  # the mode it had


def test_bad_lora_settings_are_named(tiny_lab_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.lora.r"):
        load_config(None, ["model.lora.r=0"])
    with pytest.raises(ConfigError, match="sampling.engine=vllm does not take LoRA adapters"):
        load_config(None, ["model.lora.r=4", "sampling.engine=vllm"])
    for targets, message in [("[nope_proj]", "model.lora.target_modules"),
                             ("[q_proj,nope_proj]", r"\['nope_proj'\] match no layer"),
                             ("[lm_head]", "input and output embeddings are one tensor")]:
        with pytest.raises(ValueError, match=message):
            Trainer(_cfg(tiny_lab_model_dir, tmp_path / "run", f"model.lora.target_modules={targets}"),
                    show_progress=False)


@pytest.mark.slow
def test_compiled_scoring_trains_the_adapters_as_eager_does(tiny_lab_model_dir, tmp_path):
    """peft's adapter layers inside the compiled decoder layers: the same adapters after two steps."""
    adapters = []
    for compiled in (False, True):
        trainer = Trainer(_cfg(tiny_lab_model_dir, tmp_path / str(compiled), "train.steps=2",
                               f"model.compile={str(compiled).lower()}"), show_progress=False)
        seen = {}
        trainer.on_step = lambda step, seen=seen, trainer=trainer: seen.update(
            {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if "lora_" in n})
        trainer.train()
        adapters.append(seen)
    eager, compiled = adapters
    assert eager.keys() == compiled.keys() and eager
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-4, rtol=1e-4)
