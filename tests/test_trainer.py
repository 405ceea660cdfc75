import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from creditrl.config import RunConfig
from creditrl.configure import load_config
from creditrl.trainer import Trainer, TrainingStopped, check_same_run


def _cfg(model_dir, run_dir, *extra):
    return load_config(None, [f"model.name={model_dir}", f"output.dir={run_dir}", "train.steps=4",
                              "rollout.prompts_per_step=3", "rollout.group_size=4", "task.lab.eval_size=6",
                              "task.lab.train_size=200", "eval.k=2", "sampling.max_new_tokens=24",
                              "output.checkpoint_every=2", "train.lr=1e-3", *extra])


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_training_writes_metrics_checkpoints_and_summary(tiny_lab_model_dir, tmp_path):
    summary = Trainer(_cfg(tiny_lab_model_dir, tmp_path / "run"), show_progress=False).train()
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    for key in ("reward", "accuracy", "response_length", "entropy", "clip_frac", "grad_norm", "adv_mean",
                "zero_spread_groups", "time_sample", "time_update", "tokens_per_s"):
        assert key in lines[-1]
    last = json.loads(lines[-1])
    assert math.isfinite(last["cpu_step"]) and last["cpu_step"] > 0 and math.isfinite(last["load_avg"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (run / "config.yaml").exists() and (run / "final" / "model.safetensors").exists()
    assert summary["before"]["step"] == 0 and summary["after"]["step"] == 4


def test_updates_change_the_weights(tiny_lab_model_dir, tmp_path):
    before = _weights(tiny_lab_model_dir)
    # with nothing correct, every group has zero spread and GRPO's advantages are all 0: reward
    # wrong answers by length instead, through a reward shaping that gives spread (overlong penalty).
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "run", "reward.overlong_max=12", "reward.overlong_buffer=8"),
            show_progress=False).train()
    after = _weights(tmp_path / "run" / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_weights(tiny_lab_model_dir, tmp_path):
    overrides = ["train.steps=10", "reward.overlong_max=12", "reward.overlong_buffer=8", "eval.before=false"]
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "clean", *overrides), show_progress=False).train()

    killed = tmp_path / "killed"
    args = [f"model.name={tiny_lab_model_dir}", f"output.dir={killed}", "rollout.prompts_per_step=3",
            "rollout.group_size=4", "task.lab.eval_size=6", "task.lab.train_size=200", "eval.k=2",
            "sampling.max_new_tokens=24", "output.checkpoint_every=2", "train.lr=1e-3", "train.threads=1", *overrides]
    proc = subprocess.Popen([sys.executable, "-m", "creditrl.cli", "train", "--quiet", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"

    cfg = _cfg(tiny_lab_model_dir, killed, *overrides)
    Trainer(cfg, show_progress=False).train(resume=True)
    clean, resumed = _weights(tmp_path / "clean" / "final"), _weights(killed / "final")
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)
    steps = [int(line.split(",")[0].split(":")[1]) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


@pytest.mark.slow
def test_half_written_checkpoint_is_never_loaded(tiny_lab_model_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=2", "eval.before=false"), show_progress=False).train()
    broken = run / "checkpoints" / "step-000004.tmp"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"garbage")
    trainer = Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=3", "eval.before=false"), show_progress=False)
    trainer.train(resume=True)
    assert trainer.step == 3


def test_skipped_steps_in_a_row_are_counted_across_a_resume(tiny_lab_model_dir, tmp_path):
    """A run that skips steps 1 and 2 (NaN rewards), checkpoints, dies and resumes stops at step 3, as the
    unbroken run does (the count of skips in a row is saved with the checkpoint)."""
    run, bad = tmp_path / "run", ["reward.wrong=.nan", "train.max_bad_steps=3", "eval.before=false",
                                  "output.checkpoint_every=1"]
    Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=2", *bad), show_progress=False).train()
    with pytest.raises(TrainingStopped, match=r"stopping at step 3: 3 skipped updates in a row"):
        Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=4", *bad), show_progress=False).train(resume=True)


def test_the_lr_schedule_moves_on_a_skipped_step_and_logs_the_lr_used(tiny_lab_model_dir, tmp_path):
    cfg = _cfg(tiny_lab_model_dir, tmp_path / "run", "train.warmup_steps=4", "train.steps=8", "reward.wrong=.nan",
               "train.max_bad_steps=8")
    trainer = Trainer(cfg, show_progress=False)
    trainer._build_optimizer()
    first = trainer.train_step()  # skipped: non-finite advantages
    assert first.bad is not None and first.metrics["lr"] == pytest.approx(1e-3 * 1 / 4)  # warm-up, step 1 of 4
    assert trainer.train_step().metrics["lr"] == pytest.approx(1e-3 * 2 / 4)


def test_n_minibatches_is_the_number_of_updates_even_when_it_does_not_divide_the_batch(tiny_lab_model_dir, tmp_path):
    cfg = _cfg(tiny_lab_model_dir, tmp_path / "run", "rollout.prompts_per_step=5", "rollout.group_size=2",
               "train.n_minibatches=4", "eval.before=false")
    trainer = Trainer(cfg, show_progress=False)
    trainer.task.verify = lambda p, r, verdict=trainer.task.verify: verdict(p, r).__class__(correct=len(r) % 2 == 0)
    trainer._build_optimizer()
    outcome = trainer.train_step()  # 10 rows in 4 minibatches of 3, 3, 2, 2 (chunk would make 3, 3, 3, 1)
    assert outcome.bad is None and outcome.metrics["updates"] == 4


def test_non_finite_rewards_stop_the_run_with_the_cause(tiny_lab_model_dir, tmp_path):
    cfg = _cfg(tiny_lab_model_dir, tmp_path / "run", "reward.wrong=.nan", "train.max_bad_steps=2", "eval.before=false")
    with pytest.raises(TrainingStopped, match=r"2 skipped updates in a row.*non-finite advantages"):
        Trainer(cfg, show_progress=False).train()


def test_non_finite_rewards_under_dynamic_sampling_stop_the_run_with_the_cause(tiny_lab_model_dir, tmp_path):
    cfg = _cfg(tiny_lab_model_dir, tmp_path / "run", "method=dapo", "reward.wrong=.nan", "train.max_bad_steps=2",
               "rollout.max_num_gen_batches=2", "eval.before=false")
    with pytest.raises(TrainingStopped, match=r"2 skipped updates in a row.*non-finite advantages"):
        Trainer(cfg, show_progress=False).train()


def test_dynamic_sampling_keeps_only_groups_with_spread(tiny_lab_model_dir, tmp_path):
    cfg = _cfg(tiny_lab_model_dir, tmp_path / "run", "method=dapo", "rollout.max_num_gen_batches=3")
    trainer = Trainer(cfg, show_progress=False)
    verdict = trainer.task.verify
    # a verifier that calls responses of even length correct: groups then disagree at random
    trainer.task.verify = lambda p, r: verdict(p, r).__class__(correct=len(r) % 2 == 0)
    rollouts, info = trainer.collect()
    assert 1 <= info["gen_rounds"] <= 3 and 1 <= info["kept_groups"] <= 3  # some group kept: the checks below bite
    for g in torch.unique(rollouts.group_ids):
        assert rollouts.rewards[rollouts.group_ids == g].unique().numel() > 1  # spread (±1, and overlong shaping)
    assert rollouts.batch_size == 4 * len(torch.unique(rollouts.group_ids))


def test_read_only_run_folder_fails_before_training(tiny_lab_model_dir, tmp_path):
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o500)
    try:
        if os.access(run, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(TrainingStopped, match="cannot write to the run folder"):
            Trainer(_cfg(tiny_lab_model_dir, run), show_progress=False).train()
    finally:
        run.chmod(0o700)


def test_process_supervision_trains_from_the_lab_step_labels(tiny_lab_model_dir, tmp_path):
    trainer = Trainer(_cfg(tiny_lab_model_dir, tmp_path / "run", "method=process_grpo", "eval.before=false"),
                      show_progress=False)
    rollouts, _ = trainer.collect()
    assert rollouts.step_rewards is not None
    labels = rollouts.step_labels
    # every step the splitter found carries the verifier's label (1 right, 0 wrong)
    for row in range(rollouts.batch_size):
        n = int(rollouts.num_steps[row])
        assert set(labels[row, :n].tolist()) <= {0, 1}
    summary = trainer.train()
    assert summary["steps"] == 4


def test_kl_to_a_frozen_reference(tiny_lab_model_dir, tmp_path):
    cfg = _cfg(tiny_lab_model_dir, tmp_path / "run", "loss.kl_coef=0.1", "train.n_minibatches=2", "eval.before=false",
               "reward.overlong_max=12", "reward.overlong_buffer=8")
    trainer = Trainer(cfg, show_progress=False)
    reference = {k: v.clone() for k, v in trainer.reference.state_dict().items()}
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r for r in records)
    assert records[-1]["kl"] > 0  # the policy moved away from the reference ...
    # ... which stayed frozen
    assert all(torch.equal(v, trainer.reference.state_dict()[k]) for k, v in reference.items())


@pytest.mark.parametrize(("extra", "forwards_per_row"), [
    ([], 0),  # one update on the sampler's own log-probs
    (["method=fipo", "train.n_minibatches=4"], 0),  # several updates: the sampler's log-probs are the old ones
    (["train.n_minibatches=2", "train.recompute_old_logprobs=true"], 1),
    (["loss.kl_coef=0.1"], 1),  # the reference forward
    (["method=denser"], 1),  # hidden states come from an old-log-prob forward
])
def test_scoring_forwards_counts_the_sequences_scored_without_gradients(tiny_lab_model_dir, tmp_path, monkeypatch,
                                                                     extra, forwards_per_row):
    from creditrl.policy.transformers_backend import TransformersPolicy

    scored = []
    score = TransformersPolicy.score

    def counting_score(self, prompt_ids, *args, **kwargs):
        if not torch.is_grad_enabled():
            scored.append(len(prompt_ids))
        return score(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(TransformersPolicy, "score", counting_score)
    cfg = _cfg(tiny_lab_model_dir, tmp_path / "run", "eval.before=false", "reward.overlong_max=12",
               "reward.overlong_buffer=8", "rollout.dynamic_sampling=false", "train.steps=1", *extra)
    Trainer(cfg, show_progress=False).train()
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert metrics["scoring_forwards"] == sum(scored) == forwards_per_row * metrics["responses"]


@pytest.mark.slow
def test_an_earlier_run_is_never_silently_overwritten(tiny_lab_model_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=2", "eval.before=false"), show_progress=False).train()
    with pytest.raises(TrainingStopped, match="earlier run.*--resume.*--overwrite"):
        Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=2", "eval.before=false"), show_progress=False).train()
    Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=1", "eval.before=false"), show_progress=False).train(
        overwrite=True)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]


@pytest.mark.slow
def test_resume_refuses_a_different_configuration(tiny_lab_model_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=2", "eval.before=false"), show_progress=False).train()
    with pytest.raises(TrainingStopped, match=r"train\.lr \(0\.001 -> 0\.002\)"):
        Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=4", "train.lr=2e-3"), show_progress=False).train(resume=True)
    Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=3", "eval.k=1"), show_progress=False).train(resume=True)


def test_a_run_saved_before_a_setting_existed_resumes_while_it_holds_its_default(tmp_path):
    saved = tmp_path / "config.yaml"
    cfg = RunConfig()
    older = cfg.model_dump(mode="json")
    del older["value_model"], older["train"]["max_tokens_per_microbatch"]  # settings the saved run predates
    saved.write_text(yaml.safe_dump(older))
    check_same_run(saved, cfg)
    countdown = RunConfig(task={"name": "countdown"})  # another task's section holds none of the lab's defaults
    saved.write_text(yaml.safe_dump(countdown.model_dump(mode="json")))
    check_same_run(saved, countdown)
    saved.write_text(yaml.safe_dump(older))
    cfg.train.max_tokens_per_microbatch = 512
    with pytest.raises(TrainingStopped, match=r"train\.max_tokens_per_microbatch \(None -> 512\)"):
        check_same_run(saved, cfg)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_logged_entropy_is_the_policy_entropy_and_only_a_bonus_recomputes_it(tiny_lab_model_dir, tmp_path,
                                                                             entropy_coef):
    from creditrl.methods.loss import masked_mean

    cfg = _cfg(tiny_lab_model_dir, tmp_path / "run", f"loss.entropy_coef={entropy_coef}", "reward.overlong_max=12",
               "reward.overlong_buffer=8")
    trainer = Trainer(cfg, show_progress=False)
    trainer._build_optimizer()
    asked, score = [], trainer.policy.score

    def spy(*args, **kwargs):
        asked.append((kwargs.get("with_entropy", False), torch.is_grad_enabled()))
        return score(*args, **kwargs)

    trainer.policy.score = spy
    collect = trainer.collect
    kept = {}
    trainer.collect = lambda: kept.setdefault("batch", collect())
    outcome = trainer.train_step()
    assert outcome.bad is None
    rollouts = kept["batch"][0]
    # an independent route: the entropy of a fresh forward over the same rollouts, before the update changed
    # the weights, is what the sampler reported
    with torch.no_grad():
        trainer.policy.model.load_state_dict(load_file(tiny_lab_model_dir / "model.safetensors"), strict=False)
        fresh = score(rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids, rollouts.response_mask,
                      cfg.sampling.temperature, with_entropy=True).entropy
    expected = masked_mean(fresh, rollouts.response_mask).item()
    assert outcome.metrics["entropy"] == pytest.approx(expected, abs=1e-4)
    update_calls = [with_entropy for with_entropy, grad in asked if grad]
    assert update_calls == [entropy_coef > 0]


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_gradient_checkpointing_trains_to_the_same_weights(tiny_lab_model_dir, tmp_path, compiled):
    """With compiled scoring too: the checkpoint's recompute runs inside the compiled layers."""
    overrides = ["train.steps=2", "reward.overlong_max=12", "reward.overlong_buffer=8", "eval.before=false"]
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "plain", *overrides), show_progress=False).train()
    trainer = Trainer(_cfg(tiny_lab_model_dir, tmp_path / "ckpt", *overrides, "train.gradient_checkpointing=true",
                           f"model.compile={str(compiled).lower()}"), show_progress=False)
    # transformers 5 says activation checkpointing, earlier releases gradient checkpointing
    model = trainer.policy.model
    assert trainer.policy.checkpointing_activations and any(
        getattr(model, name, False) for name in ("is_activation_checkpointing", "is_gradient_checkpointing"))
    torch._dynamo.reset()  # graphs an earlier test compiled would be reused, and not counted
    graphs = counters["stats"]["unique_graphs"]
    trainer.train()
    assert (counters["stats"]["unique_graphs"] > graphs) == compiled
    plain, recomputed = _weights(tmp_path / "plain" / "final"), _weights(tmp_path / "ckpt" / "final")
    start = _weights(tiny_lab_model_dir)
    assert any(not torch.equal(start[k], plain[k]) for k in plain)
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key])


@pytest.mark.slow
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_logits_kept_from_the_forward_train_to_the_same_weights(tiny_lab_model_dir, tmp_path, entropy_coef):
    """With an entropy bonus too, whose gradient reads the logits as well."""
    overrides = ["train.steps=2", "reward.overlong_max=12", "reward.overlong_buffer=8", "eval.before=false",
                 f"loss.entropy_coef={entropy_coef}"]
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "rebuilt", *overrides), show_progress=False).train()
    Trainer(_cfg(tiny_lab_model_dir, tmp_path / "kept", *overrides, "model.keep_logits=true"),
            show_progress=False).train()
    rebuilt, kept = _weights(tmp_path / "rebuilt" / "final"), _weights(tmp_path / "kept" / "final")
    start = _weights(tiny_lab_model_dir)
    assert any(not torch.equal(start[k], rebuilt[k]) for k in rebuilt)
    for key in rebuilt:
        torch.testing.assert_close(kept[key], rebuilt[key])


def test_a_resume_says_when_it_starts_over_and_reports_the_whole_runs_wall_time(tiny_lab_model_dir, tmp_path):
    import json

    from rich.console import Console

    run, quick = tmp_path / "run", ["eval.before=false", "output.checkpoint_every=1"]
    console = Console(record=True, width=200)
    Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=1", *quick), console=console,
            show_progress=False).train(resume=True)  # nothing to resume yet
    assert "no complete checkpoint in" in console.export_text()
    state = json.loads((run / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
    summary = Trainer(_cfg(tiny_lab_model_dir, run, "train.steps=2", *quick), show_progress=False).train(resume=True)
    # the segment before the resume counts up to the checkpoint the run resumed from
    assert summary["total_wall_seconds"] == pytest.approx(state["wall_seconds"] + summary["wall_seconds"], abs=0.11)
    assert state["wall_seconds"] > 0

