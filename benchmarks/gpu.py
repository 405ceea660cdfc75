#!/usr/bin/env python
"""creditrl on one GPU: sampling and update throughput, model-FLOPs utilisation, and TRL on the same work.

    python benchmarks/gpu.py                          # Qwen2.5-0.5B architecture, random weights, bf16 autocast
    python benchmarks/gpu.py --json gpu.json          # also write every number
    python benchmarks/gpu.py --smoke                  # CPU, a tiny model of the same architecture: checks the script
    python benchmarks/gpu.py --device cpu --layers 2 --update-shapes 2x512 --parts update
                                                      # the update's sides on a CPU: the vocabulary head dominates

The model is the Qwen2.5-0.5B architecture (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864,
vocabulary 151,936, tied embeddings) with random weights, saved once to a temporary folder with
a character-level tokenizer padded to the same vocabulary (weights do not matter for speed; a
random model almost never samples its end token, so rows run their full length on every side).  Unless a
row says "bf16 weights", weights stay float32 and forwards run under bfloat16 autocast on both
sides (creditrl `model.bf16_autocast=true`, TRL `bf16=True`); "bf16 weights" is creditrl's
`model.dtype=bfloat16` (float32 master weights in AdamW).  sdpa attention, no gradient checkpointing.

Part 1, sampling (one process): `--prompts` × `--group-size` rows of exactly `--new-tokens` new
tokens through creditrl's `TransformersPolicy.sample` with each engine: `kv-cache` (the
project's loop), `generate` (transformers' `model.generate`, dynamic cache) and `generate` with
`static_cache` (compiled by transformers), then `kv-cache` with bf16 weights; tokens/s after one
warm-up call (the static cache's compilation is in its warm-up, reported apart).

Part 1b, lengths: kv-cache sampling calls whose prompts have a length the process has not met,
against a second call with the same lengths, with the policy's attention choice (cuDNN's
sdpa kernel left out on a GPU) and with torch's own order (cuDNN first on Hopper): ms per
decode step.

Part 2, the update alone: random token batches of B rows × T tokens through the trainer's own
update code (`policy.score` with gradients, `policy_loss`, backward, clipping, AdamW on the
master weights), float32 weights with autocast, bf16 weights, and bf16 weights with
`model.compile` (scoring through torch.compile), each on request with more model settings
(`SIDE_OPTIONS`: 1 GiB logits chunks, cuDNN's attention, logits kept), at
8 × 1024, 4 × 4096 and 16 × 2048, and beside them a plain transformers update of the model in bf16
weights (full float32 logits, log-softmax, gather, AdamW on the bf16 weights); tokens/s, MFU
(`ModelFlops`: PaLM's count, 6·N + 12·L·H·Q·T FLOPs per token for N parameters, L layers, H heads
of width Q and rows of T tokens, as nanoGPT's `estimate_mfu`; the issue's facts were measured with
it), the same without the attention term (6·N alone, as earlier runs reported it), the peak CUDA
memory, and creditrl's ratio to plain.  16 × 2048 is the size whose float32 logits
alone (18.5 GiB) break a plain forward.

Part 3, whole training steps side by side: creditrl's Trainer for GRPO (kv-cache and static-cache
generate engines; float32 and bf16 weights; compiled scoring; the same model settings on request), FIPO and DenseR,
and TRL's GRPOTrainer, each in its own process
(benchmarks/vs_trl.py's workers, same prompts, group size, completion length, one update per
step, no KL, token-mean loss); per step: sample and update seconds, sampling tokens/s, update
tokens/s and MFU, full-step tokens/s, and the ratio to TRL; every step's update seconds
and (creditrl) the graphs torch.compile made in it in the JSON.

The parts run in the order update, sampling, lengths, steps (the steps' sides with TRL second), and
`--json` is rewritten after each part and each side, so a run cut short keeps what it measured.

Targets (issue 6): the update phase at ≥ 40% MFU in bf16 on an H100-class card; the full step at
least TRL's tokens/s.  Peak bf16 dense FLOP/s is looked up from the card's name (H100/H200 SXM
989 TFLOP/s, H100 PCIe 756, A100 312) or given with --peak-tflops.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import Work, finish_gpu_work, run_in_process, summarize  # noqa: E402  (the benchmark's own workers)

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=1024, tie_word_embeddings=True)
# creditrl GRPO, TRL GRPO (torch's attention kernels, or without cuDNN's, which plans every new length anew, as
# creditrl leaves it out), creditrl GRPO with bf16 weights, FIPO, DenseR, static-cache GRPO (float32 / bf16 weights)
STEP_SIDES = ("grpo", "trl", "trl-nocudnn", "grpo-bf16", "grpo-bf16-compiled", "fipo", "denser", "static",
              "static-bf16")
# creditrl float32 weights + autocast, bf16 weights + float32 masters, plain transformers, bf16 compiled
UPDATE_SIDES = ("float32", "bf16", "plain", "compiled")
# dense bf16 peaks; the longest name that the device's name contains wins ("H100 NVL" before "H100")
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H800": 989.4, "H200 NVL": 835.0, "H200": 989.4,
               "GH200": 989.4, "A100": 312.0}
# model settings a creditrl side of either part takes on request, as `<side>+<option>...` (compiled+cudnn+keep):
# option: (setting, value, what the side's label says)
SIDE_OPTIONS = {
    "1gib": ("logits_chunk_mib", 1024, "logits chunks 1024 MiB"),  # a quarter of the chunks: fewer passes over ∂W
    "cudnn": ("scoring_attention", "cudnn", "cuDNN attention"),
    "keep": ("keep_logits", True, "logits kept"),
}


def side_options(name: str) -> tuple[str, dict, str]:
    """`base+option+...` → (base, {setting: value}, the label's suffix)."""
    base, *options = name.split("+")
    settings = {SIDE_OPTIONS[o][0]: SIDE_OPTIONS[o][1] for o in options}
    return base, settings, "".join(f", {SIDE_OPTIONS[o][2]}" for o in options)


def _side_names(bases: tuple[str, ...], without_options: tuple[str, ...]) -> Callable[[str], str]:
    """An argparse type: a base side, with `+option`s unless it is one of `without_options`."""
    def check(name: str) -> str:
        base, *options = name.split("+")
        if base not in bases:
            raise argparse.ArgumentTypeError(f"{base!r} is not a side: {', '.join(bases)}")
        unknown = [o for o in options if o not in SIDE_OPTIONS]
        if unknown or (options and base in without_options):
            raise argparse.ArgumentTypeError(
                f"{name!r}: options are {', '.join('+' + o for o in SIDE_OPTIONS)}, on the creditrl sides only")
        return name
    return check


@dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs per token, as PaLM counts them (Chowdhery et al. 2022, appendix B): 6·N for the
    weights' forward and backward matmuls, plus 12·L·H·Q·T for attention's scores and weighted sum
    over a row of T tokens (counted in full, as if not causal).  The output head is charged on every
    position, as PaLM does, though creditrl's scoring projects only the response's: with 64-token
    prompts at 16 × 2048 that overstates its MFU by 0.3 points (37.7% is 37.45% counted exactly)."""

    n_params: int  # the embedding table once: with tied embeddings it is also the output projection
    layers: int
    attention_width: int  # heads × head dimension

    def per_token(self, row_length: float, attention: bool = True) -> float:
        return 6 * self.n_params + (12 * self.layers * self.attention_width * row_length if attention else 0)


def build_model_folder(folder: Path, shape: dict) -> ModelFlops:
    """A random Qwen2 model and a padded character-level tokenizer; returns its FLOP count."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from creditrl.lab.tokenizer import SPECIAL_TOKENS
    from creditrl.tasks.lab import ALPHABET

    tokens = SPECIAL_TOKENS + list(ALPHABET)
    tokens += [f"<x{i}>" for i in range(shape["vocab_size"] - len(tokens))]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                        padding_side="left")
    torch.manual_seed(0)
    config = Qwen2Config(**shape, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    flops = ModelFlops(n_params=sum(p.numel() for p in model.parameters()),  # tied embeddings counted once
                       layers=config.num_hidden_layers, attention_width=config.num_attention_heads * head_dim)
    del model
    gc.collect()
    return flops


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_TFLOPS[key] * 1e12
    return None


def _timed_sample(policy, prompts: list[list[int]], n: int, cfg, seed: int):
    """`policy.sample` and its wall seconds, the device's queue drained on both sides."""
    finish_gpu_work()
    start = time.perf_counter()
    gen = policy.sample(prompts, n, cfg, seed=seed)
    finish_gpu_work()
    return gen, time.perf_counter() - start


# ---- part 1: sampling engines -----------------------------------------------------------------

def sampling_engines(folder: Path, args, device: torch.device) -> list[dict]:
    from creditrl.policy.loading import load_policy
    from creditrl.policy.transformers_backend import SamplingConfig
    from creditrl.tasks.lab import LabTask

    rows = []
    for dtype, engines in (("float32", (("kv-cache", "kv-cache", False), ("generate", "generate", False),
                                        ("generate, static cache", "generate", True))),
                           ("bfloat16", (("kv-cache, bf16 weights", "kv-cache", False),))):
        policy = load_policy(str(folder), chat_template=False, bf16_autocast=dtype == "float32", device=str(device),
                             dtype=dtype)
        prompts = [policy.encode_prompt(p.prompt) for p in LabTask().train_problems()[: args.prompts]]
        for label, engine, static in engines:
            cfg = SamplingConfig(max_new_tokens=args.new_tokens, engine=engine, static_cache=static,
                                 batch_size=args.prompts * args.group_size)
            try:  # an engine that fails here (e.g. a static cache under autocast in transformers 5.17) is a row
                _, warm_up = _timed_sample(policy, prompts, args.group_size, cfg, seed=0)
                gen, seconds = _timed_sample(policy, prompts, args.group_size, cfg, seed=1)
            except RuntimeError as err:
                rows.append({"engine": label, "error": str(err).splitlines()[0][:300]})
                print(f"sampling {label}: failed: {rows[-1]['error']}", flush=True)
                continue
            tokens = sum(len(r) for r in gen.response_ids)
            rows.append({"engine": label, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "warm_up_seconds": warm_up})
            print(f"sampling {label}: {tokens / seconds:,.0f} tokens/s (warm-up {warm_up:.1f} s)", flush=True)
        del policy
        gc.collect()
    return rows


# ---- part 1b: lengths the process has not seen ------------------------------------------------

def new_lengths(folder: Path, args, device: torch.device) -> list[dict]:
    """One kv-cache sampling call per row: lengths seen before against new ones, with and without cuDNN attention.

    Each prompt set holds prompts of one length, a different length per set, so every decode step
    of a set's first call meets key lengths the process has not seen.  The first set warms up;
    the policy's own attention choice (cuDNN left out) and torch's order (cuDNN first on Hopper)
    then each meet a new set twice.
    """
    from contextlib import nullcontext

    from creditrl.policy.loading import load_policy
    from creditrl.policy.transformers_backend import SamplingConfig
    from creditrl.tasks.lab import LabTask

    policy = load_policy(str(folder), chat_template=False, bf16_autocast=True, device=str(device))
    by_length: dict[int, list[list[int]]] = {}
    for problem in LabTask().train_problems():
        ids = policy.encode_prompt(problem.prompt)
        by_length.setdefault(len(ids), []).append(ids)
    sets = [rows[: args.prompts] for _, rows in sorted(by_length.items()) if len(rows) >= args.prompts][:3]
    if len(sets) < 3:
        raise RuntimeError(f"the lab task has fewer than three prompt lengths with {args.prompts} prompts each")
    cfg = SamplingConfig(max_new_tokens=args.new_tokens // 2, batch_size=args.prompts * args.group_size)
    own_choice = policy._attention_kernels
    calls = [("warm-up", sets[0], own_choice), ("cuDNN left out, new lengths", sets[1], own_choice),
             ("cuDNN left out, same lengths again", sets[1], own_choice),
             ("torch's order, new lengths", sets[2], nullcontext),
             ("torch's order, same lengths again", sets[2], nullcontext)]
    rows = []
    for label, prompts, attention in calls:
        policy._attention_kernels = attention
        _, seconds = _timed_sample(policy, prompts, args.group_size, cfg, seed=0)
        rows.append({"call": label, "prompt_tokens": len(prompts[0]), "seconds": seconds,
                     "ms_per_decode_step": 1000 * seconds / cfg.max_new_tokens})
        print(f"lengths: {label}: {rows[-1]['ms_per_decode_step']:.1f} ms per decode step", flush=True)
    del policy
    gc.collect()
    return rows


# ---- part 2: the update alone -------------------------------------------------------------------

def update_only(folder: Path, args, device: torch.device, flops: ModelFlops, peak: float | None) -> list[dict]:
    """The trainer's update in both precisions, and beside them a plain transformers update of a bf16 model.

    creditrl: `policy.score` (packed rows, log-probs in vocabulary chunks through the fused
    projection; no entropy, which the trainer takes from the sampler), `policy_loss`, backward,
    clipping, fused AdamW on the trainer's master weights; once
    with float32 weights under bf16 autocast, once with bf16 weights and float32 masters
    (`model.dtype=bfloat16`).  Plain: bf16 weights, one forward for full float32 logits,
    log-softmax, gather, the same loss shape, backward, clipping, fused AdamW on the bf16 weights
    themselves: the reference the issue's facts were measured with.
    """
    from transformers import AutoConfig

    vocab, prompt_len = AutoConfig.from_pretrained(folder).vocab_size, 64
    shapes = []
    for batch, length in args.update_shapes:
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, vocab, (batch, prompt_len), generator=generator).to(device)
        response = torch.randint(3, vocab, (batch, length - prompt_len), generator=generator).to(device)
        shapes.append((batch, length, prompt, response, torch.randn(response.shape, generator=generator).to(device)))
    rows = []
    for name in args.update_sides:
        base, settings, label = side_options(name)
        if base == "plain":
            rows += _plain_updates(folder, shapes, args, device, flops, peak)
        else:
            rows += _creditrl_updates(folder, shapes, args, device, flops, peak, "float32" if base == "float32"
                                      else "bfloat16", compiled=base == "compiled", settings=settings, label=label)
        gc.collect()  # each model and its optimizer state go before the next loads
    return rows


def _creditrl_updates(folder: Path, shapes, args, device: torch.device, flops: ModelFlops, peak: float | None,
                      dtype: str, compiled: bool = False, settings: dict | None = None, label: str = ""):
    """`settings`: more of `load_policy`'s model settings (SIDE_OPTIONS), named in `label`."""
    from creditrl.master_weights import MasterWeights
    from creditrl.methods.loss import LossConfig, policy_loss
    from creditrl.policy.loading import load_policy

    policy = load_policy(str(folder), chat_template=False, bf16_autocast=dtype == "float32", device=str(device),
                         dtype=dtype, compile_scoring=compiled, **(settings or {}))

    def loss_of(prompt, response, advantages):
        mask, r_mask = torch.ones_like(prompt, dtype=torch.bool), torch.ones_like(response, dtype=torch.bool)
        scores = policy.score(prompt, mask, response, r_mask)  # as the trainer: the entropy comes from the sampler
        loss, _ = policy_loss(scores.logprobs, scores.logprobs.detach(), advantages, r_mask,
                              LossConfig(agg="token-mean"))
        return loss

    side = ("creditrl, float32 weights, bf16 autocast" if dtype == "float32"
            else "creditrl, bf16 weights, float32 masters")
    side += (", compiled" if compiled else "") + label
    return _timed_updates(side, policy.model, loss_of, shapes, args, device, flops, peak,
                          MasterWeights(policy.model))


def _plain_updates(folder: Path, shapes, args, device: torch.device, flops: ModelFlops, peak: float | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)

    def loss_of(prompt, response, advantages):
        logits = model(input_ids=torch.cat([prompt, response], dim=1)).logits[:, prompt.shape[1] - 1:-1]
        logprobs = logits.float().log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)
        return -(torch.exp(logprobs - logprobs.detach()) * advantages).mean()

    return _timed_updates("plain transformers, bf16 weights", model, loss_of, shapes, args, device, flops, peak)


def _timed_updates(side: str, model, loss_of, shapes, args, device: torch.device, flops: ModelFlops,
                   peak: float | None, masters=None) -> list[dict]:
    """Median seconds of `args.update_iters` updates after a warm-up, per shape; out of memory is a row too.

    AdamW steps `masters` (the trainer's `MasterWeights`) when given, else the model's own weights.
    """
    from creditrl.master_weights import descend

    trained = masters.parameters() if masters is not None else list(model.parameters())
    optimizer = torch.optim.AdamW(trained, lr=1e-6, betas=(0.9, 0.99), weight_decay=0.0, fused=True)

    def update(prompt, response, advantages) -> None:
        loss = loss_of(prompt, response, advantages)
        if masters is not None:  # the trainer's own step
            descend(loss, optimizer, masters, 1.0)
            return
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()

    rows = []
    for batch, length, prompt, response, advantages in shapes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, error = [], None
        for _ in range(args.update_iters + 1):
            try:
                finish_gpu_work()
                start = time.perf_counter()
                update(prompt, response, advantages)
                finish_gpu_work()
                times.append(time.perf_counter() - start)
            except torch.OutOfMemoryError as err:
                error = f"out of memory: {str(err).splitlines()[0]}"
                break
            except Exception as err:  # a side that fails (a compiler error, say) is a row; the run goes on
                traceback.print_exc()
                error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                break
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row = {"side": side, "batch": batch, "length": length, "error": error}
        if error is None:
            seconds = sorted(times[1:])[len(times[1:]) // 2]  # median after the first
            tokens_per_s = batch * length / seconds
            row.update(seconds=seconds, tokens_per_s=tokens_per_s,
                       mfu=flops.per_token(length) * tokens_per_s / peak if peak else None,
                       mfu_without_attention=flops.per_token(length, attention=False) * tokens_per_s / peak
                       if peak else None,
                       peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30
                       if device.type == "cuda" else None)
        rows.append(row)
        print(f"update, {side}, {batch} × {length}: " + (error or f"{row['tokens_per_s']:,.0f} tokens/s"), flush=True)
        if args.profile and error is None and len(rows) == 1:
            _profile_update(side, lambda: update(prompt, response, advantages), args.profile, device)
    return rows


def _profile_update(side: str, update, folder: Path, device: torch.device) -> None:
    """One more update under torch.profiler; its operators by device time go to `folder`/update-<side>.txt."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        update()
        finish_gpu_work()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    folder.mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() else "-" for c in side).strip("-")
    (folder / f"update-{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40,
                                                                         max_name_column_width=60))


# ---- part 3: training steps, creditrl against TRL ---------------------------------------------

def trainer_steps(folder: Path, args, device: torch.device, flops: ModelFlops, peak: float | None,
                  rows: list[dict], save) -> None:
    """Appends one row per side to `rows`, calling `save()` after each."""
    from creditrl.tasks.lab import LabTask

    work = Work(model=str(folder), prompts=args.prompts, group_size=args.group_size, max_new_tokens=args.new_tokens,
                steps=args.steps, threads=args.threads, bf16=True, device=device.type)
    bases = {"grpo": ("creditrl grpo", "creditrl", replace(work, method="grpo")),
             "trl": ("TRL grpo", "trl", work),
             "trl-nocudnn": ("TRL grpo, no cuDNN attention", "trl", replace(work, trl_cudnn_attention=False)),
             "grpo-bf16": ("creditrl grpo, bf16 weights", "creditrl",
                           replace(work, method="grpo", bf16_weights=True)),
             "grpo-bf16-compiled": ("creditrl grpo, bf16 weights, compiled scoring", "creditrl",
                                    replace(work, method="grpo", bf16_weights=True, compile=True)),
             "fipo": ("creditrl fipo", "creditrl", replace(work, method="fipo")),
             "denser": ("creditrl denser", "creditrl", replace(work, method="denser")),
             "static": ("creditrl grpo, static-cache generate", "creditrl",
                        replace(work, method="grpo", engine="generate-static")),
             "static-bf16": ("creditrl grpo, static-cache generate, bf16 weights", "creditrl",
                             replace(work, method="grpo", engine="generate-static", bf16_weights=True))}
    sides = []
    for name in args.sides:
        base, settings, suffix = side_options(name)
        label, side, side_work = bases[base]
        sides.append((name, label + suffix, side, replace(side_work, **settings)))
    # the character-level prompts: the question and a newline, one token per character
    prompt_tokens = statistics.mean(len(p.prompt) + 1 for p in LabTask().train_problems()[: work.prompts * work.steps])
    for name, label, side, w in sides:
        print(f"steps: {label}", flush=True)
        try:
            run = run_in_process(side, w, args.worker_logs / f"{name}.log" if args.worker_logs else None)
            summary = summarize([run])
        except RuntimeError as err:
            rows.append({"side": label, "error": str(err)[-2000:]})
            print(f"  failed: {str(err)[-400:]}", flush=True)
            save()
            continue
        rows_per_step = w.prompts * w.group_size
        completion = summary["completion_tokens"] * rows_per_step
        update_tokens = completion + prompt_tokens * rows_per_step  # the update's forward covers prompt + response
        rows.append({
            "side": label, **{k: summary[k] for k in ("sample", "update", "step", "completion_tokens")},
            "sampling_tokens_per_s": completion / summary["sample"],
            "update_tokens_per_s": update_tokens / summary["update"],
            "update_mfu": flops.per_token(prompt_tokens + summary["completion_tokens"]) * update_tokens
            / summary["update"] / peak if peak else None,
            "step_tokens_per_s": completion / summary["step"],
            "update_s_per_step": [step["update"] for step in run["steps"]],  # the first included: it compiles
            "graphs_compiled_per_step": [step.get("graphs_compiled") for step in run["steps"]],  # creditrl's only
        })
        save()


def tables(results: dict) -> None:
    from rich.console import Console

    console = Console(width=140)
    if results["update"]:
        console.print(_update_table(results["update"]))
    if results["sampling"]:
        console.print(_sampling_table(results["sampling"]))
    if results["lengths"]:
        console.print(_lengths_table(results["lengths"]))
    if results["steps"]:
        console.print(_steps_table(results["steps"]))


def _sampling_table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="sampling (tokens/s, after a warm-up call)")
    for col in ("engine", "tokens", "tokens/s", "warm-up s", "× kv-cache", "note"):
        t.add_column(col, justify="left" if col in ("engine", "note") else "right")
    base = rows[0].get("tokens_per_s")
    for r in rows:
        if "error" in r:
            t.add_row(r["engine"], *["—"] * 4, r["error"][:60])
            continue
        t.add_row(r["engine"], str(r["tokens"]), f"{r['tokens_per_s']:,.0f}", f"{r['warm_up_seconds']:.1f}",
                  f"{r['tokens_per_s'] / base:.2f}" if base else "—", "")
    return t


def _lengths_table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="kv-cache sampling: new lengths against seen ones (one call each)")
    for col in ("call", "prompt tokens", "seconds", "ms per decode step"):
        t.add_column(col, justify="left" if col == "call" else "right")
    for r in rows:
        t.add_row(r["call"], str(r["prompt_tokens"]), f"{r['seconds']:.2f}", f"{r['ms_per_decode_step']:.1f}")
    return t


def _update_table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="the update alone (log-probs with gradients, loss, backward, clip, AdamW)")
    for col in ("side", "batch × length", "tokens/s", "MFU", "MFU, 6·N only", "peak GiB", "× plain", "note"):
        t.add_column(col, justify="left" if col in ("side", "batch × length", "note") else "right")
    plain = {(r["batch"], r["length"]): r for r in rows if r["side"].startswith("plain") and r["error"] is None}
    for r in rows:
        ok = r["error"] is None
        base = plain.get((r["batch"], r["length"]))
        t.add_row(r["side"], f"{r['batch']} × {r['length']}", f"{r['tokens_per_s']:,.0f}" if ok else "—",
                  f"{r['mfu']:.1%}" if ok and r["mfu"] else "—",
                  f"{r['mfu_without_attention']:.1%}" if ok and r["mfu"] else "—",
                  f"{r['peak_mem_gib']:.1f}" if ok and r["peak_mem_gib"] else "—",
                  f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if ok and base else "—", r["error"] or "")
    return t


def _steps_table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="training steps (mean over the measured steps)")
    for col in ("side", "sample s", "update s", "step s", "sampling tok/s", "update tok/s", "update MFU",
                "step tok/s", "step × TRL"):
        t.add_column(col, justify="left" if col == "side" else "right")
    trl = next((r for r in rows if r["side"] == "TRL grpo" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            t.add_row(r["side"], *["—"] * 7, "failed")
            continue
        t.add_row(r["side"], f"{r['sample']:.2f}", f"{r['update']:.2f}", f"{r['step']:.2f}",
                  f"{r['sampling_tokens_per_s']:,.0f}", f"{r['update_tokens_per_s']:,.0f}",
                  f"{r['update_mfu']:.1%}" if r["update_mfu"] else "—", f"{r['step_tokens_per_s']:,.0f}",
                  f"{r['step_tokens_per_s'] / trl['step_tokens_per_s']:.2f}" if trl else "—")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny sizes: checks the script runs")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8; smoke 2)")
    parser.add_argument("--group-size", type=int, default=None, help="samples per prompt (default 8; smoke 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="completion length (default 256; smoke 8)")
    parser.add_argument("--steps", type=int, default=5,
                        help="training steps per side, the first a warm-up (default 5: on an H100 the second step "
                             "still carried one-off costs on both sides)")
    parser.add_argument("--update-iters", type=int, default=None, help="timed update iterations (default 5; smoke 1)")
    parser.add_argument("--threads", type=int, default=4, help="CPU threads in each worker")
    parser.add_argument("--peak-tflops", type=float, help="the card's peak bf16 dense TFLOP/s (default: by name)")
    parser.add_argument("--parts", nargs="+", choices=("update", "sampling", "lengths", "steps"),
                        default=["update", "sampling", "lengths", "steps"])
    options = ", ".join(f"+{name} ({setting}={value})" for name, (setting, value, _) in SIDE_OPTIONS.items())
    parser.add_argument("--sides", nargs="+", type=_side_names(STEP_SIDES, ("trl", "trl-nocudnn")),
                        default=list(STEP_SIDES),
                        help=f"the steps part's sides, in this order (roughly 1.5 minutes each on an H100): "
                             f"{', '.join(STEP_SIDES)}; a creditrl side may add options: {options}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: no MFU (default cuda)")
    parser.add_argument("--layers", type=int, help="decoder layers of the Qwen2.5-0.5B shape (default 24)")
    parser.add_argument("--update-sides", nargs="+", type=_side_names(UPDATE_SIDES, ("plain",)),
                        default=list(UPDATE_SIDES), help=f"the update part's sides, in this order: "
                        f"{', '.join(UPDATE_SIDES)}; a creditrl side may add options: {options}")
    parser.add_argument("--update-shapes", nargs="+", metavar="BxT",
                        help="the update part's batch × length shapes (default 8x1024 4x4096 16x2048)")
    parser.add_argument("--worker-logs", type=Path, metavar="DIR",
                        help="the steps part: each side's worker stderr to DIR/<side>.log (with TORCH_LOGS=recompiles, "
                             "say)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="also profile one update per update side at the first shape; kernel tables go to DIR")
    args = parser.parse_args()
    smoke = args.smoke
    args.prompts = args.prompts or (2 if smoke else 8)
    args.group_size = args.group_size or (2 if smoke else 8)
    args.new_tokens = args.new_tokens or (8 if smoke else 256)
    args.update_iters = args.update_iters or (1 if smoke else 5)
    if args.update_shapes:
        args.update_shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.update_shapes]
    else:
        args.update_shapes = [(2, 96), (1, 160)] if smoke else [(8, 1024), (4, 4096), (16, 2048)]
    device = torch.device("cpu" if smoke else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu.py needs a GPU (or --smoke to check the script on the CPU)")
    peak = peak_flops(device, args.peak_tflops)
    from importlib.metadata import version

    env = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else "cpu", "peak_tflops": peak / 1e12 if peak else None,
           **{name: version(name) for name in ("torch", "transformers", "trl", "creditrl")}}
    print("  ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    results: dict = {"env": env, "args": {k: v for k, v in vars(args).items()
                                          if k not in ("json", "profile", "worker_logs")},
                      "update": [], "sampling": [], "lengths": [], "steps": []}

    def save() -> None:  # after every part and every side: a run cut short keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory(prefix="creditrl_gpu_") as tmp:
        folder = Path(tmp) / "model"
        shape = TINY if smoke else QWEN25_05B
        flops = build_model_folder(folder, {**shape, "num_hidden_layers": args.layers} if args.layers else shape)
        results["env"]["parameters"] = flops.n_params
        if "update" in args.parts:
            results["update"] = update_only(folder, args, device, flops, peak)
            save()
        if "sampling" in args.parts:
            results["sampling"] = sampling_engines(folder, args, device)
            save()
        if "lengths" in args.parts:
            results["lengths"] = new_lengths(folder, args, device)
            save()
        if "steps" in args.parts:
            trainer_steps(folder, args, device, flops, peak, results["steps"], save)
    tables(results)
    if args.json:
        print(f"raw numbers written to {args.json}")


if __name__ == "__main__":
    main()
