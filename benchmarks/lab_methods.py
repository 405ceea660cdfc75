#!/usr/bin/env python
"""Each method trains the lab model with the same budget as GRPO; accuracy over seeds.

    python benchmarks/lab_methods.py --steps 100 --seeds 0 1 2 --methods grpo fipo grpo_lambda denser

Every run uses the same prompts per step, samples per prompt, number of rollout batches and
learning rate (the lab defaults); a method's own settings (FIPO's several minibatches, DAPO
rewards) come from its published defaults.  Each run is evaluated every `--eval-every` steps
on the same held-out problems (avg@k at T = 1).  Reported: final avg@k mean ± std over seeds,
and the first evaluated step at which a run reaches the GRPO runs' mean final accuracy.
Runs are resumable: a finished run's summary is read back instead of being trained again.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from creditrl.config import load_config
from creditrl.trainer import Trainer

# What each method needs beyond the shared budget to be itself (FIPO is GRPO unless π_θ ≠ π_old).
METHOD_OVERRIDES = {"fipo": ["train.n_minibatches=4", "reward.overlong_max=96", "reward.overlong_buffer=16"],
                    "dapo": ["reward.overlong_max=96", "reward.overlong_buffer=16"]}


def run(method: str, seed: int, args) -> dict:
    out = args.out / f"{method}-seed{seed}"
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    cfg = load_config(None, [f"method={method}", f"train.seed={seed}", f"train.steps={args.steps}",
                             f"eval.every={args.eval_every}", f"eval.k={args.k}", f"task.lab.eval_size={args.eval_size}",
                             f"train.threads={args.threads}", f"output.dir={out}", f"output.checkpoint_every={args.eval_every}",
                             *METHOD_OVERRIDES.get(method, [])])
    return Trainer(cfg, show_progress=not args.quiet).train(resume=True)


def curve(summary: dict) -> list[dict]:
    path = Path(summary["run_dir"]) / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["grpo", "fipo", "grpo_lambda", "denser"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/lab-methods"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    console = Console()

    results = {m: [run(m, s, args) for s in args.seeds] for m in args.methods}
    finals = {m: [r["after"]["avg@k"] for r in rs] for m, rs in results.items()}
    target = statistics.mean(finals["grpo"]) if "grpo" in finals else None

    table = Table(title=f"lab: {args.steps} steps × 16 prompts × 8 samples, seeds {args.seeds}, "
                        f"avg@{args.k} on {args.eval_size} held-out problems")
    for col in ("method", "start", "final avg@k (mean ± std)", "per seed", "steps to GRPO's final", "wall min / run"):
        table.add_column(col, justify="right" if col != "method" else "left")
    rows = {}
    for m, rs in results.items():
        reach = []
        for r in rs:
            hit = next((e["step"] for e in curve(r) if target is not None and e["avg@k"] >= target), None)
            reach.append(hit)
        spread = statistics.stdev(finals[m]) if len(finals[m]) > 1 else 0.0
        rows[m] = {"start": rs[0]["before"]["avg@k"], "final": finals[m], "steps_to_grpo_final": reach,
                   "wall_minutes": [r["wall_seconds"] / 60 for r in rs]}
        table.add_row(m, f"{rs[0]['before']['avg@k']:.1%}", f"{statistics.mean(finals[m]):.1%} ± {spread:.1%}",
                      " ".join(f"{f:.1%}" for f in finals[m]),
                      " ".join("—" if h is None else str(h) for h in reach),
                      f"{statistics.mean(rows[m]['wall_minutes']):.1f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
