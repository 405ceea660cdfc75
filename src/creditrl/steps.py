"""Cut a response into reasoning steps, and map the steps onto the response's tokens.

A splitter turns text into character spans `[start, end)` that tile the text: every character
belongs to exactly one step, a separator (newline, the space after a sentence) belongs to the
step it ends, and leading whitespace belongs to the first step. Steps reach the tokens through
each token's end offset in the decoded response, so nothing is ever re-tokenized.
"""

from __future__ import annotations

import io
import re
import tokenize
from bisect import bisect_right
from typing import Callable, Protocol, Sequence

Span = tuple[int, int]

MIN_STEP_CHARS = 20  # `math`: shorter fragments are merged into a neighbour
MAX_STEP_CHARS = 100  # `math`: longer parts are broken near the middle

_ANSWER_LINE = re.compile(r"\s*(?:####|(?:the\s+)?(?:final\s+)?answer\b|\$*\\boxed)", re.IGNORECASE)
_NOT_SENTENCE_END = {"e.g", "i.e", "vs", "cf", "mr", "mrs", "ms", "dr", "st", "fig", "eq"}
_LIST_MARKER = re.compile(r"\(?(?:\d{1,3}|[a-z]|[ivx]{1,4})\)?", re.IGNORECASE)
_LATEX_OPEN = re.compile(r"\$\$|\$|\\\[|\\\(|\[asy\]|\\begin\{([^{}]*)\}|\\.", re.DOTALL)
_LATEX_CLOSE = {
    "$$": re.compile(r"\$\$"),
    "$": re.compile(r"(?<!\\)\$"),
    "\\[": re.compile(r"\\\]"),
    "\\(": re.compile(r"\\\)"),
    "[asy]": re.compile(r"\[/asy\]"),
}


# ---------------------------------------------------------------- spans from cut points


def _spans_from_cuts(text: str, cuts: Sequence[int]) -> list[Span]:
    """Tile `text` with spans that start at `cuts`; cuts before the first non-space are dropped."""
    if not text:
        return []
    first = len(text) - len(text.lstrip())
    bounds = [0, *sorted({c for c in cuts if first < c < len(text)}), len(text)]
    return list(zip(bounds[:-1], bounds[1:]))


def _line_starts(text: str) -> list[int]:
    """Start offsets of the lines that hold something other than whitespace."""
    starts, pos = [], 0
    for line in text.splitlines(keepends=True):
        if line.strip():
            starts.append(pos)
        pos += len(line)
    return starts


# ---------------------------------------------------------------- line-based splitters


def split_newline(text: str) -> list[Span]:
    """One step per non-empty line; blank lines join the step above them."""
    return _spans_from_cuts(text, _line_starts(text))


def split_gsm8k(text: str) -> list[Span]:
    """`newline`, with a final answer line (`#### 42`, `The answer is 42`) merged into the step before."""
    spans = split_newline(text)
    if len(spans) >= 2 and _ANSWER_LINE.match(text[slice(*spans[-1])]):
        spans[-2:] = [(spans[-2][0], spans[-1][1])]
    return spans


def split_blank_line(text: str) -> list[Span]:
    """One step per paragraph; paragraphs are separated by blank lines."""
    lines = text.splitlines(keepends=True)
    cuts, pos = [], 0
    for i, line in enumerate(lines):
        if i > 0 and line.strip() and not lines[i - 1].strip():
            cuts.append(pos)
        pos += len(line)
    return _spans_from_cuts(text, cuts)


# ---------------------------------------------------------------- the MATH heuristic


def latex_regions(text: str) -> list[Span]:
    """Spans of LaTeX that must stay whole: $..$, $$..$$, \\[..\\], \\(..\\), \\begin{e}..\\end{e},
    and MATH's [asy]..[/asy] drawings.

    An opener without its closer protects nothing; `\\$` is an escaped dollar, not a delimiter.
    """
    regions, pos = [], 0
    while match := _LATEX_OPEN.search(text, pos):
        opener, env = match.group(0), match.group(1)
        if env is not None:
            end = _environment_end(text, env, match.end())
        elif opener in _LATEX_CLOSE:
            close = _LATEX_CLOSE[opener].search(text, match.end())
            end = close.end() if close else None
        else:  # an escaped character such as \$ or \\
            end = None
        if end is None:
            pos = match.end()
        else:
            regions.append((match.start(), end))
            pos = end
    return regions


def _environment_end(text: str, env: str, pos: int) -> int | None:
    """End offset of the `\\end{env}` that closes an environment opened just before `pos`."""
    depth = 1
    for tag in re.finditer(r"\\(begin|end)\{" + re.escape(env) + r"\}", text[pos:]):
        depth += 1 if tag.group(1) == "begin" else -1
        if depth == 0:
            return pos + tag.end()
    return None


def _inside(pos: int, regions: Sequence[Span]) -> bool:
    """Whether `pos` falls strictly inside one of the sorted, disjoint `regions`."""
    i = bisect_right(regions, (pos, float("inf"))) - 1
    return i >= 0 and regions[i][0] < pos < regions[i][1]


def _sentence_cuts(text: str) -> list[int]:
    """Starts of sentences that follow `.`, `!` or `?` (perhaps closing a `$`) and whitespace,
    skipping `e.g.` and list markers such as `1.`."""
    cuts = []
    for match in re.finditer(r"[.!?]\$*\s+(?=\S)", text):
        line_start = text.rfind("\n", 0, match.start()) + 1
        before = text[line_start : match.start()]
        word = before.split()[-1] if before.strip() else ""
        is_list_marker = word == before.strip() and _LIST_MARKER.fullmatch(word)
        if word.lower() in _NOT_SENTENCE_END or is_list_marker:
            continue
        cuts.append(match.end())
    return cuts


def _size(text: str, span: Span) -> int:
    return len(text[span[0] : span[1]].strip())


def _merge_short(text: str, spans: list[Span], min_chars: int) -> list[Span]:
    """Merge fragments shorter than `min_chars` into the step before them, or into the step after
    them when they open the text or lead into it (end with `:` or `,`, as `Step 1:` or `Thus,`)."""
    merged: list[Span] = []
    carry: int | None = None  # start of a fragment waiting to join the next span
    for start, end in spans:
        if carry is not None:
            start, carry = carry, None
        if _size(text, (start, end)) >= min_chars:
            merged.append((start, end))
        elif not merged or text[start:end].rstrip().endswith((":", ",")):
            carry = start
        else:
            merged[-1] = (merged[-1][0], end)
    if carry is not None:  # the last fragment had no step after it
        if merged:
            merged[-1] = (merged[-1][0], len(text))
        else:
            merged.append((carry, len(text)))
    return merged


def _break_long(
    text: str, span: Span, regions: Sequence[Span], min_chars: int, max_chars: int
) -> list[Span]:
    """Break a span longer than `max_chars` at the whitespace nearest its middle (outside LaTeX),
    recursively, keeping both halves at least `min_chars` long."""
    start, end = span
    if _size(text, span) <= max_chars:
        return [span]
    middle = (start + end) / 2
    cuts = [
        start + gap.end()
        for gap in re.finditer(r"\s+", text[start:end])
        if not _inside(start + gap.start(), regions)
        and _size(text, (start, start + gap.end())) >= min_chars
        and _size(text, (start + gap.end(), end)) >= min_chars
    ]
    if not cuts:
        return [span]
    cut = min(cuts, key=lambda c: abs(c - middle))
    return [*_break_long(text, (start, cut), regions, min_chars, max_chars),
            *_break_long(text, (cut, end), regions, min_chars, max_chars)]


def split_math(
    text: str, min_chars: int = MIN_STEP_CHARS, max_chars: int = MAX_STEP_CHARS
) -> list[Span]:
    """Split on lines and sentence ends outside LaTeX, merge short fragments, break long parts."""
    regions = latex_regions(text)
    cuts = [c for c in _line_starts(text) + _sentence_cuts(text) if not _inside(c, regions)]
    spans = _merge_short(text, _spans_from_cuts(text, cuts), min_chars)
    return [part for span in spans for part in _break_long(text, span, regions, min_chars, max_chars)]


_NOT_A_STATEMENT = {tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT,
                    tokenize.ENDMARKER}


def split_python(text: str) -> list[Span]:
    """One step per logical line of Python (a statement spread over several lines is one step; a comment
    joins the statement above it); from where the tokenizer stops reading (an unclosed bracket, bad
    indentation), one step per line."""
    offsets = [0]
    for line in text.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    cuts, read_to, at_start = [], 0, True  # read_to: physical lines (1-based) the tokenizer got through
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if at_start and token.type not in _NOT_A_STATEMENT:
                cuts.append(offsets[token.start[0] - 1])
                at_start = False
            if token.type == tokenize.NEWLINE:
                at_start, read_to = True, token.end[0]
    except (tokenize.TokenError, SyntaxError):
        cuts += [start for start in _line_starts(text) if start >= offsets[read_to]]
    return _spans_from_cuts(text, cuts)


SPLITTERS: dict[str, Callable[[str], list[Span]]] = {
    "newline": split_newline,
    "python": split_python,
    "gsm8k": split_gsm8k,
    "blank_line": split_blank_line,
    "math": split_math,
}


def split_steps(text: str, splitter: str) -> list[Span]:
    """Character spans of the steps of `text`, cut by the splitter registered as `splitter`.

    Empty text has no steps; any other text has at least one.
    """
    if splitter not in SPLITTERS:
        raise ValueError(f"unknown step splitter {splitter!r}; known: {', '.join(sorted(SPLITTERS))}")
    return SPLITTERS[splitter](text)


# ---------------------------------------------------------------- from characters to tokens


def token_step_ids(token_end_offsets: Sequence[int], spans: Sequence[Span]) -> list[int]:
    """Step index of each token: the step holding the token's last character.

    A token ending exactly on a step boundary belongs to the earlier step; a token that adds no
    characters belongs to the step of the token before it (0 for the first token).
    """
    starts = [start for start, _ in spans]
    last = max(len(spans) - 1, 0)
    ids, previous_end = [], 0
    for end in token_end_offsets:
        if end <= previous_end:
            ids.append(ids[-1] if ids else 0)
        else:
            ids.append(min(max(bisect_right(starts, end - 1) - 1, 0), last))
        previous_end = max(previous_end, end)
    return ids


class Detokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


MAX_CONTEXT_TOKENS = 8  # `token_end_offsets`: longest context decoded with a token


def token_end_offsets(
    tokenizer: Detokenizer, token_ids: Sequence[int], skip_special_tokens: bool = False
) -> list[int]:
    """Offset in `tokenizer.decode(token_ids)` where each token's text ends.

    Each token is decoded alone and its text matched against the full decode. When that text is
    empty or disagrees (a byte-level token holding part of a UTF-8 character, a SentencePiece
    token whose leading space is dropped when decoded alone), the token's text is what it adds
    to the tokens before it, decoded from the last token that starts a character; as a last
    resort, how far the decoded prefix agrees with the full decode. A token that completes no
    character ends where the previous one did; the last token ends where the text ends.
    """
    ids = list(token_ids)

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=skip_special_tokens)

    full = decode(ids)
    offsets: list[int] = []
    pos = 0
    # Context starts at ids[start]: a token that begins a character and adds text of its own.
    start, previous_clean = 0, True
    for i, token in enumerate(ids):
        piece, clean, replaced = decode([token]), True, 0
        if not piece or "\ufffd" in piece or not full.startswith(piece, pos):
            piece, clean, replaced = _added_text(decode, ids[max(start, i - MAX_CONTEXT_TOKENS) : i], token)
        end = pos + len(piece) if piece is not None and full.startswith(piece, pos) else None
        if end is None:
            end = max(pos, _common_prefix_length(decode(ids[: i + 1]), full))
        else:  # the U+FFFD of a sequence nothing completes stay in the full text: the token's own
            end += next((k for k in range(replaced) if full[end + k : end + k + 1] != "\ufffd"), replaced)
        if previous_clean and end > pos:
            start = i
        previous_clean, pos = clean, end
        offsets.append(pos)
    if offsets:
        offsets[-1] = len(full)
    return offsets


def _added_text(
    decode: Callable[[list[int]], str], context: list[int], token: int
) -> tuple[str | None, bool, int]:
    """The text `token` adds after `context` (None when decoding is not additive there), whether
    it ends on a whole character, and how many U+FFFD of its own an unfinished UTF-8 sequence
    shows as (text only if nothing completes it). An unfinished sequence adds no text yet."""
    raw_before = decode(context)
    before = raw_before.rstrip("\ufffd")
    after = decode([*context, token])
    trimmed = after.rstrip("\ufffd")
    replaced = len(after) - len(trimmed)
    if after.startswith(raw_before):  # the context's own U+FFFD are still there: not this token's
        replaced -= len(raw_before) - len(before)
    return (trimmed[len(before) :] if trimmed.startswith(before) else None), after == trimmed, replaced


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)
