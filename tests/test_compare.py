import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from creditrl.cli import app
from creditrl.compare import GridSpec, compare, default_methods, first_reach, summarize

METHODS, SEEDS = ["grpo", "grpo_lambda"], [0, 1]


def _overrides(model_dir):
    return [f"model.name={model_dir}", "rollout.prompts_per_step=3", "rollout.group_size=4", "task.lab.train_size=200",
            "eval.k=2", "sampling.max_new_tokens=24", "train.lr=1e-3", "train.threads=1"]


@pytest.fixture(scope="module")
def grid(tiny_lab_model_dir, tmp_path_factory):
    spec = GridSpec(METHODS, SEEDS, steps=2, eval_every=1, eval_size=6, overrides=_overrides(tiny_lab_model_dir),
                    out=tmp_path_factory.mktemp("compare"))
    progress = []
    paths = compare(spec, progress.append)
    return spec, paths, progress


def _record(method, seed, curve, step_seconds, cpu=None, loads=None):
    """A run record as `run_record` gives it; without `cpu` and `loads`, one logged before those fields."""
    compute = {"train_seconds": sum(step_seconds), "seconds_per_step": 1.0, "cpu_seconds_per_step": cpu,
               "extra_generated_tokens": 0.0, "extra_forward_passes": 0.0, "critic_calls": 0.0, "gen_rounds": 1.0,
               "skipped_steps": 0.0, "peak_rss_mb": 100.0 + seed}
    return {"method": method, "seed": seed, "wall_seconds": 10.0, "step_seconds": step_seconds,
            "curve": [{"step": s, "avg@k": a} for s, a in curve], "compute": compute, "step_load": loads or []}


def _results(records):
    spec = {"methods": sorted({r["method"] for r in records}), "seeds": [0, 1], "steps": 2, "eval_every": 2,
            "eval_size": 6, "config": None, "overrides": [], "method_overrides": {}, "jobs": 1}
    return {"spec": spec, "runs": records, "summary": summarize(records), "credit": None}


def _cell(results, method, column):
    from creditrl.report.compare_report import results_rows

    header, rows = results_rows(results)
    return next(row for row in rows if row[0] == method)[header.index(column)]


def test_steps_and_seconds_to_grpo_final_by_hand():
    records = [_record("grpo", 0, [(0, 0.1), (2, 0.3), (4, 0.5)], [1, 1, 1, 1]),
               _record("grpo", 1, [(0, 0.1), (2, 0.4), (4, 0.7)], [1, 1, 1, 1]),
               _record("x", 0, [(0, 0.1), (2, 0.6), (4, 0.6)], [2, 3, 5, 5]),
               _record("x", 1, [(0, 0.1), (2, 0.2), (4, 0.3)], [2, 2, 2, 2])]
    summary = summarize(records)
    assert summary["target"] == pytest.approx(0.6)  # GRPO's finals 0.5 and 0.7
    x = summary["methods"]["x"]
    assert x["steps_to_target"] == [2, None] and x["seconds_to_target"] == [5, None]
    assert x["mean_steps_to_target"] == 2 and x["compute"]["peak_rss_mb"] == 101.0
    assert summary["methods"]["grpo"]["steps_to_target"] == [None, 4]
    assert first_reach(records[1], 0.65) == (4, 4)
    assert first_reach(records[1], 0.05) == (2, 2)  # the starting policy (step 0) never counts as reaching


def test_default_grid_is_every_registered_method_and_runs_offline():
    from creditrl.methods import known_methods

    assert default_methods() == known_methods() and {"grpo", "capo", "vineppo", "prm"} <= set(default_methods())
    spec = GridSpec(default_methods())
    assert spec.run_config("capo", 0).critic.backend == "oracle" and spec.run_config("prm", 0).prm.kind == "oracle"
    assert spec.run_config("vineppo", 0).method_params["k"] == 3
    assert GridSpec(["vineppo"], overrides=["method_params.k=9"]).run_config("vineppo", 0).method_params["k"] == 9


@pytest.mark.slow
def test_report_files_and_json(grid):
    spec, paths, progress = grid
    for name in ("report.md", "report.html", "results.json", "curves.png", "compute.png"):
        assert (spec.out / name).exists()
    page = paths["html"].read_text()
    assert page.count("src='data:image/png;base64,iVBOR") == 2  # both plots embedded (the PNG signature)
    results = json.loads(paths["json"].read_text())
    assert set(results) == {"spec", "runs", "summary", "credit"}
    assert len(results["runs"]) == 4 and set(results["summary"]["methods"]) == set(METHODS)
    grpo = results["summary"]["methods"]["grpo"]
    for key in ("final", "final_mean", "final_ci95", "steps_to_target", "seconds_to_target", "compute"):
        assert key in grpo
    assert set(grpo["compute"]) >= {"seconds_per_step", "extra_generated_tokens", "extra_forward_passes",
                                    "critic_calls", "peak_rss_mb"}
    assert grpo["compute"]["peak_rss_mb"] > 0 and grpo["compute"]["cpu_seconds_per_step"] > 0
    assert results["summary"]["load"]["peak"] >= results["summary"]["load"]["mean"] >= 0
    assert [p["step"] for p in results["runs"][0]["curve"]] == [0, 1, 2]
    assert set(results["credit"]["metrics"]) == set(METHODS)
    assert "| grpo |" in paths["md"].read_text()
    assert progress[-1] == 4 * spec.steps


@pytest.mark.slow
def test_second_invocation_does_not_retrain(grid, tiny_lab_model_dir):
    spec, _, _ = grid
    files = [spec.run_dir(m, s) / "metrics.jsonl" for m in METHODS for s in SEEDS]
    before = [f.stat().st_mtime_ns for f in files]
    args = ["compare", *_overrides(tiny_lab_model_dir), "--steps", "2", "--eval-every", "1", "--eval-size", "6",
            "--out", str(spec.out), "--methods", ",".join(METHODS), "--seeds", ",".join(map(str, SEEDS))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [f.stat().st_mtime_ns for f in files] == before
    assert "report.html" in result.output


@pytest.mark.slow
def test_a_grid_folder_with_longer_runs_or_another_eval_schedule_is_refused(grid, tiny_lab_model_dir):
    """Resuming would have reported 2-step runs as 1-step ones, or averaged curves evaluated at other steps."""
    from creditrl.compare import run_grid
    from creditrl.trainer import TrainingStopped

    spec, _, _ = grid
    files = [spec.run_dir(m, s) / "metrics.jsonl" for m in METHODS for s in SEEDS]
    before = [f.stat().st_mtime_ns for f in files]
    shorter = GridSpec(METHODS, SEEDS, steps=1, eval_every=1, eval_size=6, overrides=spec.overrides, out=spec.out)
    with pytest.raises(TrainingStopped, match="trained 2 steps, more than the grid's 1"):
        run_grid(shorter)
    sparser = GridSpec(METHODS, SEEDS, steps=2, eval_every=2, eval_size=6, overrides=spec.overrides, out=spec.out)
    with pytest.raises(TrainingStopped, match=r"another schedule than the grid \(eval.every \(1 -> 2\)\)"):
        run_grid(sparser)
    assert [f.stat().st_mtime_ns for f in files] == before  # nothing was retrained or rewritten


def test_extra_forward_passes_are_the_runs_logged_scoring_forwards_generate_calls_and_resource_forwards():
    from creditrl.compare import run_compute

    steps = [{"scoring_forwards": 12.0, "extra_generate_calls": 3.0, "resource_forwards": 8.0, "time_step": 1.0},
             {"scoring_forwards": 0.0, "extra_generate_calls": 1.0, "resource_forwards": 4.0, "time_step": 2.0}]
    compute = run_compute(steps)
    assert compute["extra_forward_passes"] == (12 + 3 + 8 + 0 + 1 + 4) / 2 and compute["seconds_per_step"] == 1.5


@pytest.mark.slow
def test_parallel_runs_give_the_same_results_as_one_after_another(tiny_lab_model_dir, tmp_path):
    from creditrl.compare import collect_results, run_grid

    finals = {}
    for jobs in (1, 2):
        spec = GridSpec(["grpo", "rloo"], [0], steps=2, eval_every=2, eval_size=4, jobs=jobs,
                        overrides=_overrides(tiny_lab_model_dir), out=tmp_path / f"jobs{jobs}")
        progress = []
        run_grid(spec, progress.append)
        assert progress[0] == 0 and progress[-1] == 4 and progress == sorted(progress)
        runs = collect_results(spec)["runs"]
        finals[jobs] = [(r["method"], r["curve"]) for r in runs]
    assert finals[1] == finals[2]


def test_cpu_seconds_per_step_come_from_the_logged_cpu_step():
    from creditrl.compare import run_compute

    steps = [{"time_step": 2.0, "cpu_step": 1.5}, {"skipped": 1.0}, {"time_step": 3.0, "cpu_step": 4.5}]
    assert run_compute(steps)["cpu_seconds_per_step"] == (1.5 + 4.5) / 3  # a skipped step counts as one, as for wall
    curve = [(0, 0.1), (2, 0.3)]
    results = _results([_record("grpo", 0, curve, [1, 1], cpu=2.0), _record("grpo", 1, curve, [1, 1], cpu=2.5)])
    assert results["summary"]["methods"]["grpo"]["compute"]["cpu_seconds_per_step"] == pytest.approx(2.25)
    assert _cell(results, "grpo", "CPU s / step") == "2.25" and _cell(results, "grpo", "s / step") == "1.00"


def test_runs_logged_before_cpu_and_load_show_a_dash():
    from creditrl.compare import run_compute
    from creditrl.report.compare_report import render_markdown

    assert run_compute([{"time_step": 2.0}, {"time_step": 3.0}])["cpu_seconds_per_step"] is None
    curve = [(0, 0.1), (2, 0.3)]
    results = _results([_record("grpo", 0, curve, [1, 1]), _record("grpo", 1, curve, [1, 1], cpu=2.0)])
    assert results["summary"]["methods"]["grpo"]["compute"]["cpu_seconds_per_step"] is None
    assert results["summary"]["load"]["mean"] is None and results["summary"]["load"]["peak"] is None
    assert _cell(results, "grpo", "CPU s / step") == "–"
    page = render_markdown(results)
    assert "mean –, peak –" in page and "busy" not in page


@pytest.mark.parametrize("loads, busy", [([2.0, 3.0, 2.5, 2.5], True), ([1.0, 3.0, 2.0, 2.0], False)])
def test_the_busy_machine_warning_appears_when_the_mean_load_exceeds_the_cores(monkeypatch, loads, busy):
    """Means 2.5 and 2.0 on 2 cores: the second grid's peak (3.0) is above the cores, its mean is not."""
    import os

    from creditrl.report.compare_report import PLOTS, render_html, render_markdown

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    curve = [(0, 0.1), (2, 0.3)]
    results = _results([_record("grpo", 0, curve, [1, 1], cpu=1.0, loads=loads[:2]),
                        _record("grpo", 1, curve, [1, 1], cpu=1.0, loads=loads[2:])])
    mean = sum(loads) / 4
    assert results["summary"]["load"] == {"mean": mean, "peak": 3.0, "cores": 2}
    warning = f"the machine was busy: load {mean:.2f} on 2 cores; wall times are inflated, compare CPU times"
    assert (warning in render_markdown(results)) == busy
    assert (warning in render_html(results, {name: b"" for name in PLOTS})) == busy


def _paired_records():
    """grpo and x over seeds 0..2, with the final evaluations' standard errors and accuracy by difficulty."""
    records = []
    for method, finals, mids, se in [("grpo", [0.4, 0.5, 0.6], [0.3, 0.3, 0.3], 0.03),
                                     ("x", [0.5, 0.7, 0.9], [0.4, 0.3, 0.5], 0.04)]:
        for seed, (final, mid) in enumerate(zip(finals, mids)):
            r = _record(method, seed, [(0, 0.1), (2, mid), (4, final)], [1, 1, 1, 1])
            r["final_se"] = se
            r["final_by_difficulty"] = {"steps=2": final + 0.1, "steps=5": final - 0.1 * (method == "x")}
            records.append(r)
    return records


def test_paired_differences_area_noise_and_power_by_hand():
    from creditrl.report.compare_report import difficulty_rows, paired_rows

    summary = summarize(_paired_records(), detect=0.05)
    x = summary["methods"]["x"]
    assert summary["methods"]["grpo"]["paired"] is None and x["baseline"] == "grpo"
    p = x["paired"]
    # final differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half-width t_{0.975,2}·0.1/√3 = 4.3027·0.057735 = 0.24842
    assert p["final"]["mean"] == pytest.approx(0.2) and p["final"]["ci95"] == pytest.approx(0.24842, abs=1e-4)
    assert p["final"]["verdict"] == "not distinguishable"
    # areas (evaluations after step 0): grpo 0.35, 0.4, 0.45; x 0.45, 0.5, 0.7 -> differences 0.1, 0.1, 0.25
    assert x["area"] == pytest.approx([0.45, 0.5, 0.7]) and p["area"]["mean"] == pytest.approx(0.15)
    # eval SE of the difference: √(0.04² + 0.03²) = 0.05; the seeds' sd of x's finals: 0.2
    assert p["eval_se"] == pytest.approx(0.05) and x["seed_sd"] == pytest.approx(0.2) and x["eval_se"] == 0.04
    # sd/δ = 2: n = 34 is the first with n ≥ ((t_{.975,n−1} + t_{.80,n−1})·2)² (33.34 at 34; 33.41 at 33)
    assert p["seeds_needed"] == 34
    # detectable with 3 seeds: (4.3027 + 1.0607)·0.1/√3 = 0.30966
    assert p["detectable"] == pytest.approx(0.30966, abs=1e-4)
    # by difficulty: steps=2 differences as the finals' (mean 0.2); steps=5 differences 0.0, 0.1, 0.2 (mean 0.1)
    assert p["by_difficulty"]["steps=2"]["mean"] == pytest.approx(0.2)
    assert p["by_difficulty"]["steps=5"]["mean"] == pytest.approx(0.1)
    results = _results(_paired_records())
    header, rows = paired_rows(results)
    assert rows == [["x", "grpo", "3", "+20.0 ± 24.8 pts", "not distinguishable", _area(p),
                     "5.0 pts", "10.0 pts", "34", "31.0 pts"]]
    assert _cell(results, "x", "sd over seeds") == "20.0 pts" and _cell(results, "x", "eval SE") == "4.0 pts"
    header, rows = difficulty_rows(results)
    assert header == ["entry", "steps=2", "steps=5"] and rows[1][0] == "x" and rows[1][2].startswith("60.0% (+10.0 ±")


def _area(p):
    return f"{100 * p['area']['mean']:+.1f} ± {100 * p['area']['ci95']:.1f} pts"


def test_a_method_better_on_every_seed_by_more_than_the_noise_is_better():
    records = _paired_records()
    for r in records:
        if r["method"] == "x":
            r["curve"][-1]["avg@k"] = {0: 0.5, 1: 0.61, 2: 0.69}[r["seed"]]  # differences 0.1, 0.11, 0.09
    assert summarize(records)["methods"]["x"]["paired"]["final"]["verdict"] == "better"
    for r in records:
        if r["method"] == "x":
            r["curve"][-1]["avg@k"] -= 0.2  # differences −0.1, −0.09, −0.11
    assert summarize(records)["methods"]["x"]["paired"]["final"]["verdict"] == "worse"


def test_sweeps_make_a_cartesian_grid_paired_with_the_baseline_at_the_same_cell():
    from creditrl.compare import Entry
    from creditrl.config.study import Sweep

    recall = Sweep(set="critic.recall", values=[1, 0.8], methods=["capo"])
    size = Sweep(set=["task.lab.min_steps", "task.lab.max_steps"], values=[2, [3, 4]])
    spec = GridSpec(["grpo", "capo"], [0], sweeps=[recall, size])
    entries = spec.entries()
    assert [e for e in entries if e.method == "grpo"] == [Entry("grpo", ((1, 0),)), Entry("grpo", ((1, 1),))]
    assert len([e for e in entries if e.method == "capo"]) == 4  # 2 recalls × 2 sizes
    capo = Entry("capo", ((0, 1), (1, 1)))
    assert spec.baseline_of(capo) == Entry("grpo", ((1, 1),))  # recall does not apply to grpo: its one run
    assert spec.label(capo) == "capo [critic.recall=0.8, task.lab.min_steps=3,task.lab.max_steps=4]"
    assert spec.label(Entry("grpo", ((1, 0),))) == "grpo [task.lab.min_steps+task.lab.max_steps=2]"
    cfg = spec.run_config(capo, 0)
    assert cfg.critic.recall == 0.8 and (cfg.task.lab.min_steps, cfg.task.lab.max_steps) == (3, 4)
    assert cfg.run_dir().name == "capo@critic.recall=0.8,task.lab.min_steps=3,task.lab.max_steps=4-seed0"
    assert cfg.task.lab.eval_size == 200 and spec.run_config("grpo", 0).critic.recall == 1.0


def test_eval_size_is_set_wherever_the_tasks_section_keeps_it():
    from creditrl.compare import eval_size_setting
    from creditrl.config import ConfigError, GSM8KSection, LabSection
    from creditrl.config.tasks import TaskConfig

    assert eval_size_setting(LabSection()) == "task.lab.eval_size"
    assert eval_size_setting(GSM8KSection()) == "task.eval_size"
    with pytest.raises(ConfigError, match="task.name=plain: its section has no eval_size"):
        eval_size_setting(TaskConfig(name="plain"))
    assert GridSpec(["grpo"], eval_size=None).run_config("grpo", 0).task.lab.eval_size == 400  # the task's own


def test_a_grid_file_is_checked_naming_the_field(tmp_path):
    from creditrl.config import ConfigError
    from creditrl.config.study import load_study

    path = tmp_path / "tiny.yaml"
    path.write_text("methods: [grpo, capo]\nseeds: [0, 1]\nsteps: 3\nsweeps:\n"
                    "  - set: critic.recall\n    values: [1, 0.5]\n    methods: [capo]\n")
    study = load_study(path)
    assert study.out == Path("docs/studies/tiny") and study.runs == Path("runs/studies/tiny")
    assert study.sweeps[0].overrides(1) == ["critic.recall=0.5"]
    spec = GridSpec.from_study(study)
    assert len(spec.entries()) == 3 and spec.seeds == [0, 1] and spec.steps == 3
    for text, message in [("methods: [grpo]\nstep: 3\n", "unknown key 'step'"),
                          ("methods: [capo]\n", "baseline 'grpo' is not among the methods"),
                          ("methods: [grpo]\nsweeps:\n  - set: a.b\n    values: [1]\n    methods: [capo]\n",
                           "sweeps\\[0\\].methods names \\['capo'\\]"),
                          ("methods: [grpo]\nsweeps:\n  - set: [a, b]\n    values: [[1, 2, 3]]\n",
                           "values\\[0\\] has 3 items"),
                          ("methods: [grpo]\nsweeps:\n  - set: a.b\n    values: []\n", "sweeps.0.values")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_study(path)


def test_compare_refuses_grid_options_beside_a_grid_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("methods: [grpo]\n")
    result = CliRunner().invoke(app, ["compare", "--grid", str(path), "--seeds", "0,1"])
    assert result.exit_code == 2 and "set --seeds in the grid file" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["compare", "--methods", "grpo,rloo", "--baseline", "dapo"])
    assert result.exit_code == 2 and "--baseline: 'dapo' is not among the methods" in " ".join(result.output.split())


@pytest.mark.slow
def test_a_grid_file_with_a_sweep_runs_resumes_and_reports(tiny_lab_model_dir, tmp_path):
    study = tmp_path / "tiny.yaml"
    overrides = "\n".join(f"  - {o}" for o in _overrides(tiny_lab_model_dir))
    study.write_text(f"methods: [grpo, rloo]\nseeds: [0, 1]\nsteps: 1\neval_every: 1\neval_size: 4\n"
                     f"out: {tmp_path / 'out'}\nruns: {tmp_path / 'runs'}\noverrides:\n{overrides}\n"
                     "sweeps:\n  - set: train.lr\n    values: [0.001, 0.0001]\n    methods: [rloo]\n")
    result = CliRunner().invoke(app, ["compare", "--grid", str(study), "--jobs", "1"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["spec"]["task"] == "lab" and len(results["runs"]) == 6
    entries = results["summary"]["methods"]
    assert set(entries) == {"grpo", "rloo [train.lr=0.001]", "rloo [train.lr=0.0001]"}
    # the learning rate does not change the starting policy's batch: every entry's credit is read on the same one
    assert set(results["credit"]["metrics"]) == set(entries) and len(results["credit"]["batches"]) == 1
    for name in ("rloo [train.lr=0.001]", "rloo [train.lr=0.0001]"):
        finals = {r["seed"]: r["curve"][-1]["avg@k"] for r in results["runs"] if r["entry"] == name}
        grpo = {r["seed"]: r["curve"][-1]["avg@k"] for r in results["runs"] if r["entry"] == "grpo"}
        assert entries[name]["paired"]["final"]["diffs"] == pytest.approx([finals[s] - grpo[s] for s in (0, 1)])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Paired against grpo" in report and "| rloo [train.lr=0.0001] | grpo | 2 |" in report
    assert "Task lab:" in report and "## By difficulty" in report and "each run's logs: `metrics/<run>/`" in report
    files = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert files[0] == "grpo-seed0" and "rloo@train.lr=0.001-seed1" in files
    # the report folder holds each run's logs, the same bytes, and no checkpoint or model
    for name in files:
        for log in ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json"):
            copied, original = tmp_path / "out" / "metrics" / name / log, tmp_path / "runs" / name / log
            assert copied.read_bytes() == original.read_bytes()
    assert not list((tmp_path / "out").rglob("*.safetensors")) and not (tmp_path / "out" / "runs").exists()
    mtimes = [f.stat().st_mtime_ns for f in (tmp_path / "runs").glob("*/metrics.jsonl")]
    assert CliRunner().invoke(app, ["compare", "--grid", str(study), "--jobs", "1"]).exit_code == 0
    assert [f.stat().st_mtime_ns for f in (tmp_path / "runs").glob("*/metrics.jsonl")] == mtimes


STUDIES = sorted((Path(__file__).parents[1] / "studies").glob("*.yaml"))


def _study_tasks(study):
    from creditrl.config.study import load_study

    spec = GridSpec.from_study(load_study(study))
    assert spec.out == Path("docs/studies") / study.stem and len(spec.seeds) >= 5
    tasks = {}
    for entry in spec.entries():
        cfg = spec.run_config(entry, spec.seeds[0])
        tasks.setdefault(cfg.task.model_dump_json(), cfg.task)
    return spec, tasks.values()


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_every_study_file_resolves_each_runs_config(study):
    _study_tasks(study)


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_every_study_builds_its_tasks_with_the_held_out_size_asked(study):
    from creditrl.tasks import build_task

    spec, tasks = _study_tasks(study)
    for section in tasks:
        assert len(build_task(section).eval_problems()) == (spec.eval_size or 400)


def test_a_study_of_all_methods_runs_every_registered_one(tmp_path):
    from creditrl.config.study import load_study
    from creditrl.methods import known_methods

    path = tmp_path / "all.yaml"
    path.write_text("methods: all\nsweeps:\n  - set: critic.recall\n    values: [1, 0.5]\n    methods: [capo]\n")
    spec = GridSpec.from_study(load_study(path))
    assert spec.methods == known_methods() and len(spec.entries()) == len(known_methods()) + 1


@pytest.mark.slow
def test_compare_runs_on_a_task_other_than_the_lab_and_says_so(tiny_lab_model_dir, tmp_path):
    rows = Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl"
    overrides = [o for o in _overrides(tiny_lab_model_dir) if not o.startswith("task.")]
    spec = GridSpec(["grpo", "rloo"], [0], steps=1, eval_every=1, eval_size=3, task="jsonl", out=tmp_path / "out",
                    overrides=[*overrides, f"task.eval_path={rows}", f"task.train_path={rows}",
                               "task.answer_is_solution=true"])
    assert spec.run_config("grpo", 0).task.eval_size == 3
    paths = compare(spec)
    results = json.loads(paths["json"].read_text())
    assert results["spec"]["task"] == "jsonl" and "Task jsonl:" in paths["md"].read_text()
    assert [p["step"] for p in results["runs"][0]["curve"]] == [0, 1]
