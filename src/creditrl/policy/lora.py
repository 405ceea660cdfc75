"""LoRA adapters through peft (Hu et al. 2021, arXiv 2106.09685): train W + (α/r)·B·A, W frozen.

`apply_lora` wraps a policy's model; only the adapter matrices A, B train.  A checkpoint keeps
just the adapter (`adapter_model.safetensors`, `load_adapter_state` reads it back on resume); the
run's `final/` folder holds the merged weights W + (α/r)·B·A in float32, a plain model folder
that every `--model` option loads.  (Merged into bf16 weights, an update of RL size would mostly
round away: bf16 keeps 8 significant bits.)
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from creditrl.config import LoRAConfig

ADAPTER_FILE = "adapter_model.safetensors"


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """The model with LoRA adapters on `cfg.target_modules`; every other weight frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("model.lora needs peft: pip install -e '.[lora]'") from None
    tied = [name for name in cfg.target_modules if name in ("lm_head", "embed_tokens")]
    if tied and getattr(model.config, "tie_word_embeddings", False):
        raise ValueError(f"model.lora.target_modules: {tied} on a model whose input and output embeddings are one "
                         "tensor: merging the adapter would move both ends of the model")
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    try:
        wrapped = get_peft_model(model, peft_cfg)
    except ValueError as err:  # no module of the model matches target_modules
        raise ValueError(f"model.lora.target_modules: {err}") from None
    found = wrapped.base_model.targeted_module_names  # peft matches a name as the end of a module's path
    if unmatched := [name for name in cfg.target_modules if not any(f".{m}".endswith(f".{name}") for m in found)]:
        raise ValueError(f"model.lora.target_modules: {unmatched} match no layer of the model "
                         f"(matched: {sorted({m.rsplit('.', 1)[-1] for m in found})})")
    return wrapped


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def load_adapter_state(model: nn.Module, folder: Path) -> None:
    """Set the adapter weights saved in `folder` (a checkpoint) into the wrapped model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(folder / ADAPTER_FILE))
    if result.unexpected_keys:
        raise ValueError(f"{folder}: adapter keys the model does not have: {result.unexpected_keys[:5]}")


def merged(model: nn.Module) -> nn.Module:
    """The plain model in float32 with the adapters folded into its weights (the wrapped model is consumed)."""
    return model.float().merge_and_unload()
