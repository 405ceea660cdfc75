"""GRPO-family advantages, outcome reward shaping and the method registry, against hand-worked numbers."""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
import torch
from factories import make_rollouts
from pydantic import BaseModel, ConfigDict, ValidationError

import creditrl.config.plugins as plugins
import creditrl.methods.registry as registry
from creditrl.methods import (
    ADVANTAGES,
    RATIO_TRANSFORMS,
    TOKEN_WEIGHTS,
    Component,
    Method,
    UnknownMethodError,
    compute_advantages,
    get_method,
    known_methods,
    loss_hooks,
    method_params_model,
    register_advantage,
    register_token_weight,
)
from creditrl.methods.grpo import GRPOParams, ProcessGRPOParams, grpo, process_grpo, rloo
from creditrl.methods.loss import LossConfig, policy_loss
from creditrl.rewards import RewardConfig, outcome_rewards, overlong_penalty

NAN = float("nan")


def row_values(adv: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """The single value every response token of a row carries (and check padding is 0)."""
    assert torch.all(adv[~mask] == 0)
    values = []
    for b in range(adv.shape[0]):
        toks = adv[b][mask[b]]
        assert torch.all(toks == toks[0]) if len(toks) else True
        values.append(toks[0].item() if len(toks) else 0.0)
    return values


# --- GRPO -----------------------------------------------------------------------------------


def test_grpo_hand_worked():
    # rewards [1, 0, 0, 1]: mean 0.5, unbiased var = 4·0.25/3 = 1/3, std = 0.577350;
    # A = ±0.5 / 0.577350 = ±0.866025 (eps = 1e-6 moves it by ~1.5e-6)
    ro = make_rollouts([1, 0, 0, 1], [0, 0, 0, 0], [3, 1, 2, 4])
    adv = grpo(ro, GRPOParams())
    assert adv.shape == (4, 4)
    assert row_values(adv, ro.response_mask) == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)


def test_grpo_groups_need_not_be_contiguous():
    # group 7 = rows 0, 2 with rewards [1, 0]: mean 0.5, std = sqrt(0.5) = 0.707107 -> ±0.707107
    # group 3 = rows 1, 3, 4 with rewards [0, 2, 1]: mean 1, var (1+1+0)/2 = 1 -> [-1, 1, 0]
    # group 9 = row 5 alone -> 0; group 5 = rows 6, 7 all equal -> 0
    ro = make_rollouts([1, 0, 0, 2, 1, 5, 3, 3], [7, 3, 7, 3, 3, 9, 5, 5], [2, 2, 2, 2, 2, 2, 2, 2])
    adv = grpo(ro, GRPOParams())
    expected = [0.707107, -1.0, -0.707107, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert row_values(adv, ro.response_mask) == pytest.approx(expected, abs=1e-5)


def test_grpo_matches_statistics_module():
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 5, (40,), generator=g).tolist()
    rewards = torch.randn(40, generator=g).tolist()
    ro = make_rollouts(rewards, groups, [3] * 40)
    adv = row_values(grpo(ro, GRPOParams(eps=1e-6)), ro.response_mask)
    for i, (gid, r) in enumerate(zip(groups, rewards)):
        members = [rewards[j] for j in range(40) if groups[j] == gid]
        if len(members) < 2:
            assert adv[i] == 0.0
        else:
            assert adv[i] == pytest.approx((r - statistics.mean(members)) / (statistics.stdev(members) + 1e-6),
                                           rel=1e-9)


def test_dr_grpo_drops_the_std():
    # [1, 0, 0, 1] minus the group mean 0.5, no division: ±0.5
    ro = make_rollouts([1, 0, 0, 1], [0, 0, 0, 0], [2, 2, 2, 2])
    adv = compute_advantages("dr_grpo", ro)
    assert row_values(adv, ro.response_mask) == pytest.approx([0.5, -0.5, -0.5, 0.5])
    # the user can turn the std back on
    adv = compute_advantages("dr_grpo", ro, {"scale_by_std": True})
    assert row_values(adv, ro.response_mask) == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)


# --- RLOO -----------------------------------------------------------------------------------


def test_rloo_hand_worked():
    # group 0: [1, 0, 0, 0] -> 1 − 0 = 1; 0 − 1/3 = −1/3 for the others
    # group 1: [2, 1, 0] -> 2 − 0.5 = 1.5; 1 − 1 = 0; 0 − 1.5 = −1.5
    # group 2: one row -> 0
    ro = make_rollouts([1, 0, 2, 0, 1, 0, 0, 4], [0, 0, 1, 0, 1, 0, 1, 2], [1, 2, 3, 1, 2, 3, 1, 2])
    adv = rloo(ro, registry.NoParams())
    expected = [1.0, -1 / 3, 1.5, -1 / 3, 0.0, -1 / 3, -1.5, 0.0]
    assert row_values(adv, ro.response_mask) == pytest.approx(expected)


def test_rloo_is_scaled_centering():
    # Independent identity: R_i − mean_{j≠i} R_j = n/(n−1) · (R_i − mean R)
    rewards = [0.3, -1.2, 2.0, 0.7, 0.1]
    ro = make_rollouts(rewards, [0] * 5, [1] * 5)
    mean = sum(rewards) / 5
    assert row_values(rloo(ro, registry.NoParams()), ro.response_mask) == pytest.approx(
        [5 / 4 * (r - mean) for r in rewards])


# --- process-supervised GRPO ----------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.1, 0.7, -0.3])
@pytest.mark.parametrize("size", [6, 7, 8])
def test_a_group_of_equal_float32_rewards_gets_exactly_zero_advantage(value, size):
    """-0.1 is what a format penalty gives every row of a wrong, unformatted group: float32 group
    statistics left the whole group a push of ±0.01–0.06 that nothing in the rewards asked for."""
    r = make_rollouts([value] * size, [0] * size, [3] * size, step_rewards=[[value, value]] * size)
    r.rewards, r.step_rewards = r.rewards.float(), r.step_rewards.float()
    for name in ("grpo", "rloo", "grpo_lambda", "process_grpo"):
        adv = compute_advantages(name, r)
        assert adv.dtype == torch.float32 and torch.equal(adv, torch.zeros_like(adv)), name
    # CAPO at the paper's W_process = 0.1 ablation: every response wrong, every step flagged
    from creditrl.methods.capo import CAPOParams, capo_token_advantages

    penalties = torch.ones(size, 1)
    adv = capo_token_advantages(torch.zeros(size, dtype=torch.bool), penalties, r.step_ids, r.response_mask,
                                r.group_ids, CAPOParams(w_process=-value if value < 0 else value))
    assert torch.equal(adv, torch.zeros_like(adv))


def test_an_empty_batch_gets_an_empty_advantage():
    r = make_rollouts([], [], [], T=3)
    r.step_rewards = torch.zeros(0, 2)
    for name in ("grpo", "rloo", "process_grpo"):
        assert compute_advantages(name, r).shape == (0, 3), name


def test_process_grpo_hand_worked():
    # Response 0 has steps with rewards [1, 0, 1]; response 1 has [0, 1] (third absent).
    # All valid steps of the group: [1, 0, 1, 0, 1]: mean 0.6; squared deviations
    # .16 .36 .16 .36 .16 sum to 1.2, unbiased var 0.3, std 0.547723.
    # Normalised: 1 -> 0.4/0.547723 = 0.730297, 0 -> −0.6/0.547723 = −1.095445.
    # Response 0 suffix sums: step 0: 0.730297 − 1.095445 + 0.730297 = 0.365148,
    #                         step 1: −1.095445 + 0.730297 = −0.365148, step 2: 0.730297.
    # Response 1 suffix sums: step 0: −1.095445 + 0.730297 = −0.365148, step 1: 0.730297.
    ro = make_rollouts(
        [0, 0],
        [4, 4],
        [5, 3],
        step_ids=[[0, 0, 1, 2, 2, -1], [0, 1, 1, -1, -1, -1]],
        step_rewards=[[1.0, 0.0, 1.0], [0.0, 1.0, NAN]],
    )
    adv = process_grpo(ro, ProcessGRPOParams())
    a, b, c = 0.365148, -0.365148, 0.730297
    expected = torch.tensor([[a, a, b, c, c, 0.0], [b, c, c, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(adv, expected, atol=1e-5)


def test_process_grpo_edge_cases():
    # group 0: a single valid step in the whole group -> 0; group 1: two rows, steps beyond S get 0
    ro = make_rollouts(
        [0, 0, 0],
        [0, 1, 1],
        [2, 2, 3],
        step_ids=[[0, 0, -1], [0, 1, -1], [0, 0, 2]],
        step_rewards=[[1.0, NAN], [1.0, NAN], [3.0, NAN]],
    )
    adv = process_grpo(ro, ProcessGRPOParams())
    # group 1 steps [1, 3]: mean 2, std sqrt(2): ∓0.707107; row 1's step 1 is absent -> 0
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[0.0, 0.0, 0.0], [-r, 0.0, 0.0], [r, r, 0.0]], dtype=torch.float64)
    assert torch.allclose(adv, expected, atol=1e-5)


def test_process_grpo_needs_step_rewards():
    ro = make_rollouts([1, 0], [0, 0], [2, 2])
    with pytest.raises(ValueError, match="step_rewards"):
        process_grpo(ro, ProcessGRPOParams())
    with pytest.raises(ValueError, match="step_rewards"):
        compute_advantages("process_grpo", ro)
    assert get_method("process_grpo").needs_step_rewards


# --- rewards --------------------------------------------------------------------------------


def test_overlong_penalty_boundaries():
    # L_max = 10, L_cache = 4: free up to 6, then (6 − |o|)/4, −1 beyond 10
    lengths = torch.tensor([0, 6, 7, 8, 10, 11, 50])
    assert overlong_penalty(lengths, 10, 4).tolist() == pytest.approx([0, 0, -0.25, -0.5, -1.0, -1.0, -1.0])
    # no buffer: hard cut beyond L_max
    assert overlong_penalty(torch.tensor([10, 11]), 10, 0).tolist() == [0.0, -1.0]


def test_outcome_rewards():
    correct = torch.tensor([True, False, True, True, False])
    lengths = torch.tensor([8, 11, 3, 3, 3])
    format_ok = torch.tensor([True, True, True, False, False])
    # DAPO-style ±1 with overlong shaping (L_max 10, L_cache 4, scale 0.5):
    # 1 + 0.5·(−0.5) = 0.75; −1 + 0.5·(−1) = −1.5; 1; 1 (format ignored); −1
    cfg = RewardConfig(correct=1.0, wrong=-1.0, overlong_max=10, overlong_buffer=4, overlong_penalty=0.5)
    assert outcome_rewards(correct, lengths, format_ok, cfg).tolist() == pytest.approx([0.75, -1.5, 1.0, 1.0, -1.0])
    # format required: a bad-format response is wrong and loses format_weight: −1 − 0.5 = −1.5
    cfg = RewardConfig(correct=1.0, wrong=-1.0, format_weight=0.5)
    assert outcome_rewards(correct, lengths, format_ok, cfg).tolist() == pytest.approx([1.0, -1.0, 1.0, -1.5, -1.5])
    # defaults: 1 / 0, no shaping
    assert outcome_rewards(correct, lengths, format_ok, RewardConfig()).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_reward_config_validation():
    with pytest.raises(ValidationError, match="overlong_buffer"):
        RewardConfig(overlong_max=10, overlong_buffer=11)
    with pytest.raises(ValidationError, match="format_weight"):
        RewardConfig(format_weight=-1)
    with pytest.raises(ValidationError):
        RewardConfig(bonus=1)


# --- registry -------------------------------------------------------------------------------


def test_unknown_method_lists_known_names():
    with pytest.raises(UnknownMethodError) as info:
        get_method("grpoo")
    assert isinstance(info.value, ValueError)
    listed = str(info.value).split("known methods: ")[1].split(", ")
    assert listed == sorted(known_methods())
    assert {"grpo", "dr_grpo", "dapo", "rloo", "process_grpo"} <= set(listed)


def test_method_params_validation_names_the_field():
    model = method_params_model("grpo")
    assert model().model_dump() == {"eps": 1e-6, "scale_by_std": True}
    with pytest.raises(ValidationError, match="eps"):
        model(eps=-1.0)
    with pytest.raises(ValidationError, match="lam"):
        model(lam=0.9)
    assert method_params_model("rloo")().model_dump() == {}


def test_published_defaults():
    dapo = get_method("dapo").defaults
    assert dapo["loss.eps_low"] == 0.2 and dapo["loss.eps_high"] == 0.28 and dapo["loss.agg"] == "token-mean"
    assert dapo["reward.correct"] == 1.0 and dapo["reward.wrong"] == -1.0
    assert dapo["rollout.dynamic_sampling"] is True and dapo["rollout.max_num_gen_batches"] == 10
    assert get_method("grpo").defaults["loss.agg"] == "seq-mean-token-mean"
    assert get_method("dr_grpo").defaults["loss.agg"] == "seq-mean-token-sum-norm"
    assert method_params_model("dr_grpo")().scale_by_std is False
    assert get_method("rloo").defaults["loss.agg"] == "token-mean"
    # every built-in default is valid for its section
    for name in known_methods():
        defaults = get_method(name).defaults
        LossConfig(**{k[5:]: v for k, v in defaults.items() if k.startswith("loss.")})
        RewardConfig(**{k[7:]: v for k, v in defaults.items() if k.startswith("reward.")})
        method_params_model(name)()


def test_ad_hoc_method_and_loss_hooks(monkeypatch):
    class ScaleParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        scale: float = 2.0

    monkeypatch.setitem(RATIO_TRANSFORMS, "test_scale", Component(lambda d, m, p: d * p.scale, ScaleParams))
    method = Method("mine", advantage="grpo", ratio_transform="test_scale")
    params = method_params_model(method)(scale=3.0, scale_by_std=False)
    ratio_transform, token_weight = loss_hooks(method, params)
    assert token_weight is None
    assert ratio_transform(torch.tensor([1.0, 2.0]), torch.ones(2, dtype=torch.bool)).tolist() == [3.0, 6.0]
    assert loss_hooks("grpo") == (None, None)
    with pytest.raises(UnknownMethodError, match="test_scale"):
        method_params_model(Method("bad", advantage="grpo", ratio_transform="nope"))


def test_registered_token_weight_runs_inside_the_loss():
    class HalfParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        factor: float = 0.5

    @register_token_weight("test_half", params=HalfParams)
    def half(advantages, delta, mask, params):
        return torch.full_like(advantages, params.factor)

    try:
        method = Method("halved", advantage="rloo", token_weight="test_half")
        ro = make_rollouts([1.0, 0.0], [0, 0], [2, 1])
        params = method_params_model(method)()
        adv = compute_advantages(method, ro, params)  # rows: +1 on 2 tokens, −1 on 1 token
        _, token_weight = loss_hooks(method, params)
        logp = torch.zeros(2, 2, dtype=torch.float64)
        loss, metrics = policy_loss(logp, logp, adv, ro.response_mask, LossConfig(), token_weight=token_weight)
        # r = 1 everywhere, A·f = [0.5, 0.5, −0.5]: token-mean of −A·f = (−0.5 − 0.5 + 0.5)/3
        assert loss.item() == pytest.approx(-0.5 / 3)
        assert metrics["weight_mean"].item() == pytest.approx(0.5)
    finally:
        TOKEN_WEIGHTS.pop("test_half")


def test_conflicting_params_are_rejected(monkeypatch):
    class Clash(BaseModel):
        model_config = ConfigDict(extra="forbid")
        eps: float = 0.5

    monkeypatch.setitem(RATIO_TRANSFORMS, "test_clash", Component(lambda d, m, p: d, Clash))
    with pytest.raises(TypeError, match="eps"):
        method_params_model(Method("clash", advantage="grpo", ratio_transform="test_clash"))
    with pytest.raises(ValueError, match="nope"):
        registry.register_method(Method("bad_default", advantage="grpo", defaults={"method_params.nope": 1}))


def test_advantage_needs_come_from_the_context(monkeypatch):
    @register_advantage("test_needs", needs=("sampler",))
    def needs_sampler(rollouts, params, sampler):
        return torch.full(rollouts.response_mask.shape, float(sampler))

    try:
        method = Method("needs", advantage="test_needs")
        ro = make_rollouts([1, 0], [0, 0], [1, 2])
        with pytest.raises(ValueError, match="sampler"):
            compute_advantages(method, ro)
        adv = compute_advantages(method, ro, sampler=2, critic="unused")
        assert adv.tolist() == [[2.0, 0.0], [2.0, 2.0]]  # masked to the response
    finally:
        ADVANTAGES.pop("test_needs")


class FakeEntryPoint:
    def __init__(self, name, obj=None, error=None):
        self.name, self.value, self._obj, self._error = name, f"fake:{name}", obj, error

    def load(self):
        if self._error:
            raise self._error
        return self._obj


def test_entry_point_plugins(monkeypatch):
    plugin = Method("plugin_method", advantage="rloo", summary="from a plugin")
    eps = [FakeEntryPoint("broken", error=ImportError("no module named nowhere")), FakeEntryPoint("good", obj=[plugin])]
    monkeypatch.setattr(plugins, "entry_points", lambda group: eps if group == "creditrl.methods" else [])
    monkeypatch.setattr(plugins, "_loaded", set())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = known_methods()
        assert "plugin_method" in names
        assert any("broken" in str(w.message) for w in caught)
        assert get_method("plugin_method") is plugin
    finally:
        registry.METHODS.pop("plugin_method", None)
