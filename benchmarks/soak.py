#!/usr/bin/env python
"""Soak: a lab run killed with SIGKILL at random moments and resumed ends where one clean run ends.

    python benchmarks/soak.py --steps 300 --kill-after 60 150 --out runs/soak
    python benchmarks/soak.py --steps 120 --kill-after 30 60 --out runs/soak-bf16 model.dtype=bfloat16

Trains the same configuration twice with `creditrl train`, side by side (one thread each): once
without interruption, and once killed (SIGKILL, at a random moment between the two
`--kill-after` bounds, in seconds) and restarted with `--resume` until it finishes by itself.
Kills land anywhere: mid-step, mid-evaluation, mid-checkpoint write (the upper bound must leave
time to reach the next checkpoint, or the run never gets past it). Prints the number of kills, the wall times,
whether the final weights (and, for bf16 weights, the float32 master weights of the last checkpoint) are
bit-identical, and the final evaluation of both runs; `--json` keeps them. Settings after the
options (`key=value`) go to both runs. Exit status 1 if the weights differ.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from creditrl.checkpoint import MASTER_WEIGHTS_FILE, latest_checkpoint


def train_command(out: Path, steps: int, threads: int, resume: bool, checkpoint_every: int,
                  overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "creditrl", "train", "--quiet", *(["--resume"] if resume else []),
            f"train.steps={steps}", f"train.threads={threads}", "eval.before=false", "eval.every=0",
            "task.lab.eval_size=200",
            f"output.checkpoint_every={checkpoint_every}", f"output.dir={out}", *overrides]


def start_clean_run(out: Path, steps: int, threads: int, checkpoint_every: int,
                    overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(train_command(out, steps, threads, False, checkpoint_every, overrides),
                            stdout=subprocess.DEVNULL)


def killed_run(out: Path, steps: int, threads: int, checkpoint_every: int, kill_after: tuple[float, float],
               rng: random.Random, console: Console, overrides: list[str]) -> tuple[float, list[float]]:
    """Train with kills until the run finishes; (wall seconds, the moments of the kills)."""
    start, kills, stuck = time.perf_counter(), [], 0
    while True:
        reached = latest_checkpoint(out / "checkpoints")
        proc = subprocess.Popen(train_command(out, steps, threads, True, checkpoint_every, overrides),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        delay = rng.uniform(*kill_after)
        try:
            _, stderr = proc.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append(round(time.perf_counter() - start, 1))
            console.print(f"killed after {delay:.0f} s (kill {len(kills)}, {kills[-1]:.0f} s into the soak)")
            stuck = stuck + 1 if latest_checkpoint(out / "checkpoints") == reached else 0
            if stuck == 5:
                raise SystemExit("5 kills in a row before a new checkpoint: raise --kill-after or lower "
                                 "--checkpoint-every")
            continue
        if proc.returncode != 0:
            raise SystemExit(f"the resumed run failed (exit {proc.returncode}):\n{stderr}")
        return time.perf_counter() - start, kills


def _compared_files(clean: Path) -> list[Path]:
    """The final weights, and the last checkpoint's master weights where the run kept bf16 weights."""
    files = [Path("final") / "model.safetensors"]
    last = latest_checkpoint(clean / "checkpoints")
    if last is not None and (last / MASTER_WEIGHTS_FILE).exists():
        files.append(last.relative_to(clean) / MASTER_WEIGHTS_FILE)
    return files


def _same_tensors(a_file: Path, b_file: Path) -> bool:
    if not b_file.exists():
        return False
    a, b = load_file(a_file), load_file(b_file)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def final_eval(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["after"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="threads of each of the two runs")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--kill-after", nargs=2, type=float, default=(60.0, 150.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings for both runs")
    args = parser.parse_args()
    console = Console()
    for name in ("clean", "killed"):
        if (args.out / name).exists():
            raise SystemExit(f"{args.out / name} exists: choose another --out")
    console.print(f"{args.steps} steps: a clean run, and beside it a run killed every "
                  f"{args.kill_after[0]:g}–{args.kill_after[1]:g} s ...")
    start = time.perf_counter()
    clean = start_clean_run(args.out / "clean", args.steps, args.threads, args.checkpoint_every, args.overrides)
    killed_seconds, kills = killed_run(args.out / "killed", args.steps, args.threads, args.checkpoint_every,
                                       tuple(args.kill_after), random.Random(args.seed), console, args.overrides)
    if clean.wait() != 0:
        raise SystemExit(f"the clean run failed (exit {clean.returncode})")
    clean_seconds = time.perf_counter() - start
    compared = _compared_files(args.out / "clean")
    identical = all(_same_tensors(args.out / "clean" / path, args.out / "killed" / path) for path in compared)
    evals = {"clean": final_eval(args.out / "clean"), "killed": final_eval(args.out / "killed")}

    table = Table(title=f"soak: {args.steps} lab steps, {len(kills)} kills")
    for column in ("run", "wall s", "kills", "final avg@k", "final greedy"):
        table.add_column(column, justify="right")
    table.add_row("clean", f"≤ {clean_seconds:.0f}", "0", f"{evals['clean']['avg@k']:.4f}",
                  f"{evals['clean']['greedy']:.4f}")
    table.add_row("killed + resumed", f"{killed_seconds:.0f}", str(len(kills)), f"{evals['killed']['avg@k']:.4f}",
                  f"{evals['killed']['greedy']:.4f}")
    console.print(table)
    console.print(f"final weights{' and master weights' if len(compared) > 1 else ''} "
                  f"bit-identical: [bold]{identical}[/bold]")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "kills_at_s": kills,
                                         "clean_seconds": clean_seconds, "killed_seconds": killed_seconds,
                                         "identical_weights": identical, "final_eval": evals}, indent=2))
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
