"""creditrl's methods registered in verl (`creditrl.integrations.verl`) against verl's own pieces and creditrl's loss.

Skipped where verl is not installed (see docs/integrations-verl.md for the minimal install).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from factories import make_rollouts
from omegaconf import OmegaConf
from verl import DataProto
from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
from verl.trainer.config import AlgoConfig
from verl.workers.config import ActorConfig

import creditrl.integrations.verl as verl_adapter
from creditrl.methods import compute_advantages, loss_hooks
from creditrl.methods.capo import CAPOParams, capo_token_advantages
from creditrl.methods.loss import LossConfig, policy_loss

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# ---- random batches ------------------------------------------------------------------------------
def outcome_batch(seed: int, group_size: int = 4, n_groups: int = 3, width: int = 7):
    """Rows of shuffled groups (uids as verl gives them), every row with ≥ 1 token, reward on the last token."""
    gen = torch.Generator().manual_seed(seed)
    n_rows = group_size * n_groups
    order = torch.randperm(n_rows, generator=gen)
    uids = np.array([f"prompt-{int(i) // group_size}" for i in order], dtype=object)
    lengths = torch.randint(1, width + 1, (n_rows,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    scores = torch.randint(0, 3, (n_rows,), generator=gen).float() - 1.0
    rewards = torch.zeros(n_rows, width)
    rewards[torch.arange(n_rows), lengths - 1] = scores
    return rewards, mask.long(), uids


def loss_batch(seed: int, n_rows: int = 6, width: int = 9):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (n_rows,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    old = -torch.rand(n_rows, width, generator=gen) * 3
    new = (old + 0.4 * torch.randn(n_rows, width, generator=gen)).requires_grad_(True)
    adv = torch.randn(n_rows, 1, generator=gen).expand(n_rows, width) * mask
    return old, new, adv, mask


def actor_config(agg: str) -> ActorConfig:
    """The fields verl's `vanilla` loss reads, as verl's own tests build them."""
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                       clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=agg)


def loss_config(agg: str, width: int) -> LossConfig:
    """creditrl's LossConfig matching `actor_config`; verl's seq-mean-token-sum-norm divides by T by default."""
    return LossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, agg=agg, norm_length=width)


# ---- (1) registration ----------------------------------------------------------------------------
def test_names_are_registered_in_verl():
    for name in verl_adapter.ESTIMATORS:
        assert callable(core_algos.get_adv_estimator_fn(name))
    for name in verl_adapter.POLICY_LOSSES:
        assert callable(core_algos.get_policy_loss_fn(name))
    assert get_reward_manager_cls("creditrl_step_rewards") is verl_adapter.CreditrlStepRewardManager
    # verl's own names are untouched
    assert core_algos.get_adv_estimator_fn("grpo") is core_algos.compute_grpo_outcome_advantage


@pytest.mark.slow
def test_verl_imports_the_module_from_its_environment_variable():
    code = ("import verl.trainer.ppo.core_algos as c; c.get_adv_estimator_fn('creditrl_capo'); "
            "c.get_policy_loss_fn('creditrl_fipo'); print('ok')")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "creditrl.integrations.verl", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# ---- (2) against verl's own GRPO / RLOO and vanilla loss ------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_estimator_matches_verl_grpo(seed, norm_by_std):
    rewards, mask, uids = outcome_batch(seed)
    expected, _ = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, uids,
                                                            norm_adv_by_std_in_grpo=norm_by_std)
    got, returns = core_algos.get_adv_estimator_fn("creditrl_grpo")(
        token_level_rewards=rewards, response_mask=mask, index=uids,
        config=AlgoConfig(norm_adv_by_std_in_grpo=norm_by_std))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(returns, got)


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_lambda_estimator_is_verl_grpo_clamped_at_minus_a_tenth(norm_by_std):
    rewards, mask, uids = outcome_batch(4)
    grpo, _ = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, uids,
                                                        norm_adv_by_std_in_grpo=norm_by_std)
    got, _ = core_algos.get_adv_estimator_fn("creditrl_grpo_lambda")(
        token_level_rewards=rewards, response_mask=mask, index=uids,
        config=AlgoConfig(norm_adv_by_std_in_grpo=norm_by_std))
    torch.testing.assert_close(got, torch.where(mask.bool(), grpo.clamp(min=-0.1), 0.0), rtol=1e-5, atol=1e-5)


def test_rloo_estimator_matches_verl_rloo():
    rewards, mask, uids = outcome_batch(3)
    expected, _ = core_algos.compute_rloo_outcome_advantage(rewards.clone(), mask, uids)
    got, _ = core_algos.get_adv_estimator_fn("creditrl_rloo")(token_level_rewards=rewards, response_mask=mask,
                                                              index=uids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_verl_vanilla_loss_matches_creditrl_policy_loss(agg):
    old, new, adv, mask = loss_batch(4)
    verl_loss, _ = core_algos.get_policy_loss_fn("vanilla")(
        old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=actor_config(agg))
    verl_grad, = torch.autograd.grad(verl_loss, new)
    ours, _ = policy_loss(new, old, adv, mask, loss_config(agg, mask.shape[1]))
    our_grad, = torch.autograd.grad(ours, new)
    torch.testing.assert_close(verl_loss, ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(verl_grad, our_grad, rtol=1e-5, atol=1e-6)


# ---- (3) FIPO and GRPO-λ in verl against creditrl's own loss --------------------------------------
@pytest.mark.parametrize("method", ["fipo", "grpo_lambda", "grpo_lambda_weight"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_registered_losses_match_creditrl_policy_loss_with_hooks(method, agg):
    old, new, adv, mask = loss_batch(5)
    verl_loss, metrics = core_algos.get_policy_loss_fn(f"creditrl_{method}")(
        old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=actor_config(agg))
    verl_grad, = torch.autograd.grad(verl_loss, new)
    ratio_transform, token_weight = loss_hooks(method)
    ours, our_metrics = policy_loss(new, old, adv, mask, loss_config(agg, mask.shape[1]),
                                    ratio_transform=ratio_transform, token_weight=token_weight)
    our_grad, = torch.autograd.grad(ours, new)
    torch.testing.assert_close(verl_loss, ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(verl_grad, our_grad, rtol=1e-5, atol=1e-6)
    assert metrics["actor/creditrl_weight_mean"] == pytest.approx(our_metrics["weight_mean"].item(), rel=1e-5)
    # the hooks do something on these tensors (Δ ≠ 0): the plain loss differs
    plain, _ = policy_loss(new, old, adv, mask, loss_config(agg, mask.shape[1]))
    assert not torch.isclose(plain, ours)


@pytest.mark.parametrize("method", ["vanilla", "creditrl_fipo", "creditrl_grpo_lambda"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dp_size", [1, 2])
def test_micro_batches_on_data_parallel_ranks_add_up_to_the_whole_batch_loss(method, agg, dp_size):
    """verl's actor splits a mini-batch over `dp_size` ranks and each rank's share into micro-batches.

    Its `ppo_loss` puts the global batch's size and token count in `config.global_batch_info`; every
    micro-batch loss is backpropagated and the ranks' gradients are averaged.  The sum over micro-batches,
    averaged over ranks, must be creditrl's loss on the whole batch (hooks act row by row).
    """
    old, new, adv, mask = loss_batch(7, n_rows=8)
    config = actor_config(agg)
    config.global_batch_info.update(dp_size=dp_size, batch_num_tokens=mask.sum(), global_batch_size=mask.shape[0],
                                    loss_scale_factor=None)
    loss_fn = core_algos.get_policy_loss_fn(method)
    micro_losses = [loss_fn(old_log_prob=old[rows], log_prob=new[rows], advantages=adv[rows], response_mask=mask[rows],
                            loss_agg_mode=agg, config=config)[0]
                    for rows in torch.arange(mask.shape[0]).split(2)]
    verl_loss = torch.stack(micro_losses).sum() / dp_size
    verl_grad, = torch.autograd.grad(verl_loss, new)
    hooks = loss_hooks(method.removeprefix("creditrl_")) if method != "vanilla" else (None, None)
    ratio_transform, token_weight = hooks
    ours, _ = policy_loss(new, old, adv, mask, loss_config(agg, mask.shape[1]),
                          ratio_transform=ratio_transform, token_weight=token_weight)
    our_grad, = torch.autograd.grad(ours, new)
    torch.testing.assert_close(verl_loss, ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(verl_grad, our_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("method", "reason"), [("cispo", "loss_mode=cispo"), ("sapo", "loss_mode=sapo"),
                                              ("high_entropy", "entropy")])
def test_the_hooked_loss_refuses_what_verl_computes_otherwise(method, reason):
    old, new, adv, mask = loss_batch(3)
    with pytest.raises(ValueError, match=re.escape(reason)):
        verl_adapter.hooked_policy_loss(method, old, new, adv, mask, "token-mean", actor_config("token-mean"), None)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_gspo_through_the_hooked_loss_is_verls_gspo(agg):
    # creditrl's gspo ratio transform handed to verl's `vanilla` (no dual clip where A < 0 matters only past
    # r = 3) is verl's own `gspo` loss
    old, new, adv, mask = loss_batch(8)
    new = (old + 1e-3 * (new - old)).detach().requires_grad_(True)
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio_low=3e-4,
                         clip_ratio_high=4e-4, loss_agg_mode=agg)
    ours, _ = verl_adapter.hooked_policy_loss("gspo", old, new, adv, mask, agg, config, None)
    our_grad, = torch.autograd.grad(ours, new)
    theirs, _ = core_algos.get_policy_loss_fn("gspo")(old_log_prob=old, log_prob=new, advantages=adv,
                                                      response_mask=mask, loss_agg_mode=agg, config=config)
    their_grad, = torch.autograd.grad(theirs, new)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-7)


def test_method_params_come_from_the_environment(monkeypatch):
    old, new, adv, mask = loss_batch(6)
    fipo = core_algos.get_policy_loss_fn("creditrl_fipo")
    kwargs = {"old_log_prob": old, "log_prob": new, "advantages": adv, "response_mask": mask,
              "loss_agg_mode": "token-mean", "config": actor_config("token-mean")}
    default, _ = fipo(**kwargs)
    monkeypatch.setenv(verl_adapter.PARAMS_ENV, '{"fipo": {"half_life": 2.0, "rho_high": 0.5}}')
    tuned, _ = fipo(**kwargs)
    _, token_weight = loss_hooks("fipo", {"half_life": 2.0, "rho_high": 0.5})
    ours, _ = policy_loss(new, old, adv, mask, loss_config("token-mean", 9), token_weight=token_weight)
    torch.testing.assert_close(tuned, ours, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(default, tuned)


# ---- step rewards: the layout, process-supervised GRPO and CAPO -------------------------------------
STEP_IDS = [[0, 0, 1, 1, 2, -1], [0, 1, 1, 1, -1, -1], [0, 0, 0, 1, 1, 1], [0, 1, 2, 2, 2, -1]]
STEP_REWARDS = [[0.5, 0.0, 1.0], [-1.0, 0.25, float("nan")], [0.0, 2.0, float("nan")], [1.0, -0.5, 0.75]]
GROUPS = [7, 3, 7, 3]


def marked_rewards() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """token_level_rewards as `creditrl_step_rewards` writes them for STEP_IDS / STEP_REWARDS."""
    rows = []
    for steps, rewards in zip(STEP_IDS, STEP_REWARDS):
        valid = [s for s in steps if s >= 0]
        n_steps = max(valid) + 1
        row = verl_adapter.token_rewards_from_steps(rewards[:n_steps], valid)
        rows.append(row + [0.0] * (len(steps) - len(valid)))
    mask = torch.tensor([[s >= 0 for s in steps] for steps in STEP_IDS]).long()
    return torch.tensor(rows), mask, np.array([f"uid{g}" for g in GROUPS], dtype=object)


def test_token_rewards_from_steps_marks_every_step_end():
    assert verl_adapter.token_rewards_from_steps([0.5, 0.0, 1.0], [0, 0, 1, 1, 2]) == [0.0, 0.5, 0.0,
                                                                                   verl_adapter.STEP_END_ZERO, 1.0]
    # step 1 owns no token: its reward joins the next step end
    assert verl_adapter.token_rewards_from_steps([1.0, 2.0, 3.0], [0, 0, 2]) == [0.0, 1.0, 5.0]
    rewards, mask, _ = marked_rewards()
    step_ids, step_rewards = verl_adapter.steps_from_markers(rewards, mask)
    assert step_ids.tolist() == STEP_IDS
    torch.testing.assert_close(step_rewards, torch.tensor(STEP_REWARDS), equal_nan=True, atol=1e-30, rtol=0)


def test_process_grpo_estimator_matches_creditrl():
    rewards, mask, uids = marked_rewards()
    got, _ = core_algos.get_adv_estimator_fn("creditrl_process_grpo")(
        token_level_rewards=rewards, response_mask=mask, index=uids, config=AlgoConfig())
    lengths = mask.sum(1).tolist()
    expected = compute_advantages("process_grpo", make_rollouts([0.0] * 4, GROUPS, lengths, step_ids=STEP_IDS,
                                                                step_rewards=STEP_REWARDS))
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    # verl's own GRPO sums the step rewards into one outcome: the trap the docs warn about
    summed, _ = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, uids)
    assert not torch.allclose(summed, got)


def test_capo_estimator_matches_creditrl_capo_token_advantages():
    rewards, mask, uids = marked_rewards()
    got, _ = core_algos.get_adv_estimator_fn("creditrl_capo")(token_level_rewards=rewards, response_mask=mask,
                                                              index=uids)
    # the same step rewards from a verdict and penalties: R = 2·r_v − 1·penalty
    correct = torch.tensor([True, False, True, False])
    penalties = torch.tensor([[1.5, 2.0, 1.0], [1.0, -0.25, 0.0], [2.0, 0.0, 2.0], [-1.0, 0.5, -0.75]])
    assert torch.allclose(2.0 * correct.float()[:, None] - penalties, torch.nan_to_num(torch.tensor(STEP_REWARDS)))
    expected = capo_token_advantages(correct, penalties, torch.tensor(STEP_IDS), mask.bool(), torch.tensor(GROUPS),
                                     CAPOParams())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_step_estimators_refuse_kl_in_reward():
    rewards, mask, uids = marked_rewards()
    with pytest.raises(ValueError, match="use_kl_in_reward"):
        verl_adapter.creditrl_process_grpo(rewards, mask, uids, config=AlgoConfig(use_kl_in_reward=True))


def test_prm_and_capo_step_reward_helpers():
    assert verl_adapter.prm_step_rewards([0.9, 0.2], outcome=1.0, outcome_weight=0.5) == [0.9, 0.7]
    assert verl_adapter.capo_step_rewards([{1}, {1, 2}, None], 3, correct=True, voting="intersection") == [
        2.0, 1.0, 2.0]


class CharTokenizer:
    """One token per character (ids are code points); 0 is a special token."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def step_reward_batch(texts: list[str], width: int = 12, with_dataset_fields: bool = True) -> DataProto:
    """What verl's legacy trainer hands the reward manager: char-token responses of `texts` after 3 prompt tokens."""
    responses = torch.zeros(len(texts), width, dtype=torch.long)
    attention = torch.zeros(len(texts), 3 + width, dtype=torch.long)
    attention[:, :3] = 1
    for row, text in enumerate(texts):
        responses[row, : len(text)] = torch.tensor([ord(c) for c in text])
        attention[row, 3 : 3 + len(text)] = 1
    fields = {"data_source": np.array(["lab"] * len(texts), dtype=object),
              "reward_model": np.array([{"ground_truth": "x"}] * len(texts), dtype=object)}
    return DataProto.from_dict(
        tensors={"prompts": torch.ones(len(texts), 3, dtype=torch.long), "responses": responses,
                 "attention_mask": attention},
        non_tensors=fields if with_dataset_fields else {"raw_prompt": np.array([[]] * len(texts), dtype=object)})


REWARD_MODEL = {"enable": True, "enable_resource_pool": False}  # verl's colocated reward-model path


def step_reward_manager(compute_score) -> verl_adapter.CreditrlStepRewardManager:
    config = OmegaConf.create({"reward": {"custom_reward_function": {"path": "my_reward.py"},
                                          "reward_model": REWARD_MODEL}})
    manager = verl_adapter.CreditrlStepRewardManager(config, CharTokenizer(), compute_score)
    manager.splitter = "newline"
    return manager


def score_all(manager, data: DataProto) -> list[dict]:
    async def all_rows():  # as verl's reward loop: the rows concurrently, in one event loop
        return await asyncio.gather(*(manager.run_single(data[i : i + 1]) for i in range(len(data))))
    return asyncio.run(all_rows())


def test_reward_manager_writes_step_rewards_on_step_ends():
    data = step_reward_batch(["One.\nTwo.\n", "Only\n"])

    def compute_score(data_source, solution_str, ground_truth, extra_info, steps):
        return {"score": np.float32(1.0), "step_rewards": [float(i + 1) for i in range(len(steps))],
                "note": "text" if len(steps) > 1 else 3}

    outputs = score_all(step_reward_manager(compute_score), data)
    scores = verl_adapter.CreditrlStepRewardManager.assemble_rm_scores(data, [o["reward_score"] for o in outputs])
    expected = torch.zeros(2, 12)
    expected[0, 4], expected[0, 9], expected[1, 4] = 1.0, 2.0, 1.0  # "One.\n" ends at 4, "Two.\n" at 9
    torch.testing.assert_close(scores, expected)
    # every response logs the same keys (verl takes them from the first), numbers as floats
    # (`acc`: the outcome, for verl's headline validation metric, which would otherwise sum the step rewards)
    assert outputs[0]["reward_extra_info"] == {"score": 1.0, "note": None, "acc": 1.0, "n_steps": 2}
    assert outputs[1]["reward_extra_info"] == {"score": 1.0, "note": 3.0, "acc": 1.0, "n_steps": 1}


def test_reward_manager_awaits_an_async_reward_function():
    async def compute_score(data_source, solution_str, ground_truth, extra_info, steps):
        await asyncio.sleep(0)
        return {"score": 0.0, "step_rewards": [0.5] * len(steps)}

    outputs = score_all(step_reward_manager(compute_score), step_reward_batch(["One.\nTwo.\n"]))
    assert outputs[0]["reward_score"][4] == outputs[0]["reward_score"][9] == 0.5


@pytest.mark.parametrize(("step_rewards", "batch_options", "message"), [
    ([1.0, float("nan")], {}, "step rewards must be finite"),
    ([1.0], {}, "2 steps but 1 step rewards"),
    ([1.0, 1.0], {"with_dataset_fields": False}, "set trainer.use_v1=false"),  # what the V1 trainer hands it
])
def test_reward_manager_refuses_what_it_cannot_lay_out(step_rewards, batch_options, message):
    manager = step_reward_manager(lambda **_: {"score": 1.0, "step_rewards": step_rewards})
    with pytest.raises(ValueError, match=re.escape(message)):
        score_all(manager, step_reward_batch(["One.\nTwo.\n"], **batch_options))


def test_reward_manager_needs_a_custom_reward_function():
    config = OmegaConf.create({"reward": {"custom_reward_function": {"path": None}, "reward_model": REWARD_MODEL}})
    with pytest.raises(ValueError, match=re.escape("needs reward.custom_reward_function.path")):
        verl_adapter.CreditrlStepRewardManager(config, CharTokenizer(), lambda **_: 0.0)


@pytest.mark.parametrize("reward_model", [{}, {"enable": False}, {"enable": True, "enable_resource_pool": True}])
def test_reward_manager_needs_the_colocated_reward_model_path(reward_model):
    config = OmegaConf.create({"reward": {"custom_reward_function": {"path": "my_reward.py"},
                                          "reward_model": reward_model}})
    with pytest.raises(ValueError, match=re.escape("set reward.reward_model.enable=true and")):
        verl_adapter.CreditrlStepRewardManager(config, CharTokenizer(), lambda **_: 0.0)


# ---- recipes ----------------------------------------------------------------------------------------
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "verl"


@pytest.mark.parametrize("recipe", ["grpo", "fipo", "grpo_lambda", "capo", "prm", "ppo"])
def test_recipes_name_registered_pieces(recipe):
    folder = RECIPES / recipe
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["defaults"] == ["ppo_trainer", "_self_"]
    assert core_algos.get_adv_estimator_fn(config["algorithm"]["adv_estimator"])
    assert core_algos.get_policy_loss_fn(config["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"])
    if "reward" in config:
        assert get_reward_manager_cls(config["reward"]["reward_manager"]["name"])
        assert config["reward"]["reward_model"]["enable"] and not config["reward"]["reward_model"][
            "enable_resource_pool"]
    command = "VERL_USE_EXTERNAL_MODULES=creditrl.integrations.verl python -m verl.trainer.main_ppo"
    assert command in (folder / "run.sh").read_text()
    assert command in (folder / "README.md").read_text() and "verl 0.9.1" in (folder / "README.md").read_text()


def _leaf_keys(node, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    return set().union(*(_leaf_keys(value, f"{prefix}.{key}" if prefix else key) for key, value in node.items()))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["grpo", "fipo", "grpo_lambda", "capo", "prm"])
def test_recipes_compose_and_pass_verls_own_config_checks(recipe, monkeypatch):
    """Hydra composes each recipe as `run.sh` launches it (verl's `ppo_trainer` below the recipe's
    overrides), every key the recipe sets exists in verl's config (Hydra itself would add a misspelt
    key silently), and verl's `validate_config` accepts the result, as `main_ppo` calls it."""
    hydra = pytest.importorskip("hydra")
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    monkeypatch.setenv("HOME", "/home/someone")
    folder = RECIPES / recipe
    overrides = (["reward.custom_reward_function.path=/abs/reward_fn.py"]
                 if "REWARD_FN" in (folder / "run.sh").read_text() else [])
    with hydra.initialize_config_dir(config_dir=str(folder), version_base=None):
        config = hydra.compose(config_name="config", overrides=overrides)
    with hydra.initialize_config_module(config_module="verl.trainer.config", version_base=None):
        verl_keys = _leaf_keys(OmegaConf.to_container(hydra.compose(config_name="ppo_trainer")))
    recipe_keys = _leaf_keys(yaml.safe_load((folder / "config.yaml").read_text())) - {"hydra.searchpath", "defaults"}
    assert recipe_keys <= verl_keys, f"not in verl's ppo_trainer: {sorted(recipe_keys - verl_keys)}"
    resolved = OmegaConf.to_container(config, resolve=True)
    assert resolved["data"]["train_files"] == "/home/someone/data/gsm8k/train.parquet"
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    algorithm = omega_conf_to_dataclass(config.algorithm)
    assert core_algos.get_adv_estimator_fn(algorithm.adv_estimator)


@pytest.mark.slow
def test_the_ppo_recipe_composes_from_verls_own_keys(monkeypatch):
    """The PPO recipe composes as `run.sh` launches it, with keys that all exist in verl's config.  (verl's
    `validate_config` is left out: with a critic it reads the critic model's config from the hub.)"""
    hydra = pytest.importorskip("hydra")
    from omegaconf import OmegaConf

    monkeypatch.setenv("HOME", "/home/someone")
    folder = RECIPES / "ppo"
    with hydra.initialize_config_dir(config_dir=str(folder), version_base=None):
        config = OmegaConf.to_container(hydra.compose(config_name="config"), resolve=True)
    with hydra.initialize_config_module(config_module="verl.trainer.config", version_base=None):
        verl_keys = _leaf_keys(OmegaConf.to_container(hydra.compose(config_name="ppo_trainer")))
    recipe_keys = _leaf_keys(yaml.safe_load((folder / "config.yaml").read_text())) - {"hydra.searchpath", "defaults"}
    assert recipe_keys <= verl_keys, f"not in verl's ppo_trainer: {sorted(recipe_keys - verl_keys)}"
    assert config["algorithm"]["adv_estimator"] == "gae" and config["algorithm"]["lam"] == 0.95
    assert config["critic"]["cliprange_value"] == 0.5 and config["critic"]["optim"]["lr"] == 1e-5
