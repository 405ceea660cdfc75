"""verl 0.9.1's own actor update with creditrl's registered losses and advantages, on the CPU, against
creditrl's `policy_loss` on the same batch.

verl's actor update is its FSDP engine's `train_batch` on each PPO mini-batch: split into micro-batches,
count the mini-batch's loss tokens across data-parallel ranks, call `ppo_loss` (which calls the
registered `policy_loss.loss_mode`) with that global count, backward, clip the gradient norm, step the
optimizer.  Here it runs for real (FSDP2 over a gloo group of one, float32) on a tiny Llama, two
mini-batches of 4 rows × 2 epochs, micro-batches of 2 rows; the reference is creditrl's `policy_loss`
on each whole mini-batch with plain autograd, and the same clipping and SGD step.  Old log-probs are the
start model's, perturbed, so the ratios are off 1 from the first step (clipping, FIPO's and GRPO-λ's Δ).

What runs on the CPU only with help (verl 0.9.1 targets CUDA / NPU):
- `verl.utils.device.get_device_name()` answers "cuda" on a machine without a GPU (its CUDA platform is
  the fallback), and the engine's `init_device_mesh("cuda")` then calls `torch.cuda.set_device`: a CPU
  platform is installed with verl's own `platform_manager.set_platform` before the engine is imported.
- `EngineRegistry.new` knows the FSDP engine for "cuda" and "npu" only: the engine class is built directly.
- verl's model patch imports TRL's `AutoModelForCausalLMWithValueHead`, which TRL 1.16 no longer has: its
  TRL check is turned off (the patch is for value models).
- `TrainingWorker.train_mini_batch` (verl/workers/engine_workers.py) imports the rollout server (fastapi),
  and `ray_trainer.compute_advantage` imports torchdata, neither in the `verl` extra: the test iterates
  the mini-batches with the worker's own `tensordict_utils.make_iterator` call and calls the estimators
  through `core_algos.get_adv_estimator_fn`, as `compute_advantage` does.

Tolerance: both sides compute in float32; they differ in padding (verl unpads to nested tensors) and in
summing micro-batches.  Measured over the four cases, the final weights differ by at most 6.7e-8, float32's
rounding of weights near 1, while the tensors' largest changes range from 1e-4 to 0.18; the test allows
1e-4 of each tensor's largest change plus 2 ulp of its largest weight.  A wrong normalisation (a
micro-batch's token count instead of the mini-batch's) halves or doubles a gradient, and leaving out
FIPO's or GRPO-λ's hook changes the update by far more (checked by hand when the test was written).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from factories import make_rollouts  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from verl.plugin.platform import platform_manager  # noqa: E402
from verl.plugin.platform.platform_cuda import PlatformCUDA  # noqa: E402
from verl.trainer.config import AlgoConfig, CheckpointConfig  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

import creditrl.integrations.verl as verl_adapter  # noqa: E402
from creditrl.methods import compute_advantages, get_method, loss_hooks  # noqa: E402
from creditrl.methods.capo import CAPOParams, capo_token_advantages  # noqa: E402
from creditrl.methods.loss import LossConfig, policy_loss  # noqa: E402

ROWS, PROMPT, RESPONSE, GROUP = 8, 3, 6, 4
MINI_BATCH, MICRO_BATCH, EPOCHS, LR, CLIP_GRAD = 4, 2, 2, 0.5, 1.0
CLIP = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


class PlatformCPU(PlatformCUDA):
    """verl's CUDA platform, answering for the CPU and gloo."""

    device_name = "cpu"
    device_module = torch.cpu

    def current_device(self) -> str:
        return "cpu"

    def communication_backend_name(self) -> str:
        return "gloo"

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def empty_cache(self) -> None:
        pass


@pytest.fixture(scope="module")
def engine_class(tmp_path_factory):
    """verl's FSDP engine class, imported under the CPU platform, in a gloo process group of one."""
    previous = platform_manager._current_platform
    platform_manager.set_platform(PlatformCPU())
    store = tmp_path_factory.mktemp("process_group") / "store"
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    with pytest.MonkeyPatch.context() as patch:
        import verl.models.transformers.monkey_patch as model_patch
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

        patch.setattr(model_patch, "is_trl_available", lambda: False)
        yield FSDPEngineWithLMHead
    torch.distributed.destroy_process_group()
    platform_manager._current_platform = previous


def verl_engine(engine_class, model_dir):
    engine_config = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False,
                                     mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                      "buffer_dtype": "fp32"})
    optimizer = FSDPOptimizerConfig(lr=LR, optimizer="SGD", weight_decay=0.0, clip_grad=CLIP_GRAD)
    model_config = HFModelConfig(path=str(model_dir), override_config={"attn_implementation": "eager"})
    engine = engine_class(model_config=model_config, engine_config=engine_config, optimizer_config=optimizer,
                          checkpoint_config=CheckpointConfig())
    engine.initialize()
    return engine


def verl_update(engine, batch: dict, advantages, loss_mode: str, agg: str) -> dict[str, torch.Tensor]:
    """verl's actor update of `batch` (padded tensors) with these advantages (B, T); the final weights."""
    actor = ActorConfig(strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=MINI_BATCH,
                        ppo_micro_batch_size_per_gpu=MICRO_BATCH, loss_agg_mode=agg, entropy_coeff=0.0,
                        use_kl_loss=False, policy_loss={"loss_mode": loss_mode}, **CLIP)
    data = TensorDict({**batch, "advantages": advantages.float()}, batch_size=[ROWS])
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(data, global_batch_size=MINI_BATCH, temperature=1.0, calculate_entropy=False,
                         compute_loss=True)
    for mini_batch in tu.make_iterator(data, mini_batch_size=MINI_BATCH, epochs=EPOCHS, seed=0,
                                       dataloader_kwargs={"shuffle": False}):
        tu.assign_non_tensor(mini_batch, use_remove_padding=False, use_dynamic_bsz=False, use_fused_kernels=False,
                             micro_batch_size_per_gpu=MICRO_BATCH)
        with engine.train_mode():
            engine.train_batch(mini_batch, loss_function=partial(ppo_loss, config=actor))
    return engine_weights(engine)


def engine_weights(engine) -> dict[str, torch.Tensor]:
    """The engine's parameters, gathered from FSDP2's DTensor shards."""
    return {name: p.full_tensor().detach().clone() for name, p in engine.module.named_parameters()}


def response_logprobs(model, batch: dict) -> torch.Tensor:
    """log π(response token | its prefix) (B, T), from a plain forward over prompt + response."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, PROMPT - 1:-1]
    return logits.log_softmax(-1).gather(-1, batch["responses"][..., None])[..., 0]


def creditrl_update(model_dir, batch: dict, advantages, method: str | None, agg: str) -> dict[str, torch.Tensor]:
    """creditrl's `policy_loss` (with `method`'s hooks) on each whole mini-batch, the same clipping and SGD."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ratio_transform, token_weight = loss_hooks(get_method(method), {}) if method else (None, None)
    cfg = LossConfig(eps_low=CLIP["clip_ratio_low"], eps_high=CLIP["clip_ratio_high"], dual_clip=CLIP["clip_ratio_c"],
                     agg=agg, norm_length=RESPONSE)
    for _ in range(EPOCHS):
        for start in range(0, ROWS, MINI_BATCH):
            rows = {key: value[start:start + MINI_BATCH] for key, value in batch.items()}
            optimizer.zero_grad()
            loss, _ = policy_loss(response_logprobs(model, rows), rows["old_log_probs"],
                                  advantages[start:start + MINI_BATCH].float(), rows["response_mask"].bool(), cfg,
                                  ratio_transform=ratio_transform, token_weight=token_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)
            optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def random_batch(model_dir, seed: int) -> dict:
    """ROWS rows: left-padded prompts, right-padded responses (every row ≥ 1 token), old log-probs = the
    start model's + noise."""
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    prompt_lengths = torch.randint(1, PROMPT + 1, (ROWS,), generator=gen)
    response_lengths = torch.randint(1, RESPONSE + 1, (ROWS,), generator=gen)
    prompt_mask = torch.arange(PROMPT)[None, :] >= (PROMPT - prompt_lengths)[:, None]
    response_mask = torch.arange(RESPONSE)[None, :] < response_lengths[:, None]
    ids = torch.randint(3, model.config.vocab_size, (ROWS, PROMPT + RESPONSE), generator=gen)
    attention = torch.cat([prompt_mask, response_mask], dim=1).long()
    batch = {"input_ids": ids, "attention_mask": attention, "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
             "prompts": ids[:, :PROMPT], "responses": ids[:, PROMPT:], "response_mask": response_mask.long()}
    with torch.no_grad():
        start = response_logprobs(model, batch)
    noise = 0.3 * torch.randn(ROWS, RESPONSE, generator=gen)
    batch["old_log_probs"] = torch.where(response_mask, start + noise, 0.0)
    return batch


def outcome_rewards(batch: dict, seed: int):
    """One score per row, on its last token (as verl's reward manager writes it); groups of GROUP rows."""
    gen = torch.Generator().manual_seed(seed + 100)
    scores = torch.randint(0, 2, (ROWS,), generator=gen).float()
    scores[::GROUP] = 1.0 - scores[1::GROUP]  # no group where every row agrees
    lengths = batch["response_mask"].sum(1)
    token_rewards = torch.zeros(ROWS, RESPONSE)
    token_rewards[torch.arange(ROWS), lengths - 1] = scores
    uids = [f"prompt-{row // GROUP}" for row in range(ROWS)]
    return scores, token_rewards, uids


def assert_same_update(verl_weights, creditrl_weights, start):
    """Every weight tensor's change agrees to 1e-4 of its largest change, plus float32's rounding of the
    weights themselves (2 ulp of the largest weight)."""
    for name, theirs in creditrl_weights.items():
        change = theirs - start[name]
        error = (verl_weights[name] - theirs).abs().max()
        rounding = 2 * torch.finfo(torch.float32).eps * theirs.abs().max()
        assert change.abs().max() > 0 and error <= 1e-4 * change.abs().max() + rounding, name


@pytest.mark.slow
@pytest.mark.parametrize(("method", "estimator", "loss_mode", "agg"), [
    ("fipo", "creditrl_grpo", "creditrl_fipo", "token-mean"),
    ("grpo_lambda", "creditrl_grpo_lambda", "creditrl_grpo_lambda", "seq-mean-token-mean"),
    ("grpo", "creditrl_grpo", "vanilla", "seq-mean-token-mean"),
])
def test_verl_actor_update_with_outcome_advantages_matches_creditrl(engine_class, tiny_lab_model_dir, method,
                                                                    estimator, loss_mode, agg):
    batch = random_batch(tiny_lab_model_dir, seed=0)
    scores, token_rewards, uids = outcome_rewards(batch, seed=0)
    mask = batch["response_mask"]
    advantages, _ = core_algos.get_adv_estimator_fn(estimator)(
        token_level_rewards=token_rewards, response_mask=mask, index=uids, config=AlgoConfig())
    rollouts = make_rollouts(scores.tolist(), [row // GROUP for row in range(ROWS)], mask.sum(1).tolist(), T=RESPONSE)
    expected = compute_advantages(method, rollouts)
    assert expected.abs().sum() > 0

    engine = verl_engine(engine_class, tiny_lab_model_dir)
    start = engine_weights(engine)
    hooks = method if loss_mode != "vanilla" else None
    assert_same_update(verl_update(engine, batch, advantages, loss_mode, agg),
                       creditrl_update(tiny_lab_model_dir, batch, expected, hooks, agg), start)


@pytest.mark.slow
def test_verl_actor_update_with_capo_advantages_matches_creditrl(engine_class, tiny_lab_model_dir):
    """CAPO's step rewards reach verl as marked token rewards (`creditrl_step_rewards`); `creditrl_capo`
    turns them into the advantages creditrl's CAPO computes from the verdicts and the critic's penalties."""
    batch = random_batch(tiny_lab_model_dir, seed=1)
    mask = batch["response_mask"].bool()
    gen = torch.Generator().manual_seed(7)
    lengths = mask.sum(1)
    step_ids = torch.where(mask, torch.arange(RESPONSE)[None, :] * 3 // lengths.clamp(min=1)[:, None], -1)
    correct = torch.randint(0, 2, (ROWS,), generator=gen).bool()
    penalties = torch.randint(0, 2, (ROWS, 3), generator=gen).float()
    params = CAPOParams()
    step_rewards = params.w_whole * correct.float()[:, None] - params.w_process * penalties
    token_rewards = torch.tensor([
        verl_adapter.token_rewards_from_steps(rewards[:max(steps[steps >= 0].tolist()) + 1].tolist(),
                                              steps[steps >= 0].tolist()) + [0.0] * int((steps < 0).sum())
        for rewards, steps in zip(step_rewards, step_ids)])
    uids = [f"prompt-{row // GROUP}" for row in range(ROWS)]
    advantages, _ = core_algos.get_adv_estimator_fn("creditrl_capo")(
        token_level_rewards=token_rewards, response_mask=mask.long(), index=uids)
    expected = capo_token_advantages(correct, penalties, step_ids, mask, torch.arange(ROWS) // GROUP, params)
    assert expected.abs().sum() > 0

    engine = verl_engine(engine_class, tiny_lab_model_dir)
    start = engine_weights(engine)
    assert_same_update(verl_update(engine, batch, advantages, "vanilla", "seq-mean-token-mean"),
                       creditrl_update(tiny_lab_model_dir, batch, expected, None, "seq-mean-token-mean"), start)
