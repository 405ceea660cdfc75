"""The CAPO critic prompt (methods.md §5) and a tolerant parser of the critic's verdict.

The solution is shown as the numbered steps of the rollout itself: the step texts are cut from
the decoded response where each step's last token ends (`step_texts`), so step i of the prompt
is exactly the tokens with `step_ids == i − 1`; nothing is re-split.  The critic ends its
analysis with `Wrong steps: [i, j]` (1-based) or `Wrong steps: []`.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

PROMPT_TEMPLATE = """You are checking a solution to a problem, step by step.

Problem:
{question}

Reference answer:
{answer}

Solution, in numbered steps:
{steps}

Check every step in order. A step is wrong when it makes a calculation or logical error, or uses \
a wrong value from an earlier step. Write a short analysis, then end with one final line listing \
the numbers of the wrong steps, in this form:
Wrong steps: [i, j]
or, if every step is right:
Wrong steps: []"""

MAX_LIST_CHARS = 500  # a verdict list is read from at most this many characters after its marker
_MARKER = re.compile(  # "[no ]wrong step(s)[ (note)][ are|is][:|=]", then spaces and at most one newline
    r"(\bno\s+)?wrong\s+steps?[^\S\n]*(?:\([^)\n]*\)[^\S\n]*)?(?:(?:are|is)\b[^\S\n]*)?[:=]?[^\S\n]*\n?", re.IGNORECASE)
_ITEM = re.compile(r"(?:step\s*)?(\d{1,9})(?:\s*(?:-|–|—|to)\s*(?:step\s*)?(\d{1,9}))?", re.IGNORECASE)
_LIST = re.compile(rf"{_ITEM.pattern}(?:(?:\s*(?:,|;|&|\band\b)\s*|\s+){_ITEM.pattern})*", re.IGNORECASE)
_NONE = re.compile(r"(?:none|no\b|nothing|n/?a\b|nil\b|null\b|empty\b|[-—]\s*$)", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d{1,3}[.)])\s+")  # "- ", "• ", "1. ", "2) " before a list item
_THINKING = re.compile(r"<think>.*?(?:</think>|$)", re.IGNORECASE | re.DOTALL)
_BARE_LIST = re.compile(rf"\[\s*(?:{_LIST.pattern}\s*)?\]", re.IGNORECASE)


def step_texts(response_ids: Sequence[int], step_ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[str]:
    """Text of each step of one response (padding already removed), the steps tiling its decode.

    Step j ends where the decode of the tokens of steps ≤ j ends (step ids never decrease along a
    response); a step that owns no token gets "".  Shapes: response_ids (T,), step_ids (T,).
    """
    ids, steps = list(response_ids), list(step_ids)
    text = decode(ids)
    cuts: list[int] = []
    for j in range(max(steps, default=-1) + 1):
        end = len(decode(ids[: sum(s <= j for s in steps)]))
        cuts.append(min(max(end, cuts[-1] if cuts else 0), len(text)))
    return [text[a:b] for a, b in zip([0, *cuts], cuts)]


def build_prompt(question: str, answer: str, steps: Sequence[str]) -> str:
    """The critic prompt: question, reference answer and the solution as `Step i:` blocks (1-based)."""
    numbered = "\n".join(f"Step {i}: {s.strip()}" for i, s in enumerate(steps, start=1))
    return PROMPT_TEMPLATE.format(question=question.strip(), answer=answer.strip(), steps=numbered)


def parse_wrong_steps(text: str | None, n_steps: int) -> set[int] | None:
    """0-based indices of the steps the critique calls wrong, or None when it gives no verdict.

    The verdict is the last `wrong step(s)` marker (any case, markdown `*`/`_`/backticks
    ignored, optional `are`/`:`/`=`) followed, on its line or the next, by a list: `[1, 3]`,
    `1, 3`, `Step 2 and Step 4`, ranges `2-4` / `2 to 4`, a bulleted or numbered list of such
    items on the lines that follow, or a "none" word (`none`, `no ...`, `n/a`, `[]`) for the
    empty set; text after the list is ignored.  `no wrong steps` with no list after it is the
    empty set, unless an earlier marker has a list; a marker followed by anything else is skipped.
    Without a marker, a bare bracketed list (`[2]`, `[]`) as the last line counts.  A reasoning
    model's `<think>` block (closed or cut off) is not read.  Numbers outside 1..n_steps are
    dropped; a list of only such numbers is no verdict (None).  Never raises.
    """
    if not text:
        return None
    clean = re.sub(r"[*_`]", "", _THINKING.sub("", text))
    said_none = False
    for marker in reversed(list(_MARKER.finditer(clean))):
        verdict = _read_list(_list_text(clean[marker.end():marker.end() + MAX_LIST_CHARS]), n_steps)
        if verdict is not None:
            return verdict
        said_none = said_none or bool(marker[1])
    if said_none:
        return set()
    lines = clean.strip().splitlines()
    if lines and _BARE_LIST.fullmatch(lines[-1].strip()):
        return _read_list(lines[-1], n_steps)
    return None


def _list_text(after_marker: str) -> str:
    """The list after a marker: the rest of its line, or, when that is a list item ("- Step 2",
    "1. Step 3 (a slip)"), it and the item lines right below it, each cut to its leading steps
    and joined with commas."""
    lines = after_marker.split("\n")
    if not _BULLET.match(lines[0]):
        return lines[0]
    items = []
    for line in lines:
        if not _BULLET.match(line):
            break
        item = _BULLET.sub("", line).strip()
        listed = _LIST.match(item)  # "Step 3 (arithmetic)": the step, without the note after it
        items.append(listed[0] if listed else item)
    return ", ".join(items)


def _read_list(tail: str, n_steps: int) -> set[int] | None:
    """The steps listed at the start of `tail` (0-based, in range), or None if it lists nothing."""
    tail = tail.strip()
    bracketed = re.match(r"[\[({]([^\])}]*)[\])}]", tail)
    if bracketed:
        tail = re.sub(r"[\"']", "", bracketed[1]).strip().rstrip(",;. ")
        if not tail or _NONE.match(tail):
            return set()
        listed = _LIST.match(tail)
        if listed is None or listed.end() != len(tail):
            return None
    else:
        tail = tail.lstrip("[({")
        listed = _LIST.match(tail)
        if listed is None:
            return set() if _NONE.match(tail) else None
    steps = set()
    for item in _ITEM.finditer(listed[0]):
        first, last = sorted((int(item[1]), int(item[2] or item[1])))
        steps.update(range(max(first, 1) - 1, min(last, n_steps)))
    return steps or None  # numbers, but none of them a step of this solution: no verdict
