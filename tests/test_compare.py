import json
import math

import pytest
from typer.testing import CliRunner

from creditrl.cli import app
from creditrl.compare import GridSpec, compare, default_methods, first_reach, mean_ci, summarize, t_quantile

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


def test_t_quantile_matches_tables():
    assert t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile(60) == pytest.approx(2.000, abs=3e-3)


def test_mean_ci_by_hand():
    # mean 0.6, sd 0.1, se 0.1/√3 = 0.057735, half-width 4.3027 · 0.057735 = 0.24842
    mean, half = mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(0.24842, abs=1e-4)
    # two seeds: sd = |a − b|/√2, half-width 12.7062 · sd/√2 = 12.7062 · 0.1 = 1.27062
    assert mean_ci([0.2, 0.4])[1] == pytest.approx(1.27062, abs=1e-4)
    assert math.isnan(mean_ci([0.3])[1])


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
