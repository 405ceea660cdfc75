"""The `creditrl compare` report: report.md, a self-contained report.html, results.json and two PNG plots.

The results table gives, per entry (a method, at a cell of the sweeps), the final held-out avg@k (pass@1)
mean ± 95% t interval over seeds, its standard deviation over seeds beside the final evaluation's standard error
over problems (mean over seeds), the steps and training seconds to reach its baseline's mean final avg@k,
and compute per step (wall and CPU seconds among them); a warning line follows when the machine's mean load
over the grid's steps exceeded its cores.  The paired table gives each entry's differences from its baseline
seed by seed (final avg@k, area under the learning curve), the verdict, the evaluation's standard error
beside the seeds' spread, and the power calculation; the difficulty table the final avg@k by difficulty.
Plots: learning curves (mean avg@k over seeds, band from the lowest to the highest seed) and
final accuracy against training seconds per step (error bars: the 95% interval).  The HTML page
embeds the PNGs as base64 data URIs; inline CSS only, no network; all text is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PLOTS = {"curves.png": "learning curves", "compute.png": "accuracy against compute"}
CREDIT_COLUMNS = [("hit_rate", "hit@1"), ("hit_chance", "chance"), ("auc", "AUC"), ("auc_within", "AUC within"),
                  ("f1", "F1 (ProcessBench)"), ("error_accuracy", "first error found"),
                  ("correct_accuracy", "correct unflagged"),
                  ("before", "before"), ("after", "from error"), ("entropy", "entropy")]


def write_report(out: Path, results: dict) -> dict[str, Path]:
    """Write results.json, the plots, report.md and report.html into `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(results, indent=2))
    plot_curves(results, out / "curves.png")
    plot_compute(results, out / "compute.png")
    paths["md"].write_text(render_markdown(results))
    paths["html"].write_text(render_html(results, {name: (out / name).read_bytes() for name in PLOTS}))
    return paths


# ---- plots --------------------------------------------------------------------------------------
MARKERS = "osD^v<>ph*XP"


def _styles(methods: list[str]) -> dict[str, dict]:
    """A distinct colour (tab20: 20 of them) and marker per method, so a dozen methods stay apart."""
    colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10").colors
    return {m: {"color": colours[i % len(colours)], "marker": MARKERS[i % len(MARKERS)]} for i, m in enumerate(methods)}


def plot_curves(results: dict, path: Path) -> None:
    """avg@k against step: the mean over seeds, with a band from the lowest to the highest seed."""
    methods = list(results["summary"]["methods"])
    styles = _styles(methods)
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    for method in methods:
        curves = [r["curve"] for r in results["runs"] if r.get("entry", r["method"]) == method]
        steps = [p["step"] for p in curves[0]]
        values = [[c[i]["avg@k"] for c in curves] for i in range(len(steps))]
        ax.plot(steps, [sum(v) / len(v) for v in values], label=method, **styles[method])
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=styles[method]["color"],
                        alpha=0.2 if len(methods) <= 4 else 0.06)
    target = results["summary"]["target"]
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1,
                   label=f"{results['spec'].get('baseline', 'grpo')} final (mean)")
    ax.set(xlabel="policy-update step", ylabel="held-out avg@k (pass@1)",
           title="learning curves (band: min–max over seeds)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compute(results: dict, path: Path) -> None:
    """Final avg@k (mean, 95% interval) against training seconds per step."""
    styles = _styles(list(results["summary"]["methods"]))
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    for method, s in results["summary"]["methods"].items():
        half = s["final_ci95"] or 0.0
        ax.errorbar([s["compute"]["seconds_per_step"]], [s["final_mean"]], yerr=[half], capsize=3, linestyle="none",
                    label=method, **styles[method])
    ax.margins(0.1)  # no marker on the axes' edge
    ax.set(xlabel="training seconds per step (mean over seeds)", ylabel="final avg@k (pass@1)",
           title="accuracy against compute (bars: 95% interval)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- tables -------------------------------------------------------------------------------------
def results_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table, as text."""
    header = ["entry", "start", "final avg@k (mean ± 95% CI)", "per seed", "sd over seeds", "eval SE",
              "steps to baseline's final",
              "train s to baseline's final", "s / step", "CPU s / step", "extra gen. tokens / step",
              "extra forwards / step", "critic calls / step", "sampling rounds / step", "skipped steps", "peak RSS MB"]
    rows = []
    for method, s in results["summary"]["methods"].items():
        c = s["compute"]
        rows.append([method, _pct(s["start"]), f"{_pct(s['final_mean'])} ± {_pct(s['final_ci95'])}",
                     " ".join(_pct(f) for f in s["final"]), _pts(s.get("seed_sd")), _pts(s.get("eval_se")),
                     " ".join(_maybe(x, "{:d}") for x in s["steps_to_target"]),
                     " ".join(_maybe(x, "{:.0f}") for x in s["seconds_to_target"]), f"{c['seconds_per_step']:.2f}",
                     _maybe(c["cpu_seconds_per_step"], "{:.2f}"),
                     f"{c['extra_generated_tokens']:.0f}", f"{c['extra_forward_passes']:.0f}",
                     f"{c['critic_calls']:.0f}",
                     f"{c['gen_rounds']:.2f}", f"{c['skipped_steps']:.1f}", f"{c['peak_rss_mb']:.0f}"])
    return header, rows


def paired_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paired table: every entry but the baselines, against its baseline."""
    delta = results["summary"].get("detect", 0.05)
    header = ["entry", "baseline", "seeds", "Δ final (± 95% CI)", "verdict", "Δ area (± 95% CI)",
              "eval SE of Δ", "sd of Δ over seeds", f"seeds to detect {_pts(delta)}", "detectable now"]
    rows = []
    for entry, s in results["summary"]["methods"].items():
        p = s.get("paired")
        if p is None:
            continue
        rows.append([entry, s["baseline"], str(len(p["final"]["seeds"])), _diff(p["final"]),
                     p["final"]["verdict"] or "–", _diff(p["area"]), _pts(p["eval_se"]), _pts(p["final"]["sd"]),
                     _maybe(p["seeds_needed"], "{:d}") if p["final"]["sd"] is not None else "–",
                     _pts(p["detectable"])])
    return header, rows


def difficulty_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the difficulty table: each entry's final avg@k by difficulty (mean over seeds), and its
    paired difference from its baseline there."""
    entries = results["summary"]["methods"]
    keys = sorted({k for s in entries.values() for k in s.get("by_difficulty", {})}, key=_difficulty_order)
    rows = []
    for entry, s in entries.items():
        p = s.get("paired") or {}
        cells = []
        for key in keys:
            values = list(s["by_difficulty"].get(key, {}).values())
            d = p.get("by_difficulty", {}).get(key)
            mean = _pct(sum(values) / len(values)) if values else "–"
            cells.append(mean + (f" ({_diff(d)})" if d is not None and d["mean"] is not None else ""))
        rows.append([entry, *cells])
    return ["entry", *keys], rows


def _difficulty_order(key: str) -> tuple:
    name, _, value = key.partition("=")
    return (name, 0, float(value), "") if value.lstrip("-").replace(".", "", 1).isdigit() else (name, 1, 0.0, value)


def _diff(d: dict) -> str:
    """A paired difference as `+3.1 ± 2.0 pts` (no interval with one pair)."""
    if d["mean"] is None:
        return "–"
    return f"{100 * d['mean']:+.1f}" + (f" ± {100 * d['ci95']:.1f}" if d["ci95"] is not None else "") + " pts"


def _pts(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f} pts"


def credit_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the credit-accuracy table, as text."""
    header = ["method", *(label for _, label in CREDIT_COLUMNS), "wrong / correct"]
    rows = [[name, *(_maybe(m[key], "{:.3f}") for key, _ in CREDIT_COLUMNS), f"{m['n_wrong']} / {m['n_correct']}"]
            for name, m in results["credit"]["metrics"].items()]
    return header, rows


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _maybe(x: float | None, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _context(results: dict) -> list[str]:
    spec, target, load = results["spec"], results["summary"]["target"], results["summary"]["load"]
    baseline = spec.get("baseline", "grpo")
    size = f"{spec['eval_size']} held-out problems" if spec["eval_size"] else "the task's held-out set"
    sweeps = "; ".join(f"{'+'.join(s['set'])} over {s['values']}"
                       + (f" (for {', '.join(s['methods'])})" if s["methods"] else "") for s in spec.get("sweeps", []))
    return [(f"Task {spec.get('task', 'lab')}: {len(spec['methods'])} methods"
             + (f" in {spec['entries']} entries (sweeps: {sweeps})" if sweeps else "")
             + f" × seeds {spec['seeds']}, {spec['steps']} policy-update steps each, "
             f"evaluated every {spec['eval_every']} steps on {size}."),
            (f"Base config: {spec['config'] or 'defaults'}; overrides: {' '.join(spec['overrides']) or 'none'}; "
             f"per-method settings: {spec['method_overrides'] or 'none'}."),
            (f"{baseline}'s mean final avg@k (the target): "
             + (_pct(target) if target is not None else f"– (no unswept {baseline} run)") + "."),
            ("Train seconds: sum of per-step time, evaluations excluded (a skipped step logs no time). Extra forwards: "
             "sequences scored by the no-grad old-log-prob (and KL reference) forward, plus value-estimation generate "
             "calls. Peak RSS: " + ("each run's own peak (one process per run, "
                                    f"{spec['jobs']} at a time)." if spec.get("jobs", 1) > 1 else
                                    "the process's peak so far (runs share one process).")),
            ("s / step is wall time; CPU s / step is the process's CPU time over all its threads. CPU time ranks "
             "cost robustly on a shared machine, since it does not count time spent waiting for a core. "
             f"Machine load over the grid's steps (1-minute average): mean {_maybe(load['mean'], '{:.2f}')}, "
             f"peak {_maybe(load['peak'], '{:.2f}')}, on {load['cores'] or '–'} cores.")]


def _load_warning(results: dict) -> str | None:
    """The warning when the machine's mean load over the grid's steps exceeded its cores, else None."""
    load = results["summary"]["load"]
    if load["mean"] is None or not load["cores"] or load["mean"] <= load["cores"]:
        return None
    return (f"Warning: the machine was busy: load {load['mean']:.2f} on {load['cores']} cores; "
            "wall times are inflated, compare CPU times.")


def _paired_context(results: dict) -> list[str]:
    baseline = results["spec"].get("baseline", "grpo")
    delta = _pts(results["summary"].get("detect", 0.05))
    return [(f"Each entry against {baseline} at the same cell (a sweep that does not apply to {baseline} leaves it "
             "at its one unswept run), seed by seed: runs with the same seed share the prompt order, the "
             "evaluation set and its sampling seed. Δ: the mean over seeds of the per-seed difference, ± the 95% "
             "Student-t interval t_{0.975, n−1}·sd/√n. Area: the mean avg@k over the evaluations after step 0 "
             "(sample efficiency)."),
            ("Verdict (final avg@k): better when the interval lies above 0, worse below, not distinguishable at "
             "this budget when it holds 0. Eval SE of Δ: sqrt(se² + se_baseline²) from each final evaluation's "
             "standard error over problems (an upper bound: both evaluate the same problems); compare it with the "
             "sd of Δ over seeds to see which noise dominates."),
            (f"Seeds to detect {delta}: the smallest n ≥ 2 with n ≥ ((t_{{0.975,n−1}} + t_{{0.80,n−1}})·sd/δ)² "
             "(paired t-test, two-sided α = 0.05, power 0.8, sd of Δ over seeds as measured); detectable now: "
             "(t_{0.975,n−1} + t_{0.80,n−1})·sd/√n with the n seeds run.")]


def _difficulty_context(results: dict) -> str:
    return ("Final avg@k on the problems of each difficulty (Problem.meta's step count or level), mean over seeds, "
            "and in brackets the paired difference from the entry's baseline, ± its 95% t interval.")


def _credit_context(results: dict) -> str:
    c = results["credit"]
    skipped = "; ".join(f"{m}: {why}" for m, why in c["skipped"].items())
    batches = c["batches"]
    sampled = (f"One batch from the starting policy: {c['prompts']} held-out prompts, {batches[0]['responses']} "
               f"responses ({100 * batches[0]['correct']:.0f}% correct)." if len(batches) == 1 else
               f"{len(batches)} batches from the starting policy, one per distinct task, sampling and reward setting "
               f"of the entries: {c['prompts']} held-out prompts each ("
               + ", ".join(f"{100 * b['correct']:.0f}%" for b in batches) + " correct).")
    return sampled + (f" Skipped: {skipped}." if skipped else "")


# ---- markdown -----------------------------------------------------------------------------------
def render_markdown(results: dict) -> str:
    warning = _load_warning(results)
    parts = ["# creditrl compare", "", *_context(results), "", *([f"**{warning}**", ""] if warning else []),
             "## Results", "", _md_table(*results_rows(results)), "", *_md_paired(results),
             "## Learning curves", "", "![learning curves](curves.png)", "",
             "## Accuracy against compute", "", "![accuracy against compute](compute.png)", ""]
    if results["credit"] is not None:
        parts += ["## Credit accuracy", "", _credit_context(results), "", _md_table(*credit_rows(results)), ""]
    runs = results["spec"].get("runs")
    parts += ["Raw numbers: `results.json`; " + (f"each run's logs: `metrics/<run>/` (run folders in `{runs}`)." if runs
                                                 else "run folders: `runs/<method>[@<cell>]-seed<s>/`."), ""]
    return "\n".join(parts)


def _md_paired(results: dict) -> list[str]:
    parts = []
    header, rows = paired_rows(results)
    if rows:
        parts += [f"## Paired against {results['spec'].get('baseline', 'grpo')}", "",
                  *_paragraphs(_paired_context(results)), _md_table(header, rows), ""]
    header, rows = difficulty_rows(results)
    if len(header) > 1:
        parts += ["## By difficulty", "", _difficulty_context(results), "", _md_table(header, rows), ""]
    return parts


def _paragraphs(lines: list[str]) -> list[str]:
    return [x for line in lines for x in (line, "")]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ---- html ---------------------------------------------------------------------------------------
def render_html(results: dict, pngs: dict[str, bytes]) -> str:
    """The whole page as one string; `pngs` maps a PLOTS file name to its bytes."""
    warning = _load_warning(results)
    body = ["<h1>creditrl compare</h1>", *(f"<p class='context'>{_e(line)}</p>" for line in _context(results)),
            *([f"<p class='warning'>{_e(warning)}</p>"] if warning else []),
            "<h2>Results</h2>", _html_table(*results_rows(results))]
    header, rows = paired_rows(results)
    if rows:
        body += [f"<h2>Paired against {_e(results['spec'].get('baseline', 'grpo'))}</h2>",
                 *(f"<p class='context'>{_e(line)}</p>" for line in _paired_context(results)),
                 _html_table(header, rows)]
    header, rows = difficulty_rows(results)
    if len(header) > 1:
        body += ["<h2>By difficulty</h2>", f"<p class='context'>{_e(_difficulty_context(results))}</p>",
                 _html_table(header, rows)]
    for name, caption in PLOTS.items():
        data = base64.b64encode(pngs[name]).decode("ascii")
        body += [f"<h2>{_e(caption.capitalize())}</h2>",
                 f"<img alt='{_e(caption)}' src='data:image/png;base64,{data}'>"]
    if results["credit"] is not None:
        body += ["<h2>Credit accuracy</h2>", f"<p class='context'>{_e(_credit_context(results))}</p>",
                 _html_table(*credit_rows(results))]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>creditrl compare</title>"
            f"<style>{_css()}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    cells = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _css() -> str:
    return ("body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
            ".context{color:#555;font-size:.9em;margin:.2em 0}"
            ".warning{color:#a40;font-weight:bold;margin:.6em 0}"
            "table{border-collapse:collapse;margin:.8em 0;font-size:.85em}"
            "th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}"
            "th:first-child,td:first-child{text-align:left}"
            "img{max-width:100%;border:1px solid #eee}")
