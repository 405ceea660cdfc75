"""Compare methods × seeds (× sweeps) on one task with an equal budget, and summarise the grid.

Every run gets the same base configuration (a YAML file plus overrides), the same number of
policy-update steps and the same evaluation schedule; only `method` and `train.seed` differ,
plus the few settings a method needs to be itself (`Method.compare_overrides`) and the values of
the sweeps that apply to it.  Sweeps (`creditrl.config.study.Sweep`) make a cartesian grid: a method
runs once per combination of the sweeps that apply to it (an entry, named like
`capo [critic.recall=0.8]`).  Runs with the same seed share the prompt order, the evaluation set and its
sampling seed, so each entry is compared with its baseline entry seed by seed: the baseline method at the
same cell, where a sweep that does not apply to the baseline leaves it at its one unswept run.  Each
run lives in `<out>/runs/<method>[@<cell>]-seed<s>/`; a finished run is read back, a broken-off one
resumes from its last checkpoint.  Runs go one after another in this process (`jobs` = 1), or `jobs` at a time,
each in a fresh process with cores // jobs threads: for models as small as the lab's, two
one-thread runs side by side do about 1.4× the work of one two-thread run on 2 cores.

The held-out size `eval_size` is set wherever the task's section keeps it (`task.eval_size`, or a nested
section's, as the lab's `task.lab.eval_size`); None leaves the task's own.

Paired against the baseline (`creditrl.stats`: 95% t intervals over seeds of the per-seed differences):
the final avg@k; the area under the learning curve (mean avg@k over the evaluations after step 0:
sample efficiency); the final avg@k by difficulty (Problem.meta's step count or level, as the evaluation
logs it); the verdict on the final avg@k (better / worse / not distinguishable at this budget); the
evaluation's standard error of the difference, sqrt(se_m² + se_b²) from each run's avg@k_se (an upper
bound: the shared problems make the paired difference's evaluation noise smaller), beside the spread of
the differences over seeds; and the power calculation: seeds needed to detect `detect` and the difference
detectable with the seeds run.

What is reported per entry besides (statistics over seeds):
- final held-out avg@k (the mean correctness of k samples per problem: an estimate of pass@1),
  mean ± the 95% Student-t interval half-width;
- steps and training seconds to reach its baseline's mean final avg@k: the first evaluation after step 0
  at or above it; seconds are the sum of `time_step` up to that step (evaluations excluded);
- compute per step, from metrics.jsonl: wall seconds, CPU seconds (`cpu_step`, the process's CPU time over
  all its threads: it leaves out time spent waiting for a core, so it ranks costs on a busy machine where
  wall seconds do not), extra generated tokens (value estimation),
  extra forward passes, critic calls, sampling rounds (dynamic sampling), and the peak RSS.
  Extra forward passes = sequences put through a no-grad forward besides sampling and the
  update (the trainer's `scoring_forwards`: the old-log-prob forward when the sampler's
  log-probs cannot stand in, the KL reference forward when kl_coef > 0) plus value-estimation
  generate calls plus the sequences through the forwards of a model trained alongside the policy
  (`resource_forwards`: a value model's or implicit PRM's scoring and update forwards).
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

import itertools
import json
import math
import multiprocessing
import os
import shutil
import statistics
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel

from creditrl.collect import collect_rollouts
from creditrl.config import ConfigError, RunConfig
from creditrl.config.study import Study, Sweep
from creditrl.configure import load_config
from creditrl.credit import compute_credit
from creditrl.credit_metrics import credit_accuracy
from creditrl.jsonl import read_jsonl
from creditrl.methods import get_method, known_methods
from creditrl.policy.loading import load_configured_policy
from creditrl.report.compare_report import write_report
from creditrl.resources import build_resources, resources_needed
from creditrl.stats import detectable_difference, mean_ci, paired_difference, seeds_needed
from creditrl.tasks import build_task
from creditrl.trainer import Trainer, TrainingStopped, check_same_run

BASELINE = "grpo"
DEFAULT_EVAL_SIZE = 200  # held-out problems per evaluation: avg@k's standard error ≈ 3 points at 50% accuracy


@dataclass(frozen=True)
class Entry:
    """A method at one cell of the grid: `cell` pairs (sweep number, value number) for the sweeps that apply to it."""

    method: str
    cell: tuple[tuple[int, int], ...] = ()


@dataclass
class GridSpec:
    """Which runs make the grid and the budget each gets."""

    methods: list[str]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 15  # the default grid (every method × 3 seeds): about 37 minutes on 2 idle CPU cores (estimated)
    eval_every: int = 5
    eval_size: int | None = DEFAULT_EVAL_SIZE  # None: the task's whole held-out set
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    out: Path = Path("reports/compare")
    jobs: int = 1  # runs trained at once, each in its own process with cores // jobs threads
    baseline: str = BASELINE
    sweeps: list[Sweep] = field(default_factory=list)
    detect: float = 0.05  # the accuracy difference the power calculation sizes seeds for
    task: str | None = None  # task.name (None: the base config's)
    runs: Path | None = None  # where the run folders go (None: <out>/runs); elsewhere, their logs are copied to
    # <out>/metrics/ so that the report folder holds every run's numbers and no checkpoint

    @classmethod
    def from_study(cls, study: Study, jobs: int = 1) -> GridSpec:
        methods = default_methods() if study.methods == "all" else list(study.methods)
        if study.baseline not in methods:
            raise ConfigError(f"baseline: {study.baseline!r} is not a registered method")
        return cls(methods, list(study.seeds), study.steps, study.eval_every, study.eval_size,
                   study.config, list(study.overrides), Path(study.out), jobs, study.baseline, list(study.sweeps),
                   study.detect, study.task, Path(study.runs) if study.runs else None)

    def entries(self) -> list[Entry]:
        """Every method at every combination of the sweeps that apply to it (the cartesian product)."""
        entries = []
        for method in self.methods:
            axes = [[(i, v) for v in range(len(s.values))] for i, s in enumerate(self.sweeps) if s.applies_to(method)]
            entries += [Entry(method, cell) for cell in itertools.product(*axes)]
        return entries

    def baseline_of(self, entry: Entry) -> Entry:
        """The baseline at the entry's cell; a sweep that does not apply to the baseline leaves it unswept."""
        return Entry(self.baseline, tuple((i, v) for i, v in entry.cell if self.sweeps[i].applies_to(self.baseline)))

    def label(self, entry: Entry) -> str:
        """`capo`, or `capo [critic.recall=0.8, critic.precision=0.6]` at a cell."""
        return entry.method + (f" [{', '.join(self.sweeps[i].label(v) for i, v in entry.cell)}]" if entry.cell else "")

    def run_dir(self, method: str | Entry, seed: int) -> Path:
        entry = method if isinstance(method, Entry) else Entry(method)
        cell = ",".join(self.sweeps[i].label(v) for i, v in entry.cell)
        return (self.runs or self.out / "runs") / f"{entry.method}{'@' + cell if cell else ''}-seed{seed}"

    def run_config(self, method: str | Entry, seed: int) -> RunConfig:
        """The base config with this run's method, cell, seed, budget and folder."""
        entry = method if isinstance(method, Entry) else Entry(method)
        threads = [f"train.threads={max(1, (os.cpu_count() or 1) // self.jobs)}"] if self.jobs > 1 else []
        base = [*([f"task.name={self.task}"] if self.task else []), *self.overrides,
                *(o for i, v in entry.cell for o in self.sweeps[i].overrides(v))]
        # the method's own grid overrides come first, so the grid's (`method_params.k=9`) win
        settings = [*threads, *get_method(entry.method).compare_overrides, *base, f"method={entry.method}",
                    f"train.seed={seed}", f"train.steps={self.steps}", f"eval.every={self.eval_every}"]
        return load_config(self.config, [*settings, *self._eval_size(settings),
                                         f"output.dir={self.run_dir(entry, seed)}",
                                         f"output.checkpoint_every={self.eval_every or self.steps}"])

    def _eval_size(self, settings: list[str]) -> list[str]:
        """The override that sets the task's held-out size to `eval_size`, wherever the task's section keeps it."""
        if self.eval_size is None:
            return []
        return [f"{eval_size_setting(load_config(self.config, settings).task)}={self.eval_size}"]


def eval_size_setting(section: BaseModel) -> str:
    """The dotted name of a task section's held-out size: `task.eval_size`, or `task.<sub>.eval_size` when the
    section keeps it in a nested model (the lab's `task.lab`)."""
    if "eval_size" in type(section).model_fields:
        return "task.eval_size"
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel) and "eval_size" in type(value).model_fields:
            return f"task.{name}.eval_size"
    raise ConfigError(f"task.name={section.name}: its section has no eval_size setting; leave the grid's eval_size "
                      "unset (--eval-size 0, or eval_size: null in a grid file) to evaluate on its held-out set")


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
    progress: dict[tuple[Entry, int], int] = {}
    todo = []
    for entry, seed in ((e, s) for e in spec.entries() for s in spec.seeds):
        cfg = spec.run_config(entry, seed)
        progress[entry, seed] = _steps_done(cfg.run_dir())
        _check_fits_the_grid(cfg, progress[entry, seed], spec.steps)
        if progress[entry, seed] == spec.steps:
            check_same_run(cfg.run_dir() / "config.yaml", cfg)
        else:
            progress[entry, seed] = 0
            todo.append(((entry, seed), cfg))
    todo.sort(key=lambda item: "value_estimator" not in resources_needed([item[0][0].method]))  # long runs first
    report(sum(progress.values()))

    def advance(key: tuple[Entry, int], step: int) -> None:
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


def _train_run_in_worker(cfg: RunConfig, key: tuple[Entry, int], steps_done) -> None:
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


# ---- reading runs back --------------------------------------------------------------------------
def run_record(run_dir: Path, entry: str | None = None, baseline: str = BASELINE) -> dict:
    """One finished run: its evaluation curve, the final evaluation's standard error and accuracy by
    difficulty, and its compute, from the run folder.  `entry` names its row of the report (default: the
    method), `baseline` the row its paired differences are against."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    evals = read_jsonl(run_dir / "eval.jsonl")
    steps = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    final = evals[-1]
    return {"method": cfg["method"], "entry": entry or str(cfg["method"]), "baseline": baseline,
            "seed": cfg["train"]["seed"], "run_dir": str(run_dir),
            "wall_seconds": summary["total_wall_seconds"],
            "curve": [{"step": e["step"], "avg@k": e["avg@k"]} for e in evals],
            "final_se": final.get("avg@k_se"),
            "final_by_difficulty": {key.removeprefix("avg@k_"): value for key, value in final.items()
                                    if key.startswith("avg@k_") and "=" in key},
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
            "extra_forward_passes": per_step("scoring_forwards") + per_step("extra_generate_calls")
                                    + per_step("resource_forwards"),
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


def area(record: dict) -> float:
    """Sample efficiency: the mean avg@k over the evaluations after step 0 (the shared start left out)."""
    points = [p["avg@k"] for p in record["curve"] if p["step"] > 0] or [record["curve"][-1]["avg@k"]]
    return statistics.fmean(points)


def summarize(records: list[dict], detect: float = 0.05) -> dict:
    """Per-entry statistics over seeds, each entry's paired differences against its baseline entry, and the
    machine's load over the grid's steps (mean and peak: None when no run logged it) beside its cores.

    An entry's target is its baseline's mean final avg@k (None without a baseline run); `target` at the top
    is that of the plain baseline entry, drawn on the learning curves.  `detect` is the difference the
    power calculation sizes seeds for.
    """
    by_entry: dict[str, list[dict]] = {}
    for r in records:
        by_entry.setdefault(r.get("entry", r["method"]), []).append(r)
    finals = {e: [r["curve"][-1]["avg@k"] for r in rs] for e, rs in by_entry.items()}
    entries = {}
    for e, rs in by_entry.items():
        base = rs[0].get("baseline", BASELINE)
        target = statistics.fmean(finals[base]) if base in finals else None
        mean, half = mean_ci(finals[e])
        reach = [first_reach(r, target) if target is not None else (None, None) for r in rs]
        hit_steps = [s for s, _ in reach if s is not None]
        hit_seconds = [sec for _, sec in reach if sec is not None]
        compute = {key: _mean_or_none([r["compute"][key] for r in rs]) for key in rs[0]["compute"]}
        compute["peak_rss_mb"] = max(r["compute"]["peak_rss_mb"] for r in rs)
        entries[e] = {"method": rs[0]["method"], "baseline": base, "target": target,
                      "seeds": [r["seed"] for r in rs], "start": statistics.fmean(r["curve"][0]["avg@k"] for r in rs),
                      "final": finals[e], "final_mean": mean, "final_ci95": None if math.isnan(half) else half,
                      "seed_sd": statistics.stdev(finals[e]) if len(rs) > 1 else None,
                      "eval_se": _mean_or_none([r.get("final_se") for r in rs]),
                      "area": [area(r) for r in rs],
                      "steps_to_target": [s for s, _ in reach], "seconds_to_target": [sec for _, sec in reach],
                      "mean_steps_to_target": statistics.fmean(hit_steps) if hit_steps else None,
                      "mean_seconds_to_target": statistics.fmean(hit_seconds) if hit_seconds else None,
                      "by_difficulty": _by_difficulty(rs),
                      "wall_seconds": statistics.fmean(r["wall_seconds"] for r in rs), "compute": compute}
    for e, s in entries.items():
        base = entries.get(s["baseline"])
        s["paired"] = None if base is None or e == s["baseline"] else _paired(s, base, detect)
    loads = [x for r in records for x in r["step_load"]]
    load = {"mean": statistics.fmean(loads) if loads else None, "peak": max(loads, default=None),
            "cores": os.cpu_count()}
    plain = next((s for e, s in entries.items() if e == s["baseline"] == s["method"]), None)  # unswept baseline
    return {"target": plain["final_mean"] if plain else None, "detect": detect, "methods": entries, "load": load}


def _by_difficulty(runs: list[dict]) -> dict[str, dict[int, float]]:
    """{difficulty: {seed: final avg@k on its problems}} over the runs' final evaluations."""
    table: dict[str, dict[int, float]] = {}
    for r in runs:
        for key, value in r.get("final_by_difficulty", {}).items():
            table.setdefault(key, {})[r["seed"]] = value
    return table


def _paired(entry: dict, base: dict, detect: float) -> dict:
    """The entry's paired differences against its baseline's runs: final avg@k, area, each difficulty; and the
    power calculation on the final avg@k's differences: seeds needed for `detect`, difference detectable now."""
    final = paired_difference(dict(zip(entry["seeds"], entry["final"])), dict(zip(base["seeds"], base["final"])))
    sd, n = final["sd"], len(final["seeds"])
    noise = [x for x in (entry["eval_se"], base["eval_se"]) if x is not None]
    return {"final": final,
            "area": paired_difference(dict(zip(entry["seeds"], entry["area"])), dict(zip(base["seeds"], base["area"]))),
            "by_difficulty": {key: paired_difference(values, base["by_difficulty"].get(key, {}))
                              for key, values in entry["by_difficulty"].items()},
            "eval_se": math.sqrt(sum(x * x for x in noise)) if len(noise) == 2 else None,
            "seeds_needed": seeds_needed(sd, detect) if sd is not None else None,
            "detectable": detectable_difference(sd, n) if sd is not None else None}


def _mean_or_none(values: list[float | None]) -> float | None:
    """The mean, or None when a value is missing (a run logged before the quantity was)."""
    return None if None in values else statistics.fmean(values)


# ---- credit accuracy on one shared batch --------------------------------------------------------
def credit_accuracy_table(spec: GridSpec, prompts: int = 8) -> dict:
    """Every entry's credit accuracy on a batch sampled from the starting policy with the grid's first seed, under
    the entry's own settings (its method parameters, critic or PRM, task): entries whose task, sampling, reward
    and group size agree score the same batch, so at an unswept cell every method reads the same responses."""
    policies, batches, metrics, skipped = {}, {}, {}, {}
    for entry in spec.entries():
        cfg = spec.run_config(entry, spec.seeds[0])
        model_key = cfg.model.model_dump_json()
        if model_key not in policies:
            policies[model_key] = load_configured_policy(cfg.model)
        policy = policies[model_key]
        batch_key = json.dumps([cfg.model_dump(mode="json")[k] for k in ("task", "sampling", "reward")]
                               + [cfg.rollout.group_size, model_key])
        if batch_key not in batches:
            task = build_task(cfg.task)
            problems = task.eval_problems()[:prompts]
            batches[batch_key] = (len(batches), task, problems,
                                  collect_rollouts(policy, task, problems, cfg.rollout.group_size, cfg.sampling,
                                                   cfg.reward, seed=cfg.train.seed))
        number, task, problems, batch = batches[batch_key]
        maps = compute_credit(batch, [p.prompt for p in problems], policy, [entry.method],
                              params={entry.method: cfg.method_params},
                              resources=build_resources([entry.method], cfg, policy, task))
        if entry.method in maps.credit:
            accuracy = credit_accuracy(maps.credit[entry.method], batch).as_dict()
            metrics[spec.label(entry)] = {"batch": number, **{k: None if isinstance(v, float) and math.isnan(v) else v
                                                              for k, v in accuracy.items()}}
        else:
            skipped[spec.label(entry)] = maps.skipped[entry.method]
    return {"prompts": prompts, "metrics": metrics, "skipped": skipped,
            "batches": [{"responses": b.batch_size, "correct": b.correct.float().mean().item()}
                        for _, _, _, b in batches.values()]}


def collect_results(spec: GridSpec, credit: dict | None = None) -> dict:
    """The grid's raw JSON: the spec, every run's record, the per-entry summary and the credit table."""
    records = [run_record(spec.run_dir(e, s), spec.label(e), spec.label(spec.baseline_of(e)))
               for e in spec.entries() for s in spec.seeds]
    overrides = {m: list(get_method(m).compare_overrides) for m in spec.methods}
    task = spec.run_config(spec.baseline, spec.seeds[0]).task.name
    return {"spec": {"methods": spec.methods, "seeds": spec.seeds, "steps": spec.steps, "eval_every": spec.eval_every,
                     "jobs": spec.jobs, "task": task, "baseline": spec.baseline, "detect": spec.detect,
                     "runs": str(spec.runs) if spec.runs else None,
                     "sweeps": [s.model_dump() for s in spec.sweeps], "entries": len(spec.entries()),
                     "eval_size": spec.eval_size, "config": str(spec.config) if spec.config else None,
                     "overrides": spec.overrides, "method_overrides": {m: o for m, o in overrides.items() if o}},
            "runs": records, "summary": summarize(records, spec.detect), "credit": credit}


RUN_LOGS = ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json")


def copy_run_logs(spec: GridSpec) -> None:
    """Each run's logs (RUN_LOGS, not its checkpoints or model) into <out>/metrics/<run folder name>/."""
    for entry, seed in ((e, s) for e in spec.entries() for s in spec.seeds):
        source = spec.run_dir(entry, seed)
        target = spec.out / "metrics" / source.name
        target.mkdir(parents=True, exist_ok=True)
        for name in RUN_LOGS:
            shutil.copyfile(source / name, target / name)


def compare(spec: GridSpec, on_progress: Callable[[int], None] | None = None, console=None) -> dict[str, Path]:
    """Run the grid (resumably), score credit per entry, and write the report folder (with the runs' logs when
    the runs live elsewhere)."""
    run_grid(spec, on_progress, console)
    paths = write_report(spec.out, collect_results(spec, credit_accuracy_table(spec)))
    if spec.runs is not None:
        copy_run_logs(spec)
    return paths
