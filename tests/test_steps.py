"""Step splitters and the map from steps to tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from creditrl.steps import (
    MAX_CONTEXT_TOKENS,
    SPLITTERS,
    latex_regions,
    split_steps,
    token_end_offsets,
    token_step_ids,
)


def pieces(text: str, splitter: str) -> list[str]:
    return [text[a:b] for a, b in split_steps(text, splitter)]


# ---------------------------------------------------------------- line-based splitters


def test_newline_one_step_per_nonempty_line():
    text = "  \nFirst line\n\nSecond line\nThird"
    assert pieces(text, "newline") == ["  \nFirst line\n\n", "Second line\n", "Third"]


def test_gsm8k_merges_the_answer_line():
    text = "Tom has 3 + 4 = 7 apples.\nHe eats 2, so 7 - 2 = 5 remain.\n#### 5\n"
    assert pieces(text, "gsm8k") == [
        "Tom has 3 + 4 = 7 apples.\n", "He eats 2, so 7 - 2 = 5 remain.\n#### 5\n",
    ]
    text = "3 + 4 = 7\nThe answer is 7."
    assert pieces(text, "gsm8k") == [text]
    assert pieces("#### 5", "gsm8k") == ["#### 5"]
    assert pieces("3 + 4 = 7\n7 - 2 = 5", "gsm8k") == ["3 + 4 = 7\n", "7 - 2 = 5"]


def test_blank_line_splits_paragraphs():
    text = "Para one\nstill one\n\n\nPara two\n  \nPara three"
    assert pieces(text, "blank_line") == ["Para one\nstill one\n\n\n", "Para two\n  \n", "Para three"]


def test_empty_and_blank_text():
    for name in SPLITTERS:
        assert split_steps("", name) == []
        assert split_steps(" \n\n ", name) == [(0, 4)]


def test_unknown_splitter_lists_known_names():
    with pytest.raises(ValueError, match="blank_line, gsm8k, math, newline"):
        split_steps("x", "sentences")


# ---------------------------------------------------------------- the MATH heuristic


def test_math_splits_sentences_but_not_inline_latex():
    text = "First we note that $x = 1. y = 2$ holds here. Then we use it to finish the proof."
    assert pieces(text, "math") == [
        "First we note that $x = 1. y = 2$ holds here. ",
        "Then we use it to finish the proof.",
    ]


def test_math_sentence_end_inside_closing_dollar():
    text = "We have that $r = \\sqrt{0^2 + 3^2} = 3.$  Also the angle is $\\frac{\\pi}{2}$ radians."
    assert pieces(text, "math") == [
        "We have that $r = \\sqrt{0^2 + 3^2} = 3.$  ",
        "Also the angle is $\\frac{\\pi}{2}$ radians.",
    ]


def test_math_keeps_display_environments_whole():
    align = "\\begin{align*}\n(a+b)^2 &= a^2 + 2ab + b^2 \\\\\n&= 9.\n\\end{align*}\n"
    text = "We expand the product carefully:\n" + align + "Hence the value is nine."
    assert pieces(text, "math") == ["We expand the product carefully:\n", align, "Hence the value is nine."]
    display = "$$\nx = 1. \\quad\ny = 2\n$$\n"
    text = "From the two equations we get\n" + display + "and both are positive integers."
    assert pieces(text, "math") == [
        "From the two equations we get\n",
        display,
        "and both are positive integers.",
    ]


def test_math_escaped_dollar_is_not_a_delimiter():
    text = "The first book costs \\$5. The second one costs \\$6 more than that."
    assert pieces(text, "math") == [
        "The first book costs \\$5. ",
        "The second one costs \\$6 more than that.",
    ]
    unescaped = text.replace("\\$", "$")  # now "$5. ... $" reads as inline math
    assert pieces(unescaped, "math") == [unescaped]


def test_math_merges_short_fragments():
    text = "Step 1:\nAdd the two numbers to get 12.\nSo x = 12.\nNext we multiply both sides by 3 to get 36."
    assert pieces(text, "math") == [
        "Step 1:\nAdd the two numbers to get 12.\nSo x = 12.\n",
        "Next we multiply both sides by 3 to get 36.",
    ]
    text = "Thus,\n$x = 12$ and that is the answer."
    assert pieces(text, "math") == [text]


def test_math_does_not_cut_after_abbreviations_or_list_markers():
    text = "We use a trick, e.g. the identity for squares, to finish it quickly."
    assert pieces(text, "math") == [text]
    text = "1. Compute the sum of all the numbers.\n2. Divide it by the count of numbers."
    assert pieces(text, "math") == [
        "1. Compute the sum of all the numbers.\n",
        "2. Divide it by the count of numbers.",
    ]


def test_math_breaks_long_parts_near_the_middle():
    text = ("word " * 30).strip()  # 149 characters, no sentence end
    assert pieces(text, "math") == ["word " * 15, "word " * 14 + "word"]
    long = ("alpha beta gamma " * 20).strip()  # 339 characters
    assert all(len(p.strip()) <= 100 for p in pieces(long, "math"))


def test_math_never_breaks_long_latex():
    text = "$" + "x+" * 40 + " ".join(["1"] * 40) + "$"
    assert pieces(text, "math") == [text]


def test_latex_regions():
    text = "a $x$ b \\$ c $$y$$ \\[z\\] \\(w\\) \\begin{a}\\begin{a}q\\end{a}\\end{a} $open"
    found = [text[a:b] for a, b in latex_regions(text)]
    assert found == ["$x$", "$$y$$", "\\[z\\]", "\\(w\\)", "\\begin{a}\\begin{a}q\\end{a}\\end{a}"]


# ---------------------------------------------------------------- the tiling property

LATEXISH = st.text(alphabet="ab x1.!?:,$\\[](){}\n\t", max_size=300) | st.text(max_size=200)


@settings(max_examples=300, deadline=None)
@given(text=LATEXISH, splitter=st.sampled_from(sorted(SPLITTERS)))
def test_spans_tile_the_text(text: str, splitter: str):
    spans = split_steps(text, splitter)
    if not text:
        assert spans == []
        return
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a < b for a, b in spans)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(spans, spans[1:]))
    assert all(text[a:b].strip() for a, b in spans[1:])  # only the first step may be blank


@settings(max_examples=200, deadline=None)
@given(text=LATEXISH)
def test_math_never_cuts_inside_latex(text: str):
    regions = latex_regions(text)
    for a, _ in split_steps(text, "math"):
        assert not any(start < a < end for start, end in regions)


# ---------------------------------------------------------------- steps to tokens


def test_token_step_ids_by_last_character():
    spans = [(0, 5), (5, 12), (12, 20)]
    # ends:     2  5  5  9 12 13 20   (third token is zero-width, fifth ends on a boundary)
    offsets = [2, 5, 5, 9, 12, 13, 20]
    assert token_step_ids(offsets, spans) == [0, 0, 0, 1, 1, 2, 2]
    assert token_step_ids([0, 0, 3], spans) == [0, 0, 0]
    assert token_step_ids([6, 6], spans) == [1, 1]
    assert token_step_ids([1, 2], []) == [0, 0]


def _train(model, pre_tokenizer, decoder, vocab_size: int, alphabet=()) -> PreTrainedTokenizerFast:
    corpus = ["Héllo wörld ≤ ∑ 😀 naïve café", "The answer is 42. Voilà! 数学 ≥ π", "x = 3\nso $y$ is 4"]
    tok = Tokenizer(model)
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=list(alphabet), special_tokens=["<eos>", "<unk>"]
    )
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def byte_bpe() -> PreTrainedTokenizerFast:
    return _train(models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), 300,
                  pre_tokenizers.ByteLevel.alphabet())


@pytest.fixture(scope="module")
def sentencepiece_like() -> PreTrainedTokenizerFast:
    return _train(models.BPE(unk_token="<unk>"), pre_tokenizers.Metaspace(), decoders.Metaspace(), 120)


@pytest.fixture(scope="module")
def char_level() -> PreTrainedTokenizerFast:
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 .,=$\n"))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _brute_force_offsets(tokenizer, ids: list[int], skip: bool) -> list[int]:
    """The definition: how far each decoded prefix agrees with the full decode."""
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    offsets, best = [], 0
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=skip)
        n = min(len(prefix), len(full))
        best = max(best, next((k for k in range(n) if prefix[k] != full[k]), n))
        offsets.append(best)
    return offsets[:-1] + [len(full)] if offsets else []


def test_offsets_char_level(char_level):
    text = "x = 3.\nso y = 4"
    ids = char_level.encode(text)
    assert char_level.decode(ids) == text
    assert token_end_offsets(char_level, ids) == list(range(1, len(text) + 1))


SAMPLES = ["café ≤ 😀 数学 the answer", "The answer is 42 café", "Héllo\nwörld ∑ π≥ 3", "", "😀😀数"]


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("name", ["byte_bpe", "sentencepiece_like"])
def test_offsets_match_prefix_decoding(request, name: str, text: str, skip: bool):
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode(text) + tokenizer.convert_tokens_to_ids(["<eos>"])
    offsets = token_end_offsets(tokenizer, ids, skip_special_tokens=skip)
    assert offsets == _brute_force_offsets(tokenizer, ids, skip)
    assert offsets[-1] == len(tokenizer.decode(ids, skip_special_tokens=skip))


def test_offsets_split_multibyte_characters_are_zero_width_then_complete(byte_bpe):
    ids = byte_bpe.encode("a😀b")
    assert len(ids) > 3  # the emoji's four bytes are split over several tokens
    offsets = token_end_offsets(byte_bpe, ids)
    assert offsets[0] == 1 and offsets[-2:] == [2, 3]
    assert set(offsets) == {1, 2, 3}  # the partial tokens add nothing; the last one adds the emoji
    assert token_step_ids(offsets, [(0, 2), (2, 3)]) == [0] * (len(ids) - 1) + [1]


class CountingTokenizer:
    """Wraps a tokenizer and records how many tokens each decode call sees."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def decode(self, token_ids, skip_special_tokens=False):
        self.sizes.append(len(token_ids))
        return self.inner.decode(token_ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("name", ["byte_bpe", "sentencepiece_like"])
def test_offsets_never_decode_long_prefixes(request, name: str):
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode(" ".join(SAMPLES) * 20)
    counting = CountingTokenizer(tokenizer)
    token_end_offsets(counting, ids)
    assert counting.sizes[0] == len(ids)  # the full decode, once
    assert max(counting.sizes[1:]) <= MAX_CONTEXT_TOKENS + 1  # then single tokens and short windows


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="ab é≤😀数\n", max_size=30), skip=st.booleans())
def test_offsets_property(byte_bpe, sentencepiece_like, text: str, skip: bool):
    for tokenizer in (byte_bpe, sentencepiece_like):
        ids = tokenizer.encode(text) + tokenizer.convert_tokens_to_ids(["<eos>"])
        expected = _brute_force_offsets(tokenizer, ids, skip)
        assert token_end_offsets(tokenizer, ids, skip_special_tokens=skip) == expected


@settings(max_examples=150, deadline=None)
@given(picks=st.lists(st.integers(min_value=0), max_size=12), skip=st.booleans())
def test_offsets_property_on_any_token_ids(byte_bpe, sentencepiece_like, picks: list[int], skip: bool):
    """Any ids, not only a text's own: byte tokens that leave a UTF-8 sequence unfinished for good
    decode to U+FFFD in the full text, and that character is the broken token's own."""
    for tokenizer in (byte_bpe, sentencepiece_like):
        ids = [p % len(tokenizer) for p in picks]
        assert token_end_offsets(tokenizer, ids, skip_special_tokens=skip) == _brute_force_offsets(tokenizer, ids, skip)


def test_a_byte_never_completed_is_its_tokens_replacement_character(byte_bpe):
    ids = byte_bpe.convert_tokens_to_ids(["a", "ðŁ", "Ċ", "b"])  # 'a', two bytes of an emoji, '\n', 'b'
    assert byte_bpe.decode(ids) == "a\ufffd\nb"
    assert token_end_offsets(byte_bpe, ids) == [1, 2, 3, 4]

