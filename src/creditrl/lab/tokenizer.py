"""A character-level tokenizer for the tiny models, saved as a standard `tokenizer.json`.

Every character of an alphabet is one token, after `<pad>`, `<eos>` and `<unk>`; the lab's alphabet
(the default) is every printable ASCII character and the newline, a generated task's its `alphabet`.
It is an ordinary `tokenizers` WordLevel model with a split-every-character pre-tokenizer, so
`transformers.AutoTokenizer` loads it like any other tokenizer.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from creditrl.tasks.lab import ALPHABET

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]


def build_char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """One token per distinct character of `alphabet`, in the order of first appearance."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(alphabet)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False,
    )


