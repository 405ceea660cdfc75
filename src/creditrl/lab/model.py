"""The lab model: a tiny Llama (~0.8M parameters) in a standard transformers architecture.

The pretrained checkpoints ship inside the package, one folder per bundled model
(`creditrl/assets/lab/`, `creditrl/assets/countdown/`, ...); `creditrl lab pretrain task.name=X`
rebuilds task X's.  Loading one is an ordinary `from_pretrained` on its folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from creditrl.lab.tokenizer import build_char_tokenizer

BUNDLED_NAME = "lab"  # the bundled model of the lab task, the model section's default


def bundled_model_dir(name: str) -> Path:
    """The folder of the bundled model `name` (one of `creditrl.config.bundled_model_names()`)."""
    return Path(str(resources.files("creditrl") / "assets" / name))


def lab_model_config(vocab_size: int, hidden: int = 128, layers: int = 3, heads: int = 4, ffn: int = 512,
                     max_positions: int = 256, kv_heads: int | None = None) -> LlamaConfig:
    """`kv_heads` below `heads`: grouped-query attention (None: as many as the query heads)."""
    tok = build_char_tokenizer()
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )


def new_lab_model(seed: int = 0, vocab_size: int | None = None, **sizes) -> LlamaForCausalLM:
    """A fresh model (seeded initialisation); `vocab_size` defaults to the lab tokenizer's."""
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(lab_model_config(vocab_size or len(build_char_tokenizer()), **sizes))
