"""creditrl.integrations.trl: creditrl methods inside TRL's GRPOTrainer, on the tiny lab model (CPU).

(1) with `grpo` the adapter trains exactly as TRL's own GRPOTrainer; (2) FIPO's token weights reach
the loss; (3) CAPO with the oracle critic uses, and logs, the per-token advantages creditrl computes.
"""

import copy
import re
import warnings

import pytest
import torch

pytest.importorskip("trl")

import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import creditrl.integrations.trl as adapter  # noqa: E402
from creditrl.collect import aligned_step_labels, response_steps  # noqa: E402
from creditrl.critics import OracleLabCritic  # noqa: E402
from creditrl.integrations.trl import CreditGRPOTrainer  # noqa: E402
from creditrl.methods import compute_advantages  # noqa: E402
from creditrl.policy.loading import load_model_and_tokenizer, load_policy  # noqa: E402
from creditrl.rollouts import Rollouts, pad_right  # noqa: E402
from creditrl.tasks.lab import LabTask, LabTaskConfig  # noqa: E402

transformers.utils.logging.set_verbosity_error()

TASK = LabTask(LabTaskConfig(train_size=16, eval_size=2))
PROBLEMS = TASK.train_problems()
DATASET = Dataset.from_dict({"prompt": [p.prompt + "\n" for p in PROBLEMS], "problem": list(range(len(PROBLEMS)))})


def lab_reward(completions, problem, **_):
    """The lab verifier's verdict, plus the share of digits in the completion: the tiny random model is
    never right, and the digit share gives its completions different rewards (non-zero advantages)."""
    return [float(TASK.verify(PROBLEMS[i], text).correct) + sum(c.isdigit() for c in text) / max(len(text), 1)
            for i, text in zip(problem, completions)]


def make_args(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                    seed=0, per_device_train_batch_size=4, num_generations=2, max_completion_length=12, max_steps=2,
                    logging_steps=1, learning_rate=1e-2, num_iterations=2, disable_tqdm=True)
    return GRPOConfig(**{**settings, **overrides})


def lab_reward_or_none(completions, problem, **kwargs):
    """`lab_reward`, but None (unscorable) for the last of every 4 completions: one in each group of 4."""
    return [None if i % 4 == 3 else r for i, r in enumerate(lab_reward(completions, problem, **kwargs))]


def train(trainer_class, model_dir, args, reward=lab_reward, **kwargs):
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    trainer = trainer_class(model=model, reward_funcs=reward, args=args, train_dataset=DATASET,
                            processing_class=tokenizer, **kwargs)
    trainer.train()
    return trainer


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ---- (1) grpo through the adapter is TRL's GRPO --------------------------------------------------

@pytest.mark.parametrize("options", [
    pytest.param({}, id="dapo-two-iterations", marks=pytest.mark.slow),
    pytest.param({"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": False}, id="grpo-kl"),
    pytest.param({"loss_type": "dr_grpo", "delta": 1.5}, id="dr_grpo-two-sided-clip", marks=pytest.mark.slow),
    pytest.param({"loss_type": "dapo", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                  "num_iterations": 1}, id="dapo-accumulation", marks=pytest.mark.slow),
    pytest.param({"loss_type": "bnpo", "per_device_train_batch_size": 2, "steps_per_generation": 2,
                  "num_iterations": 1}, id="bnpo-two-minibatches", marks=pytest.mark.slow),
    pytest.param({"loss_type": "grpo", "mask_truncated_completions": True}, id="grpo-masked-truncations",
                 marks=pytest.mark.slow),
    pytest.param({"loss_type": "grpo", "num_generations": 4, "reward": lab_reward_or_none}, id="grpo-unscorable",
                 marks=pytest.mark.slow),
])
def test_grpo_matches_trl(tiny_lab_model_dir, tmp_path, options):
    options = dict(options)
    reward = options.pop("reward", lab_reward)
    args = make_args(tmp_path, **options)
    ours = train(CreditGRPOTrainer, tiny_lab_model_dir, args, reward, method="grpo",
                 method_params={"eps": 1e-4})  # TRL's eps
    theirs = train(GRPOTrainer, tiny_lab_model_dir, args, reward)

    for mine, trl in zip(step_logs(ours), step_logs(theirs), strict=True):
        assert mine["loss"] == pytest.approx(trl["loss"], rel=1e-4, abs=1e-7)
        assert mine["entropy"] == pytest.approx(trl["entropy"], rel=1e-5)
    assert any(entry["loss"] != 0 for entry in step_logs(theirs))  # the comparison is not between two zeros
    for (name, mine), (_, trl) in zip(ours.model.named_parameters(), theirs.model.named_parameters(), strict=True):
        torch.testing.assert_close(mine, trl, rtol=1e-4, atol=1e-6, msg=name)


def test_a_response_fipo_drops_leaves_its_neighbours_gradient_as_trls_global_token_count_sets_it():
    """loss_type "dapo" divides by the generation batch's token count (16 here), dropped tokens included, as verl
    does: a kept token's gradient is −A/16 whether or not a neighbour in its micro-batch was dropped."""
    from types import SimpleNamespace

    from creditrl.methods import get_method, loss_hooks
    from creditrl.methods.loss import LossConfig

    big = float(torch.tensor(20.0).log())  # r = 20 > c = 10
    ratio_transform, token_weight = loss_hooks(get_method("fipo"), {})
    fake = SimpleNamespace(loss_type="dapo", current_gradient_accumulation_steps=1,
                           args=SimpleNamespace(steps_per_generation=1),
                           loss_config=LossConfig(eps_high=0.28, dual_clip=10.0), ratio_transform=ratio_transform,
                           token_weight=token_weight, surrogate=None, model=SimpleNamespace(training=True),
                           _log_loss_metrics=lambda *logged: None,
                           accelerator=SimpleNamespace(num_processes=1))
    fake._loss_scale = lambda *a: CreditGRPOTrainer._loss_scale(fake, *a)
    grads = []
    for second_row in ([big, big, 0.0, 0.0], [0.0] * 4):  # two exploded negative tokens drop it, or not
        logps = torch.tensor([[0.0] * 4, second_row], dtype=torch.float64, requires_grad=True)
        fake._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
        inputs = {"prompt_ids": torch.zeros(2, 1, dtype=torch.long), "prompt_mask": torch.ones(2, 1, dtype=torch.long),
                  "completion_ids": torch.zeros(2, 4, dtype=torch.long),
                  "completion_mask": torch.ones(2, 4, dtype=torch.long),
                  "old_per_token_logps": torch.zeros(2, 4, dtype=torch.float64),
                  "advantages": torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=torch.float64),
                  "num_items_in_batch": torch.tensor(16.0)}
        CreditGRPOTrainer._compute_loss(fake, None, inputs).backward()
        grads.append(logps.grad[0, 0].item())
    assert grads == pytest.approx([-1 / 16, -1 / 16])


# ---- (2) FIPO's token weights reach the loss -----------------------------------------------------

@pytest.mark.slow
def test_fipo_token_weights_are_applied(tiny_lab_model_dir, tmp_path):
    calls = []

    class SpiedFIPO(CreditGRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            weight = self.token_weight

            def spy(advantages, delta, mask):
                out = weight(advantages, delta, mask)
                f = out[0] if isinstance(out, tuple) else out  # (f, keep): FIPO may drop responses
                calls.append((advantages.shape, delta.shape, mask.shape, f[mask].clone()))
                return out

            self.token_weight = spy

    args = make_args(tmp_path)
    fipo = train(SpiedFIPO, tiny_lab_model_dir, args, method="fipo")
    grpo = train(CreditGRPOTrainer, tiny_lab_model_dir, args, method="grpo")

    assert len(calls) == 2  # one loss per step
    batch, width = args.per_device_train_batch_size, args.max_completion_length
    for adv_shape, delta_shape, mask_shape, _ in calls:
        assert adv_shape[0] == delta_shape[0] == mask_shape[0] == batch
        assert adv_shape == delta_shape == mask_shape and adv_shape[1] <= width
    assert torch.equal(calls[0][3], torch.ones_like(calls[0][3]))  # step 1: π_θ = π_old, Δ = 0, f = 1
    assert (calls[1][3] != 1).any()  # step 2 reuses the batch after an update: Δ ≠ 0
    first, second = step_logs(fipo)
    assert first["creditrl/weight_mean"] == 1 and second["creditrl/weight_mean"] != 1
    same_first, differs_second = step_logs(grpo)
    assert first["loss"] == pytest.approx(same_first["loss"], rel=1e-6)
    assert second["loss"] != pytest.approx(differs_second["loss"], rel=1e-6)


@pytest.mark.parametrize(("num_iterations", "steps_per_generation", "accumulation", "warns"), [
    (1, 1, 1, True),
    (2, 1, 2, True),  # both passes over the batch fall in one optimizer step
    (2, 1, 1, False),
    (1, 2, 3, False),  # some micro-batches are trained after an optimizer step: TRL keeps old log-probs
])
def test_fipo_warns_exactly_when_trl_keeps_no_old_logprobs(tiny_lab_model_dir, tmp_path, num_iterations,
                                                          steps_per_generation, accumulation, warns):
    """TRL computes old log-probs only when gradient_accumulation_steps % (steps_per_generation ×
    num_iterations) != 0; otherwise Δ = 0 in the loss and FIPO's weights are all 1."""
    model, tokenizer = load_model_and_tokenizer(str(tiny_lab_model_dir))
    args = make_args(tmp_path, num_iterations=num_iterations, steps_per_generation=steps_per_generation,
                     gradient_accumulation_steps=accumulation)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CreditGRPOTrainer(model=model, reward_funcs=lab_reward, args=args, train_dataset=DATASET,
                          processing_class=tokenizer, method="fipo")
    assert any("base method" in str(w.message) and "fipo" in str(w.message) for w in caught) == warns


# ---- (3) CAPO with the oracle critic: the advantages used and logged are creditrl's -----------------

def independent_rollouts(policy, batch, inputs) -> Rollouts:
    """The batch as creditrl's own collector would see it: steps from the policy's tokenizer, verdicts
    and step labels from the lab verifier, groups of num_generations = 2 rows."""
    mask = batch["completion_mask"].bool()
    ids = [batch["completion_ids"][b][mask[b]].tolist() for b in range(len(mask))]
    texts, steps = zip(*(response_steps(policy, row, TASK.step_splitter) for row in ids))
    verdicts = [TASK.verify(PROBLEMS[x["problem"]], text) for x, text in zip(inputs, texts)]
    n_steps = [max(s) + 1 for s in steps]
    return Rollouts(
        prompt_ids=batch["prompt_ids"], prompt_mask=batch["prompt_mask"].bool(),
        response_ids=batch["completion_ids"], response_mask=mask, group_ids=torch.arange(len(mask)) // 2,
        step_ids=pad_right([torch.tensor(s) for s in steps], -1, width=mask.shape[1]),
        rewards=torch.zeros(len(mask)), correct=torch.tensor([v.correct for v in verdicts]),
        truncated=torch.zeros(len(mask), dtype=torch.bool),
        step_labels=pad_right([aligned_step_labels(v.step_correct, n) for v, n in zip(verdicts, n_steps)], -1),
    )


def test_capo_logs_the_advantages_it_uses(tiny_lab_model_dir, tmp_path, monkeypatch):
    batches, used = [], []

    class Recorded(CreditGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            critic = copy.deepcopy(self.resources["critic"])  # its random state before this batch's verdicts
            batch = super()._generate_and_score_completions(inputs)
            batches.append((inputs, {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}, critic))
            return batch

    real_loss = adapter.policy_loss

    def recording_loss(logprobs, old_logprobs, advantages, mask, cfg, **kwargs):
        used.append(advantages.clone())
        return real_loss(logprobs, old_logprobs, advantages, mask, cfg, **kwargs)

    monkeypatch.setattr(adapter, "policy_loss", recording_loss)
    # The tiny model's steps are all wrong; an oracle of recall 0.5 with one critique flags half of them at
    # random, so token rewards differ within a group and the advantages are not all 0.
    critic = OracleLabCritic(recall=0.5, precision=1.0, seed=0)
    trainer = train(Recorded, tiny_lab_model_dir, make_args(tmp_path, num_iterations=1), method="capo",
                    method_params={"k": 1}, resources={"critic": critic}, task=TASK,
                    problem_of=lambda x: PROBLEMS[x["problem"]])

    policy = load_policy(str(tiny_lab_model_dir))
    assert len(batches) == len(used) == 2
    for (inputs, batch, critic_before), in_loss in zip(batches, used):
        expected = compute_advantages("capo", independent_rollouts(policy, batch, inputs), trainer.method_params,
                                      critic=critic_before)
        assert expected.abs().sum() > 0
        torch.testing.assert_close(batch["advantages"], expected)
        for row in in_loss:  # TRL shuffles the rows of a generation batch before the loss
            assert any(torch.allclose(row, candidate) for candidate in expected)

    mask = batch["completion_mask"].bool()
    lengths = mask.sum(dim=1)
    logged_tokens = list(trainer._logs["extra"]["token_advantages"])
    assert logged_tokens == [row[:n].tolist() for row, n in zip(expected, lengths.tolist())]
    assert list(trainer._logs["advantages"]) == pytest.approx((expected.sum(dim=1) / lengths).tolist())


# ---- TRL's own GSPO, CISPO, SAPO and 80/20 options are creditrl methods ------------------------------

@pytest.mark.parametrize(("method", "our_options", "trl_options"), [
    ("cispo", {"loss_type": "dapo", "epsilon": 1.0, "epsilon_high": 4.0}, {"loss_type": "cispo", "epsilon_high": 5.0}),
    ("sapo", {"loss_type": "grpo"}, {"loss_type": "sapo"}),
    # GSPO-token and TRL's sequence ratio reach the same gradient through different float32 sums; Adam's first
    # step, about g/|g|, would blow their rounding up where g ≈ 0, so these two runs take plain SGD steps
    pytest.param("gspo", {"loss_type": "grpo", "epsilon": 3e-4, "epsilon_high": 4e-4, "optim": "sgd"},
                 {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4,
                  "optim": "sgd"}, marks=pytest.mark.slow),
    pytest.param("high_entropy", {"loss_type": "grpo"}, {"loss_type": "grpo", "top_entropy_quantile": 0.2},
                 marks=pytest.mark.slow),
])
def test_trls_own_losses_match_the_creditrl_methods(tiny_lab_model_dir, tmp_path, method, our_options, trl_options):
    ours = train(CreditGRPOTrainer, tiny_lab_model_dir, make_args(tmp_path, **our_options), method=method,
                 method_params={"eps": 1e-4})  # TRL's eps
    theirs = train(GRPOTrainer, tiny_lab_model_dir, make_args(tmp_path, **trl_options))
    for mine, trl in zip(step_logs(ours), step_logs(theirs), strict=True):
        assert mine["loss"] == pytest.approx(trl["loss"], rel=1e-4, abs=1e-7)
    assert any(entry["loss"] != 0 for entry in step_logs(theirs))
    for (name, mine), (_, trl) in zip(ours.model.named_parameters(), theirs.model.named_parameters(), strict=True):
        torch.testing.assert_close(mine, trl, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_ktae_uses_the_key_token_advantages_of_trls_completions(tiny_lab_model_dir, tmp_path):
    from test_ktae import _reference  # the float64 loop KTAE is tested against

    batches = []

    class Recorded(CreditGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            batch = super()._generate_and_score_completions(inputs)
            batches.append(({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)},
                             self._rewards_per_func.sum(dim=1).tolist()))
            return batch

    def digits_minus_a_third(completions, problem, **kwargs):  # rewards on both sides of 0: correct and wrong rows
        return [r - 1 / 3 for r in lab_reward(completions, problem, **kwargs)]

    trainer = train(Recorded, tiny_lab_model_dir, make_args(tmp_path, num_iterations=1, num_generations=4,
                                                            per_device_train_batch_size=8),
                    digits_minus_a_third, method="ktae")
    weighted = 0
    for batch, rewards in batches:
        mask = batch["completion_mask"].bool()
        rows = [batch["completion_ids"][b][mask[b]].tolist() for b in range(len(mask))]
        truncated = [not row or row[-1] not in trainer.eos_token_ids for row in rows]
        groups = [b // 4 for b in range(len(rows))]
        expected = _reference(rows, rewards, groups, truncated)
        grpo_only = _reference(rows, rewards, groups, truncated, top=1e-12)
        for b, row in enumerate(expected):
            assert batch["advantages"][b, :len(row)].tolist() == pytest.approx(row, abs=1e-5)
            weighted += sum(abs(x - y) > 1e-3 for x, y in zip(row, grpo_only[b]))
    assert weighted > 0  # some tokens carry a key-token weight


# ---- methods TRL cannot feed ----------------------------------------------------------------------

@pytest.mark.parametrize(("method", "resources", "reason"), [
    ("denser", None, "hidden states"),
    ("vineppo", None, "continuations"),
    ("spo", None, "continuations"),
    ("ppo", None, "value model trains alongside the policy"),
    ("prime", None, "implicit PRM trains alongside the policy"),
    ("capo", None, "resources={'critic': ...}"),
])
def test_unsupported_methods_say_why(method, resources, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        CreditGRPOTrainer(method=method, resources=resources)


def test_a_method_on_step_rewards_needs_a_task_before_any_model_is_loaded():
    with pytest.raises(ValueError,
                       match=re.escape("method 'process_grpo' needs step rewards: give task and problem_of")):
        CreditGRPOTrainer(method="process_grpo")


@pytest.mark.parametrize(("options", "trainer_options", "reason"), [
    ({"loss_type": "sapo"}, {}, "pass method='sapo' with loss_type='grpo'"),
    ({"loss_type": "cispo"}, {}, "pass method='cispo' with loss_type='dapo'"),
    ({"importance_sampling_level": "sequence"}, {}, "pass method='gspo'"),
    ({"loss_type": "luspo"}, {}, "supports loss_type"),
    ({"beta": 0.04}, {}, "use_bias_correction_kl=False"),  # TRL's default multiplies the KL term by the ratio
    ({"top_entropy_quantile": 0.5}, {}, "pass method='high_entropy'"),
    ({"delta": 1.1}, {}, "delta < 1 + epsilon_high"),  # TRL would also cap the ratio of positive advantages
    ({}, {"rollout_func": lambda prompts, trainer: {}}, "rollout_func"),
])
def test_unsupported_trl_options_are_refused(tiny_lab_model_dir, tmp_path, options, trainer_options, reason):
    model, tokenizer = load_model_and_tokenizer(str(tiny_lab_model_dir))
    with pytest.raises(ValueError, match=re.escape(reason)):
        CreditGRPOTrainer(model=model, reward_funcs=lab_reward, args=make_args(tmp_path, **options),
                          train_dataset=DATASET, processing_class=tokenizer, method="grpo", **trainer_options)


def test_an_eval_batch_larger_than_the_generation_batch_logs_its_advantages(tiny_lab_model_dir, tmp_path):
    """TRL's advantage log holds one generation batch (4 here); an eval batch of 8 overfills it."""
    model, tokenizer = load_model_and_tokenizer(str(tiny_lab_model_dir))
    trainer = CreditGRPOTrainer(model=model, reward_funcs=lab_reward, train_dataset=DATASET, eval_dataset=DATASET,
                                args=make_args(tmp_path, per_device_eval_batch_size=8), processing_class=tokenizer,
                                method="grpo")
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and len(trainer._logs["advantages"]) == 4


# ---- (4) LoRA through TRL's own peft_config --------------------------------------------------------

@pytest.mark.slow
def test_lora_through_peft_config_matches_trl(tiny_lab_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           init_lora_weights="gaussian")
    args = make_args(tmp_path)
    torch.manual_seed(0)
    ours = train(CreditGRPOTrainer, tiny_lab_model_dir, args, method="grpo", method_params={"eps": 1e-4},
                 peft_config=copy.deepcopy(lora))
    torch.manual_seed(0)
    theirs = train(GRPOTrainer, tiny_lab_model_dir, args, peft_config=copy.deepcopy(lora))

    start, _ = load_model_and_tokenizer(str(tiny_lab_model_dir))
    start_weights = dict(start.named_parameters())
    trained = {n: p for n, p in ours.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)  # only the adapters train
    for name, param in ours.model.named_parameters():
        if "lora_" not in name:  # frozen base weights, under peft's prefix
            base = name.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(param, start_weights[base], msg=name)
    for mine, trl in zip(step_logs(ours), step_logs(theirs), strict=True):
        assert mine["loss"] == pytest.approx(trl["loss"], rel=1e-4, abs=1e-7)
    for (name, mine), (_, trl) in zip(ours.model.named_parameters(), theirs.model.named_parameters(), strict=True):
        torch.testing.assert_close(mine, trl, rtol=1e-4, atol=1e-6, msg=name)
    moved = [n for n, p in trained.items() if "lora_B" in n and p.abs().max() > 0]
    assert moved  # the adapters did learn something (gaussian init: lora_B starts at 0)
