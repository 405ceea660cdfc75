"""The credit heat-map page: every method's credit on the same responses, in one self-contained HTML file.

Each response is a block with one row per method, its tokens coloured by credit on a diverging
scale symmetric around 0 (red: negative credit, blame; white: 0; blue: positive).  Each method has
its own scale ±s_m for all its rows, so they compare across responses: s_m = the 95th percentile
(SCALE_QUANTILE) of |credit| over the method's response tokens on the page, or their max when that
is 0.  The 95th, not the 99th: a page holds a few hundred tokens, 1% of them two or three, so a
method with an outlier or two per response (DenseR's divergence weights) would still be scaled by its
outliers.  A token of credit c gets level k = round(LEVELS·c / s_m), clamped to [−LEVELS, LEVELS]; a
token with |c| > s_m is clipped, outlined and its hover says so (every hover shows the exact c).
Step boundaries are vertical bars; a verifier row shows the step labels (green right, red wrong);
the true first wrong step is underlined in every row.  Prompts are browsed with prev/next buttons,
the arrow keys or the list.  Inline CSS and JS only, no network; all text is escaped.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Mapping

import torch

from creditrl.credit import CreditMaps
from creditrl.credit_metrics import CreditAccuracy, first_wrong_step

LEVELS = 8
SCALE_QUANTILE = 0.95
NEUTRAL = (247, 247, 247)
NEGATIVE = (178, 24, 43)
POSITIVE = (33, 102, 172)
VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def level_colour(k: int) -> tuple[int, int, int]:
    """RGB of level k: NEUTRAL at 0, moving linearly to NEGATIVE (k = −LEVELS) or POSITIVE (k = LEVELS)."""
    end = NEGATIVE if k < 0 else POSITIVE
    t = abs(k) / LEVELS
    return tuple(round(n + t * (e - n)) for n, e in zip(NEUTRAL, end))


def credit_level(credit: float, scale: float) -> int:
    """round(LEVELS·credit / scale), clamped to ±LEVELS; 0 when the scale is 0."""
    if scale <= 0:
        return 0
    return max(-LEVELS, min(LEVELS, round(LEVELS * credit / scale)))


def method_scale(values: torch.Tensor) -> float:
    """s = the SCALE_QUANTILE quantile of |values| (linear interpolation), or their max when that is 0
    (0 for no values); colours saturate beyond ±s."""
    magnitudes = values.double().abs()
    if magnitudes.numel() == 0:
        return 0.0
    scale = float(torch.quantile(magnitudes, SCALE_QUANTILE))
    return scale if scale > 0 else float(magnitudes.max())


def write_heatmap(path: Path, maps: CreditMaps, accuracy: Mapping[str, CreditAccuracy] | None = None,
                  title: str = "creditrl credit", context: str = "") -> Path:
    """Render the page (see `render_heatmap`) to `path`."""
    path = Path(path)
    path.write_text(render_heatmap(maps, accuracy, title, context), encoding="utf-8")
    return path


def render_heatmap(maps: CreditMaps, accuracy: Mapping[str, CreditAccuracy] | None = None,
                   title: str = "creditrl credit", context: str = "") -> str:
    """The whole page as a string; `accuracy` (method -> metrics) adds the credit-accuracy table."""
    mask = maps.rollouts.response_mask.bool()
    scales = {name: method_scale(c[mask]) for name, c in maps.credit.items()}
    groups = _groups(maps)
    sections = "\n".join(_prompt_section(maps, scales, i, prompt, rows) for i, (prompt, rows) in enumerate(groups))
    parts = [
        f"<header><h1>{_e(title)}</h1><p>{_e(context)}</p></header>",
        _legend(),
        _methods_table(maps, scales),
        _accuracy_table(accuracy) if accuracy else "",
        '<div class="layout">',
        _nav(maps, groups),
        f"<main>{sections}</main>",
        "</div>",
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_css()}</style></head>\n<body>\n"
            + "\n".join(p for p in parts if p) + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


def _groups(maps: CreditMaps) -> list[tuple[str, list[int]]]:
    """(prompt text, rows) per problem, in order of first appearance."""
    r = maps.rollouts
    keys = r.problem_index if r.problem_index is not None else r.group_ids.tolist()
    rows: dict[int, list[int]] = {}
    for b, key in enumerate(keys):
        rows.setdefault(int(key), []).append(b)
    return [(maps.prompts[key] if key < len(maps.prompts) else f"prompt {key}", members)
            for key, members in rows.items()]


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _number(x: float, digits: int = 3) -> str:
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def _css() -> str:
    levels = []
    for k in range(-LEVELS, LEVELS + 1):
        r, g, b = level_colour(k)
        ink = "#fff" if abs(k) > 0.6 * LEVELS else "#111"
        levels.append(f".{_level_class(k)}{{background:rgb({r},{g},{b});color:{ink}}}")
    return _BASE_CSS + "".join(levels)


def _level_class(k: int) -> str:
    return "z" if k == 0 else f"n{-k}" if k < 0 else f"p{k}"


def _legend() -> str:
    swatches = "".join(f'<span class="sw {_level_class(k)}" title="{k / LEVELS:+.3f} × scale">&nbsp;</span>'
                       for k in range(-LEVELS, LEVELS + 1))
    return (
        '<section id="legend"><h2>Legend</h2>'
        f'<div class="scale"><span class="end">−s</span>{swatches}<span class="end">+s</span></div>'
        f"<p>Colour scale per method, the same for all its rows: ±s (shown next to its name), the "
        f"{100 * SCALE_QUANTILE:g}th percentile of |credit| over that method's tokens on this page (their max if "
        f'that is 0); <span class="t {_level_class(LEVELS)} clip">outlined</span> tokens lie beyond it and are '
        "clipped to full colour. <b>Red</b>: negative credit (the token is pushed down), <b>blue</b>: positive, "
        "white: 0. Hover a token for its exact credit.</p>"
        '<p>Steps are counted from 1; <span class="t z sb">a bar</span> starts a new step; '
        '<span class="t z fw">underlined</span> tokens form the true first wrong step; '
        'verifier row: <span class="t ok">right step</span> <span class="t bad">wrong step</span> '
        '<span class="t unk">no label</span>.</p></section>'
    )


def _methods_table(maps: CreditMaps, scales: Mapping[str, float]) -> str:
    rows = [f"<tr><td>{_e(n)}</td><td>±{scales[n]:.3g}</td><td>{_e(maps.notes[n])}</td></tr>" for n in maps.credit]
    rows += [f'<tr class="skipped"><td>{_e(n)}</td><td>skipped</td><td>{_e(why)}</td></tr>'
             for n, why in maps.skipped.items()]
    return ('<section id="methods"><h2>Methods</h2><p>Credit is the per-token advantage the method\'s loss would use '
            "at the first update on these rollouts, where π<sub>θ</sub> = π<sub>old</sub> (Δ = 0).</p>"
            "<table><tr><th>method</th><th>scale</th><th>credit shown</th></tr>" + "".join(rows) + "</table></section>")


def _accuracy_table(accuracy: Mapping[str, CreditAccuracy]) -> str:
    head = ("<tr><th>method</th><th>hit@1 first wrong step (chance)</th><th>AUC wrong vs right steps</th>"
            "<th>AUC within wrong responses</th><th>ProcessBench F1 (error / correct)</th>"
            "<th>credit before first error</th><th>credit from first error on</th>"
            "<th>entropy, correct responses</th><th>wrong / correct responses</th></tr>")
    rows = "".join(
        f"<tr><td>{_e(n)}</td><td>{_number(a.hit_rate)} ({_number(a.hit_chance)})</td><td>{_number(a.auc)}</td>"
        f"<td>{_number(a.auc_within)}</td>"
        f"<td>{_number(a.f1)} ({_number(a.error_accuracy)} / {_number(a.correct_accuracy)})</td>"
        f"<td>{_number(a.before)}</td><td>{_number(a.after)}</td>"
        f"<td>{_number(a.entropy)}</td><td>{a.n_wrong} / {a.n_correct}</td></tr>" for n, a in accuracy.items())
    return ('<section id="accuracy"><h2>Credit accuracy</h2><p>Step credit = mean token credit of the step. hit@1: '
            "share of wrong responses whose lowest step credit is the first wrong step (ties split; chance = uniform "
            "credit). AUC: −step credit separating wrong from right steps, over all labelled steps, and over pairs "
            "within the same wrong response (0.5 when credit is uniform within a response). ProcessBench F1: a step is "
            "flagged when its credit is negative; the harmonic mean of the share of wrong responses whose first "
            "flagged step is the first wrong step and the share of correct responses with no step flagged. Before / "
            "from the first error on: mean step credit in wrong responses. Entropy: normalised entropy of |credit| "
            "over the tokens of a correct response (1 = spread evenly).</p>"
            f"<table>{head}{rows}</table></section>")


def _nav(maps: CreditMaps, groups: list[tuple[str, list[int]]]) -> str:
    items = []
    for i, (prompt, rows) in enumerate(groups):
        n_correct = sum(bool(maps.rollouts.correct[b]) for b in rows)
        items.append(f'<li><a href="#p{i}">{_e(prompt)}</a> <small>{n_correct}/{len(rows)} correct</small></li>')
    return ('<nav><div class="buttons"><button id="prev" type="button">◀ prev</button>'
            '<span id="counter"></span><button id="next" type="button">next ▶</button></div>'
            f'<ol id="prompt-list">{"".join(items)}</ol></nav>')


def _prompt_section(maps: CreditMaps, scales: Mapping[str, float], index: int, prompt: str, rows: list[int]) -> str:
    blocks = "\n".join(_response_block(maps, scales, b, k) for k, b in enumerate(rows))
    return (f'<section class="prompt" id="p{index}"><h2>Prompt {index + 1}</h2>'
            f'<pre class="prompt-text">{_e(prompt)}</pre>{blocks}</section>')


def _response_block(maps: CreditMaps, scales: Mapping[str, float], b: int, k: int) -> str:
    r = maps.rollouts
    n = int(r.response_mask[b].sum())
    steps = r.step_ids[b, :n].tolist()
    labels = r.step_labels[b] if r.step_labels is not None else None
    wrong = first_wrong_step(labels)
    verdict = '<span class="good">correct ✓</span>' if bool(r.correct[b]) else '<span class="bad">wrong ✗</span>'
    facts = [f"response {k + 1}", verdict, f"reward {float(r.rewards[b]):.3g}", f"{max(steps, default=-1) + 1} steps"]
    if bool(r.truncated[b]):
        facts.append("truncated")
    if wrong is not None:
        facts.append(f'<span class="fwtext">true first wrong step: {wrong + 1}</span>')
    texts = maps.tokens[b][:n]
    lines = []
    if labels is not None:
        lines.append(_row("verifier", "step labels from the task's verifier",
                          [_token(texts[t], steps, t, wrong, _label_class(labels, steps[t]), f"step {steps[t] + 1}")
                           for t in range(n)]))
    for name, credit in maps.credit.items():
        scale, cells = scales[name], []
        for t in range(n):
            c = float(credit[b, t])
            colour, tip = _level_class(credit_level(c, scale)), f"{c:+.4f} · step {steps[t] + 1}"
            if abs(c) > scale:
                colour, tip = f"{colour} clip", f"{c:+.4f}, beyond ±{scale:.3g}: clipped · step {steps[t] + 1}"
            cells.append(_token(texts[t], steps, t, wrong, colour, tip))
        lines.append(_row(f"{_e(name)} <small>±{scale:.3g}</small>", maps.notes[name], cells))
    return (f'<div class="response"><div class="verdict">{" · ".join(facts)}</div>'
            f'<div class="rows">{"".join(lines)}</div></div>')


def _label_class(labels: torch.Tensor, step: int) -> str:
    if step < 0 or step >= len(labels) or int(labels[step]) < 0:
        return "unk"
    return "ok" if int(labels[step]) == 1 else "bad"


def _row(label_html: str, note: str, cells: list[str]) -> str:
    return f'<div class="label" title="{_e(note)}">{label_html}</div><div class="tokens">{"".join(cells)}</div>'


def _token(text: str, steps: list[int], t: int, wrong: int | None, colour: str, tip: str) -> str:
    classes = ["t", colour]
    if t > 0 and steps[t] != steps[t - 1]:
        classes.append("sb")
    if wrong is not None and steps[t] == wrong:
        classes.append("fw")
    shown = "".join(VISIBLE.get(ch, ch) for ch in text) or "∅"
    return f'<span class="{" ".join(classes)}" title="{_e(tip)}">{_e(shown)}</span>'


_BASE_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#111;background:#fff}
header,#legend,#methods,#accuracy{padding:0 1.2em}
h1{font-size:1.4em;margin:.6em 0 .2em}h2{font-size:1.1em;margin:.8em 0 .3em}
table{border-collapse:collapse;font-size:.85em}\
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
tr.skipped td{color:#777}
.scale{display:flex;align-items:center;gap:0}.scale .sw{display:inline-block;width:1.6em;height:1.1em}
.scale .end{padding:0 .5em;font-weight:bold}
.layout{display:flex;align-items:flex-start;border-top:1px solid #ddd;margin-top:1em}
nav{width:19em;flex:none;position:sticky;top:0;max-height:100vh;overflow:auto;padding:.6em;font-size:.85em;box-sizing:border-box}
nav ol{padding-left:1.6em}nav li{margin:.2em 0}nav li.active a{font-weight:bold}
.buttons{display:flex;gap:.5em;align-items:center}#counter{flex:1;text-align:center}
body:not(.js) .buttons{display:none}
main{flex:1;min-width:0;padding:0 1em 2em}
body.js section.prompt{display:none}body.js section.prompt.current{display:block}
.prompt-text{white-space:pre-wrap;font-size:.85em;margin:.2em 0;color:#333}
.response{border:1px solid #ddd;border-radius:4px;margin:.6em 0;padding:.4em .6em}
.verdict{font-size:.85em;margin-bottom:.2em}.good{color:#1a7f37;font-weight:bold}.bad{color:#b2182b;font-weight:bold}
.fwtext{border-bottom:3px solid #111}
.rows{display:grid;grid-template-columns:13em 1fr;gap:2px 8px;align-items:start}
.label{font-size:.8em;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;padding-top:2px}
.label small{color:#666}
.tokens{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:.9em;line-height:1.55}
.t{display:inline-block;white-space:pre;padding:1px 0;border-left:2px solid transparent}
.t.sb{border-left-color:#111}
.t.fw{box-shadow:inset 0 -3px 0 #111}
.t.clip{outline:1px solid #111;outline-offset:1px}
.t.ok{color:#1a7f37}.t.bad{color:#b2182b;font-weight:bold}.t.unk{color:#888}
"""

_SCRIPT = """
(function () {
  var sections = Array.prototype.slice.call(document.querySelectorAll("section.prompt"));
  var items = Array.prototype.slice.call(document.querySelectorAll("#prompt-list li"));
  var counter = document.getElementById("counter");
  var current = 0;
  var layout = document.querySelector(".layout");
  function show(i, scroll) {
    if (sections.length === 0) { return; }
    current = Math.max(0, Math.min(sections.length - 1, i));
    sections.forEach(function (s, j) { s.classList.toggle("current", j === current); });
    items.forEach(function (li, j) { li.classList.toggle("active", j === current); });
    counter.textContent = "prompt " + (current + 1) + " of " + sections.length;
    if (scroll) { layout.scrollIntoView(); }
  }
  function fromHash() {
    var m = /^#p(\\d+)$/.exec(window.location.hash);
    return m ? parseInt(m[1], 10) : 0;
  }
  document.body.classList.add("js");
  document.getElementById("prev").addEventListener("click", function () { show(current - 1, true); });
  document.getElementById("next").addEventListener("click", function () { show(current + 1, true); });
  window.addEventListener("hashchange", function () { show(fromHash(), true); });
  document.addEventListener("keydown", function (e) {
    if (e.key === "ArrowLeft") { show(current - 1, true); }
    if (e.key === "ArrowRight") { show(current + 1, true); }
  });
  show(fromHash(), window.location.hash !== "");
})();
"""
