"""Compare methods × seeds on one task with an equal budget, and summarise the grid.

Every run gets the same base configuration (a YAML file plus overrides), the same number of
policy-update steps and the same evaluation schedule; only `method` and `train.seed` differ,
plus the few settings a method needs to be itself (`Method.compare_overrides`).  Each run lives in
`<out>/runs/<method>-seed<s>/`; a finished run is read back, a broken-off one resumes from its
last checkpoint.  Runs go one after another in this process (`jobs` = 1), or `jobs` at a time,
each in a fresh process with cores // jobs threads: for models as small as the lab's, two
one-thread runs side by side do about 1.4× the work of one two-thread run on 2 cores.

What is reported per method (statistics over seeds):
- final held-out avg@k (the mean correctness of k samples per problem: an estimate of pass@1),
  mean ± the 95% Student-t interval half-width;
- steps and training seconds to reach GRPO's mean final avg@k: the first evaluation after step 0
  at or above it; seconds are the sum of `time_step` up to that step (evaluations excluded);
- compute per step, from metrics.jsonl: wall seconds, CPU seconds (`cpu_step`, the process's CPU time over
  all its threads: it leaves out time spent waiting for a core, so it ranks costs on a busy machine where
  wall seconds do not), extra generated tokens (value estimation),
  extra forward passes, critic calls, sampling rounds (dynamic sampling), and the peak RSS.
  Extra forward passes = sequences put through a no-grad forward besides sampling and the
  update (the trainer's `scoring_forwards`: the old-log-prob forward when the sampler's
  log-probs cannot stand in, the KL reference forward when kl_coef > 0) plus value-estimation
  generate calls.
  A step skipped for lack of reward spread logs no times, so its sampling is not counted; the
  number of skipped steps is reported beside.
  The peak RSS is `ru_maxrss`, the process's peak so far: with `jobs` > 1 each run has its own
  process, so it is the run's own peak; with `jobs` = 1 the runs share this process, so a run's
  reading is at least that of the runs before it.
- the machine's load over the grid's steps (`load_avg`, the 1-minute load average logged after each
  step): mean and peak, beside the number of cores; a mean above the cores means wall seconds are inflated.
Runs logged before `cpu_step` and `load_avg` existed report None for them.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from creditrl.collect import collect_rollouts
from creditrl.config import RunConfig
from creditrl.configure import load_config
from creditrl.credit import compute_credit
from creditrl.credit_metrics import credit_accuracy
from creditrl.jsonl import read_jsonl
from creditrl.methods import get_method, known_methods
from creditrl.policy.loading import load_configured_policy
from creditrl.report.compare_report import write_report
from creditrl.resources import build_resources, resources_needed
from creditrl.tasks import build_task
from creditrl.trainer import Trainer, TrainingStopped, check_same_run

BASELINE = "grpo"
# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30.
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


@dataclass
class GridSpec:
    """Which runs make the grid and the budget each gets."""

    methods: list[str]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 15  # the default grid (every method × 3 seeds) is sized for under 30 minutes on 2 CPU cores
    eval_every: int = 5
    eval_size: int = 50
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    out: Path = Path("reports/compare")
    jobs: int = 1  # runs trained at once, each in its own process with cores // jobs threads

    def run_dir(self, method: str, seed: int) -> Path:
        return self.out / "runs" / f"{method}-seed{seed}"

    def run_config(self, method: str, seed: int) -> RunConfig:
        """The base config with this run's method, seed, budget and folder."""
        threads = [f"train.threads={max(1, (os.cpu_count() or 1) // self.jobs)}"] if self.jobs > 1 else []
        # the method's own grid overrides come first, so the grid's (`method_params.k=9`) win
        overrides = [*threads, *get_method(method).compare_overrides, *self.overrides, f"method={method}"]
        eval_size_key = type(load_config(self.config, overrides).task).eval_size_key
        return load_config(self.config, [*overrides,
                                         f"train.seed={seed}", f"train.steps={self.steps}",
                                         f"eval.every={self.eval_every}", f"task.{eval_size_key}={self.eval_size}",
                                         f"output.dir={self.run_dir(method, seed)}",
                                         f"output.checkpoint_every={self.eval_every or self.steps}"])


def default_methods() -> list[str]:
    """Every registered method: on the lab all run offline (the PRM and the critic are oracles)."""
    return known_methods()


def quick_spec(out: Path = Path("reports/compare-quick"), config: Path | None = None,
               overrides: list[str] | None = None) -> GridSpec:
    """A smoke-sized grid: GRPO and GRPO-λ, 2 seeds, 10 steps, evaluated every 5 on 50 problems."""
    return GridSpec(["grpo", "grpo_lambda"], [0, 1], steps=10, eval_every=5, eval_size=50,
                    config=config, overrides=list(overrides or []), out=out)


def run_grid(spec: GridSpec, on_progress: Callable[[int], None] | None = None, console=None) -> None:
    """Train every run of the grid; a finished run is read back, an interrupted one resumed.

    With `spec.jobs` > 1, that many runs train at once, each in a fresh process (so each run's
    peak memory is its own); runs that sample continuations (VinePPO) start first, so the grid
    does not end on one long run.  `on_progress` gets the number of the grid's steps done so far (for
    one bar).  A finished run whose configuration differs from the spec's is an error
    (`TrainingStopped`), and so is a run in the folder that trained more steps than the spec's or
    evaluated on another schedule (the report compares curves step by step).
    """

    report = on_progress or (lambda done: None)
    progress: dict[tuple[str, int], int] = {}
    todo = []
    for method, seed in ((m, s) for m in spec.methods for s in spec.seeds):
        cfg = spec.run_config(method, seed)
        progress[method, seed] = _steps_done(cfg.run_dir())
        _check_fits_the_grid(cfg, progress[method, seed], spec.steps)
        if progress[method, seed] == spec.steps:
            check_same_run(cfg.run_dir() / "config.yaml", cfg)
        else:
            progress[method, seed] = 0
            todo.append(((method, seed), cfg))
    todo.sort(key=lambda item: "value_estimator" not in resources_needed([item[0][0]]))  # long runs first
    report(sum(progress.values()))

    def advance(key: tuple[str, int], step: int) -> None:
        progress[key] = step
        report(sum(progress.values()))

    if spec.jobs == 1:
        for key, cfg in todo:
            _train_run(cfg, lambda step, key=key: advance(key, step), console)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with context.Manager() as manager, ProcessPoolExecutor(spec.jobs, mp_context=context,
                                                          max_tasks_per_child=1) as pool:
        steps_done = manager.Queue()
        running = {pool.submit(_train_run_in_worker, cfg, key, steps_done) for key, cfg in todo}
        while running:
            finished, running = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            while not steps_done.empty():
                advance(*steps_done.get())
            for future in finished:
                future.result()  # a failed run stops the grid with its own error


def _train_run(cfg: RunConfig, on_step: Callable[[int], None], console=None) -> None:
    Trainer(cfg, console=console, show_progress=False, on_step=on_step).train(resume=True, overwrite=True)


def _train_run_in_worker(cfg: RunConfig, key: tuple[str, int], steps_done) -> None:
    """One run in a worker process, sending (key, step) after each step; its console stays quiet."""
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    _train_run(cfg, lambda step: steps_done.put((key, step)), Console(quiet=True))


def _check_fits_the_grid(cfg: RunConfig, steps_done: int, steps: int) -> None:
    """A run already in the grid's folder has at most the grid's steps and its evaluation schedule."""
    if steps_done > steps:
        raise TrainingStopped(f"{cfg.run_dir()} trained {steps_done} steps, more than the grid's {steps}: "
                              "compare into another --out folder")
    saved = cfg.run_dir() / "config.yaml"
    before = yaml.safe_load(saved.read_text()).get("eval") if saved.exists() else None
    now = cfg.model_dump(mode="json")["eval"]
    if before is not None and before != now:
        changed = ", ".join(f"eval.{k} ({before.get(k)!r} -> {now.get(k)!r})"
                            for k in sorted(now) if before.get(k) != now[k])
        raise TrainingStopped(f"{saved} evaluates on another schedule than the grid ({changed}): its curve could "
                              "not be compared step by step; compare into another --out folder")


def _steps_done(run_dir: Path) -> int:
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text())["steps"] if summary.exists() else 0


# ---- statistics ---------------------------------------------------------------------------------
def t_quantile(df: int) -> float:
    """t_{0.975, df}: exact to 4 decimals for df ≤ 30, z + (z³ + z) / (4·df) beyond."""
    if df < 1:
        raise ValueError("the t quantile needs df ≥ 1")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval); the half-width is NaN for fewer than 2 values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


# ---- reading runs back --------------------------------------------------------------------------
def run_record(run_dir: Path) -> dict:
    """One finished run: its evaluation curve and its compute, from the run folder."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    evals = read_jsonl(run_dir / "eval.jsonl")
    steps = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"method": cfg["method"], "seed": cfg["train"]["seed"], "run_dir": str(run_dir),
            "wall_seconds": summary["total_wall_seconds"],
            "curve": [{"step": e["step"], "avg@k": e["avg@k"]} for e in evals],
            "step_seconds": [m.get("time_step", 0.0) for m in steps], "compute": run_compute(steps),
            "step_load": [m["load_avg"] for m in steps if "load_avg" in m]}


def run_compute(steps: list[dict]) -> dict:
    """Per-step means of a run's costs (see the module docstring for what counts)."""
    n = max(len(steps), 1)

    def per_step(key: str) -> float:
        return sum(m.get(key, 0.0) for m in steps) / n

    cpu_logged = all("cpu_step" in m for m in steps if "time_step" in m) and any("cpu_step" in m for m in steps)
    return {"train_seconds": sum(m.get("time_step", 0.0) for m in steps), "seconds_per_step": per_step("time_step"),
            "cpu_seconds_per_step": per_step("cpu_step") if cpu_logged else None,
            "extra_generated_tokens": per_step("extra_generated_tokens"),
            "extra_forward_passes": per_step("scoring_forwards") + per_step("extra_generate_calls"),
            "critic_calls": per_step("critic_calls"), "gen_rounds": per_step("gen_rounds"),
            "skipped_steps": sum(m.get("skipped", 0.0) for m in steps),
            "peak_rss_mb": max((m.get("peak_rss_mb", 0.0) for m in steps), default=0.0)}


def first_reach(record: dict, target: float) -> tuple[int | None, float | None]:
    """(step, training seconds) of the first evaluation after training began with avg@k ≥ target;
    (None, None) if none.  The step-0 evaluation (the shared starting policy) never counts."""
    for point in record["curve"]:
        if point["step"] > 0 and point["avg@k"] >= target:
            return point["step"], sum(record["step_seconds"][: point["step"]])
    return None, None


def summarize(records: list[dict]) -> dict:
    """Per-method statistics over seeds, GRPO's mean final avg@k as the target (None without GRPO), and the
    machine's load over the grid's steps (mean and peak: None when no run logged it) beside its cores."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    finals = {m: [r["curve"][-1]["avg@k"] for r in rs] for m, rs in by_method.items()}
    target = statistics.fmean(finals[BASELINE]) if BASELINE in finals else None
    methods = {}
    for m, rs in by_method.items():
        mean, half = mean_ci(finals[m])
        reach = [first_reach(r, target) if target is not None else (None, None) for r in rs]
        hit_steps = [s for s, _ in reach if s is not None]
        hit_seconds = [sec for _, sec in reach if sec is not None]
        compute = {key: _mean_or_none([r["compute"][key] for r in rs]) for key in rs[0]["compute"]}
        compute["peak_rss_mb"] = max(r["compute"]["peak_rss_mb"] for r in rs)
        methods[m] = {"seeds": [r["seed"] for r in rs], "start": statistics.fmean(r["curve"][0]["avg@k"] for r in rs),
                      "final": finals[m], "final_mean": mean, "final_ci95": None if math.isnan(half) else half,
                      "steps_to_target": [s for s, _ in reach], "seconds_to_target": [sec for _, sec in reach],
                      "mean_steps_to_target": statistics.fmean(hit_steps) if hit_steps else None,
                      "mean_seconds_to_target": statistics.fmean(hit_seconds) if hit_seconds else None,
                      "wall_seconds": statistics.fmean(r["wall_seconds"] for r in rs), "compute": compute}
    loads = [x for r in records for x in r["step_load"]]
    load = {"mean": statistics.fmean(loads) if loads else None, "peak": max(loads, default=None),
            "cores": os.cpu_count()}
    return {"target": target, "methods": methods, "load": load}


def _mean_or_none(values: list[float | None]) -> float | None:
    """The mean, or None when a value is missing (a run logged before the quantity was)."""
    return None if None in values else statistics.fmean(values)


# ---- credit accuracy on one shared batch --------------------------------------------------------
def credit_accuracy_table(spec: GridSpec, prompts: int = 8) -> dict:
    """Every grid method's credit accuracy on one batch sampled from the starting policy, with the
    method parameters its runs train with (the batch's rewards are under the baseline's reward settings)."""
    cfg = spec.run_config(BASELINE, spec.seeds[0])
    policy = load_configured_policy(cfg.model)
    task = build_task(cfg.task)
    problems = task.eval_problems()[:prompts]
    batch = collect_rollouts(policy, task, problems, cfg.rollout.group_size, cfg.sampling, cfg.reward,
                             seed=cfg.train.seed)
    params = {m: spec.run_config(m, spec.seeds[0]).method_params for m in spec.methods}  # as the grid trains them
    maps = compute_credit(batch, [p.prompt for p in problems], policy, spec.methods, params=params,
                          resources=build_resources(spec.methods, cfg, policy, task))
    metrics = {name: {k: None if isinstance(v, float) and math.isnan(v) else v
                      for k, v in credit_accuracy(c, batch).as_dict().items()} for name, c in maps.credit.items()}
    return {"responses": batch.batch_size, "prompts": len(problems),
            "correct": batch.correct.float().mean().item(), "metrics": metrics, "skipped": maps.skipped}


def collect_results(spec: GridSpec, credit: dict | None = None) -> dict:
    """The grid's raw JSON: the spec, every run's record, the per-method summary and the credit table."""
    records = [run_record(spec.run_dir(m, s)) for m in spec.methods for s in spec.seeds]
    overrides = {m: list(get_method(m).compare_overrides) for m in spec.methods}
    return {"spec": {"methods": spec.methods, "seeds": spec.seeds, "steps": spec.steps, "eval_every": spec.eval_every,
                     "jobs": spec.jobs,
                     "eval_size": spec.eval_size, "config": str(spec.config) if spec.config else None,
                     "overrides": spec.overrides, "method_overrides": {m: o for m, o in overrides.items() if o}},
            "runs": records, "summary": summarize(records), "credit": credit}


def compare(spec: GridSpec, on_progress: Callable[[int], None] | None = None, console=None) -> dict[str, Path]:
    """Run the grid (resumably), score credit on one shared batch, and write the report folder."""
    run_grid(spec, on_progress, console)
    return write_report(spec.out, collect_results(spec, credit_accuracy_table(spec)))
