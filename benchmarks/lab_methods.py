#!/usr/bin/env python
"""Each method trains the lab model with the same budget as GRPO; accuracy over seeds.

    python benchmarks/lab_methods.py --steps 100 --seeds 0 1 2 --methods grpo prm capo vineppo

A thin front to `creditrl.compare` (the same as `creditrl compare`): the grid, its resumable
runs, statistics and report folder (report.md, report.html, results.json) all come from there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from creditrl.compare import GridSpec, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["grpo", "fipo", "grpo_lambda", "denser", "prm", "capo",
                                                         "vineppo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, each with cores // jobs threads")
    parser.add_argument("--out", type=Path, default=Path("runs/lab-methods"))
    args = parser.parse_args()
    spec = GridSpec(args.methods, args.seeds, args.steps, args.eval_every, args.eval_size,
                    overrides=[f"eval.k={args.k}"], out=args.out, jobs=args.jobs)
    paths = compare(spec)
    print(f"report: {paths['md']}  {paths['html']}  raw numbers: {paths['json']}")


if __name__ == "__main__":
    main()
