"""Math problems with a checkable final answer: GSM8K, MATH-500, and any jsonl file like them.

A response is correct when its final answer (the last `\\boxed{...}`, else `#### N`, else
`<answer>...</answer>`, else `Answer: ...`) equals the reference as mathematics, judged by
`math_verify`. Rows are read strictly: a malformed row is an error naming its file and line,
or, when asked, a skipped row that is counted and logged.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import threading
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import math_verify
from math_verify.errors import TimeoutException

from creditrl.config import DatasetSection, GSM8KSection, HubSection, JsonlSection, MATH500Section
from creditrl.steps import SPLITTERS
from creditrl.tasks.base import Problem, Verdict
from creditrl.tasks.errors import DatasetError
from creditrl.tasks.registry import register_task
from creditrl.tasks.splits import file_splits

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
VERIFY_TIMEOUT_S = 5  # math_verify's limit per parse and per comparison, in the main thread only

# ---------------------------------------------------------------- finding the final answer

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*(.*)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_PHRASE = re.compile(r"\banswer[^\S\n]*(?:is\b[^\S\n]*:?|:)[^\S\n]*(?=\S)", re.IGNORECASE)
_PHRASE_END = re.compile(r"[.,;](?:\s|$)|\s(?:since|because|as|so|which)\b", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, or None if there is none or it never closes."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth, i = 1, start
    while i < len(text):
        if text[i] == "\\":  # an escaped brace \{ or \} is content, not structure
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
        i += 1
    return None


def _last(pattern: re.Pattern[str], text: str) -> str | None:
    found = pattern.findall(text)
    return found[-1] if found else None


def _answer_phrase(text: str) -> str | None:
    """What follows the last `answer is` / `answer:` on its line, up to the end of its sentence or
    clause (`The answer is 7, since ...` gives `7`); `$...$` is kept whole."""
    found = list(_ANSWER_PHRASE.finditer(text))
    if not found:
        return None
    rest = text[found[-1].end():].split("\n", 1)[0]
    if rest.startswith("$") and "$" in rest[1:]:
        return rest[:rest.index("$", 1) + 1]
    end = _PHRASE_END.search(rest)
    return rest[:end.start()] if end else rest


def _clean(answer: str) -> str:
    """Drop the wrapping a final answer often carries: whitespace, a full stop, `$...$`."""
    return answer.strip().rstrip(".").strip().strip("$").strip()


def extract_answer(text: str) -> str | None:
    """The final answer of a response or reference solution, or None if it gives none.

    Tried in order, each taking its last occurrence: `\\boxed{...}`, `#### N`,
    `<answer>...</answer>`, `Answer: ...` / `The answer is ...` (to the end of its clause).
    When the text has a `</think>`, only what follows the last one is searched.
    """
    text = text.rsplit("</think>", 1)[-1]
    candidates = (last_boxed(text), _last(_HASHES, text), _last(_ANSWER_TAG, text), _answer_phrase(text))
    return next((_clean(c) for c in candidates if c is not None and _clean(c)), None)


# ---------------------------------------------------------------- comparing answers

_PLAIN_NUMBER = re.compile(r"-?(?:[1-9]\d{0,2}(?:,\d{3})+|\d+)(?:\.\d+)?")
_PERCENT = re.compile(r"\s*\\?%\s*$")  # a trailing percent sign, plain or LaTeX-escaped


def _plain_number(answer: str) -> Decimal | None:
    """`answer` as a number if it is written as one (`1,234`, `-0.5`, `\\$18`), else None."""
    text = answer.strip().removeprefix("\\$").removeprefix("$").strip()
    return Decimal(text.replace(",", "")) if _PLAIN_NUMBER.fullmatch(text) else None


_COUNTED_THING = re.compile(  # "42 dollars", "42 \\text{ cookies}", "7 miles per hour": a number, then words only
    r"(?P<number>.*?\d)\s*(?:\\(?:text|mbox|mathrm)\s*\{(?P<braced>[^{}]*)\}|(?P<bare>[A-Za-z][A-Za-z\s.]*))")
_VALUE_WORDS = frozenset(  # words that change the number they follow: "2 and a half", "3 million", "2 pi"
    "and or plus minus times over point half halves third thirds quarter quarters fourth fourths fifth fifths "
    "sixth sixths seventh sevenths eighth eighths ninth ninths tenth tenths hundredth hundredths thousandth "
    "thousandths dozen dozens score hundred hundreds thousand thousands million millions billion billions trillion "
    "percent squared cubed pi factorial sqrt root roots".split())


def _counted_number(answer: str) -> Decimal | None:
    """The number of `42 dollars` / `42 \\text{ cookies}` (a plain number, then a unit or the thing
    counted, in words of two letters or more that do not change its value), else None."""
    match = _COUNTED_THING.fullmatch(answer.strip())
    if match is None:
        return None
    words = (match["braced"] if match["braced"] is not None else match["bare"]).replace(".", " ").split()
    if not words or any(len(w) < 2 or not w.isalpha() or w.lower() in _VALUE_WORDS for w in words):
        return None
    return _plain_number(match["number"])


def vote_key(answer: str) -> str:
    """The form majority voting counts an answer under: a plain number as a decimal, with or without
    the thing it counts (`2,125`, `2125.0` and `2125 apples` are one vote), anything else with its
    whitespace and trailing percent sign evened out."""
    answer = _PERCENT.sub("", answer)
    number = _plain_number(answer)
    number = _counted_number(answer) if number is None else number
    return format(number.normalize(), "f") if number is not None else " ".join(answer.split())


def _timeout() -> int | None:
    """math_verify times out with SIGALRM, which only the main thread may use; elsewhere it
    must run without a limit (`None`), so a pathological answer can stall a worker thread."""
    return VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=8192)
def _parsed(answer: str) -> tuple:
    """math_verify's reading of one final answer; empty when it cannot read it."""
    try:
        return tuple(math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=_timeout()))
    except (Exception, TimeoutException):  # math_verify's TimeoutException is a BaseException
        return ()


def answers_match(predicted: str, reference: str) -> bool:
    """Whether a predicted final answer equals the reference as mathematics. Never raises.

    Two plain numbers compare as decimals (`1,234` equals `1234.0`), and so does a prediction that
    names what it counts against a plain-number reference (`42 dollars` equals `42`: GSM8K's
    references are bare numbers, and math_verify reads `dollars` as a product of symbols);
    anything else goes to math_verify (fractions, LaTeX, sets, intervals, matrices, equations).
    """
    predicted, reference = _PERCENT.sub("", predicted), _PERCENT.sub("", reference)  # 10% is 10, not 0.1
    if " ".join(predicted.split()) == " ".join(reference.split()):
        return bool(predicted.strip())
    predicted_number, reference_number = _plain_number(predicted), _plain_number(reference)
    if reference_number is not None and predicted_number is None:
        predicted_number = _counted_number(predicted)
    if predicted_number is not None and reference_number is not None:
        return predicted_number == reference_number
    gold, guess = _parsed(reference), _parsed(predicted)
    if not gold or not guess:
        return False
    try:
        return bool(math_verify.verify(list(gold), list(guess), timeout_seconds=_timeout()))
    except (Exception, TimeoutException):
        return False


_FORMAT = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def check_format(text: str) -> bool:
    """DeepSeek-R1-Zero format: `<think>reasoning</think>` and then the answer, either as
    `<answer>...</answer>` (and nothing more) or as a `\\boxed{...}` after the think block."""
    match = _FORMAT.fullmatch(text)
    if match is None or not match[1].strip() or "<think>" in match[1]:
        return False
    rest = match[2]
    if "<think>" in rest or "</think>" in rest:
        return False
    block = _ANSWER_BLOCK.fullmatch(rest)
    return bool(block[1].strip()) if block else bool(last_boxed(rest))


# ---------------------------------------------------------------- reading jsonl rows

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _field(row: dict, name: str, numbers_ok: bool = False) -> str:
    """A non-empty text field of a row (numbers too when `numbers_ok`), as a string."""
    if name not in row:
        raise ValueError(f"field {name!r} is missing")
    value = row[name]
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {_JSON_TYPES[type(value)]}")
    if not value.strip():
        raise ValueError(f"field {name!r} is empty")
    return value


class JsonlTask:
    """Problems from jsonl files: one JSON object per line holding a question and its answer.

    Without a train file, the eval file is split by `seed` into train and eval parts
    (`eval_fraction` of it for eval). `eval_size` keeps a seeded sample of the eval problems.
    Problem ids are `{id_field}` when given, else `{file stem}:{line}`.
    """

    def __init__(
        self,
        *,
        train_path: Path | str | None = None,
        eval_path: Path | str,
        name: str = "jsonl",
        question_field: str = "question",
        answer_field: str = "answer",
        answer_is_solution: bool = False,
        prompt_template: str = DEFAULT_PROMPT,
        eval_size: int | None = None,
        eval_fraction: float = 0.2,
        seed: int = 0,
        on_bad_row: Literal["error", "skip"] = "error",
        require_format: bool = False,
        step_splitter: str = "math",
        meta_fields: tuple[str, ...] = (),
        id_field: str | None = None,
    ):
        if "{question}" not in prompt_template:
            raise ValueError("prompt_template must contain '{question}'")
        if step_splitter not in SPLITTERS:
            known = ", ".join(sorted(SPLITTERS))
            raise ValueError(f"unknown step splitter {step_splitter!r}; known: {known}")
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', not {on_bad_row!r}")
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must lie strictly between 0 and 1, not {eval_fraction}")
        if eval_size is not None and eval_size < 1:
            raise ValueError(f"eval_size must be at least 1, not {eval_size}")
        self.name, self.step_splitter, self.require_format = name, step_splitter, require_format
        self.question_field, self.answer_field = question_field, answer_field
        self.answer_is_solution, self.prompt_template = answer_is_solution, prompt_template
        self.meta_fields, self.id_field, self.on_bad_row = tuple(meta_fields), id_field, on_bad_row
        self.skipped_rows: list[tuple[int, str]] = []  # (line, message naming file and line)

        evals = self._read(Path(eval_path))
        trains = self._read(Path(train_path)) if train_path is not None else None
        self._train, self._eval = file_splits(evals, trains, seed, eval_size, eval_fraction)

    def train_problems(self) -> tuple[Problem, ...]:
        return self._train

    def eval_problems(self) -> tuple[Problem, ...]:
        return self._eval

    def verify(self, problem: Problem, response: str) -> Verdict:
        """Correct when the response's final answer matches; `format_ok` is the R1-Zero format
        when `require_format` (and then a badly formatted response is wrong), else whether
        the response gave a final answer at all."""
        answer = extract_answer(response)
        format_ok = check_format(response) if self.require_format else answer is not None
        correct = format_ok and answer is not None and answers_match(answer, problem.answer)
        return Verdict(correct=correct, step_correct=None, format_ok=format_ok,
                       answer=None if answer is None else vote_key(answer))

    # ------------------------------------------------------------ loading

    def _read(self, path: Path) -> list[Problem]:
        """Every problem in a jsonl file; bad rows raise, or are skipped and recorded."""
        if not path.is_file():
            raise DatasetError(path, None, "no such file")
        problems: list[Problem] = []
        skipped: list[tuple[int, str]] = []
        lines = path.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n")  # a BOM is not part of row 1
        rows = [(line, raw) for line, raw in enumerate(lines, start=1) if raw.strip()]
        if not rows:
            raise DatasetError(path, None, "the file has no rows")
        for line, raw in rows:
            try:
                problems.append(self._problem(path, line, raw))
            except DatasetError as error:
                if self.on_bad_row == "error":
                    raise
                skipped.append((line, str(error)))
        if skipped:
            logger.warning("skipped %d of %d rows; the first: %s", len(skipped), len(rows), skipped[0][1])
            self.skipped_rows.extend(skipped)
        if not problems:
            raise DatasetError(path, None, f"no usable rows (all {len(rows)} are malformed)")
        return problems

    def _problem(self, path: Path, line: int, raw: bytes) -> Problem:
        """One row as a Problem, or a DatasetError naming the file, line and what is wrong."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DatasetError(path, line, f"invalid UTF-8 at byte {error.start}") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetError(path, line, f"invalid JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(row, dict):
            raise DatasetError(path, line, f"expected a JSON object, got {_JSON_TYPES[type(row)]}")
        try:
            question = _field(row, self.question_field)
            answer = _field(row, self.answer_field, numbers_ok=True)
            meta: dict[str, Any] = {}
            for name in self.meta_fields:
                if name not in row:
                    raise ValueError(f"field {name!r} is missing")
                meta[name] = row[name]
            if self.id_field is None:
                problem_id = f"{path.stem}:{line}"
            else:
                problem_id = _field(row, self.id_field, numbers_ok=True)
        except ValueError as error:
            raise DatasetError(path, line, str(error)) from None
        if self.answer_is_solution:
            final = extract_answer(answer)
            if final is None:
                reason = f"field {self.answer_field!r} has no final answer ('#### N' or \\boxed{{}})"
                raise DatasetError(path, line, reason)
            answer = final
        prompt = self.prompt_template.replace("{question}", question.strip())
        return Problem(id=problem_id, prompt=prompt, answer=answer.strip(), meta=meta)


# ---------------------------------------------------------------- ready-made tasks


def gsm8k_task(data_dir: Path | str, **options: Any) -> JsonlTask:
    """GSM8K from `data_dir`/train.jsonl and test.jsonl (fields `question` and `answer`, the
    answer a worked solution ending in `#### N`). Other keyword arguments as for JsonlTask."""
    data_dir = Path(data_dir)
    defaults = dict(name="gsm8k", question_field="question", answer_field="answer",
                    answer_is_solution=True, step_splitter="gsm8k")
    paths = dict(train_path=data_dir / "train.jsonl", eval_path=data_dir / "test.jsonl")
    return JsonlTask(**paths, **{**defaults, **options})


def math500_task(path: Path | str, **options: Any) -> JsonlTask:
    """MATH-500 from its jsonl file (`problem`, `answer`, `level`, `subject`, `unique_id`).

    With no `train_path` it is split by `seed` (see JsonlTask); `level` and `subject` go to meta.
    """
    defaults = dict(name="math500", question_field="problem", answer_field="answer",
                    meta_fields=("level", "subject"), id_field="unique_id", step_splitter="math")
    return JsonlTask(eval_path=path, **{**defaults, **options})


def hub_task(
    name: str,
    *,
    config: str | None = None,
    train_split: str | None = "train",
    eval_split: str = "test",
    cache_dir: Path | str | None = None,
    **options: Any,
) -> JsonlTask:
    """A task from a Hugging Face hub dataset, for users who ask for one (needs `datasets` and
    the network). The splits are saved once as jsonl under `cache_dir` and read like local files.
    Other keyword arguments as for JsonlTask (field names, answer_is_solution, ...)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "hub_task needs the `datasets` package: `pip install 'creditrl[hub]'` (or pip install datasets). "
            "Or download the data as jsonl and use JsonlTask, gsm8k_task or math500_task with local paths."
        ) from error
    cache = Path(cache_dir or Path.home() / ".cache" / "creditrl" / "hub")
    folder = cache / name.replace("/", "__") / (config or "default")
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split in filter(None, (train_split, eval_split)):
        paths[split] = folder / f"{split}.jsonl"
        if not paths[split].exists():
            partial = paths[split].with_suffix(".partial")
            datasets.load_dataset(name, config, split=split).to_json(partial, lines=True, force_ascii=False)
            partial.replace(paths[split])
    train_path = paths[train_split] if train_split else None
    return JsonlTask(train_path=train_path, eval_path=paths[eval_split], **{"name": name, **options})


# ---------------------------------------------------------------- registered by name


def _dataset_options(cfg: DatasetSection) -> dict[str, Any]:
    options: dict[str, Any] = {"eval_size": cfg.eval_size, "seed": cfg.seed, "on_bad_row": cfg.on_bad_row,
                               "require_format": cfg.require_format}
    if cfg.prompt_template is not None:
        options["prompt_template"] = cfg.prompt_template
    return options


@register_task("gsm8k", config=GSM8KSection)
def gsm8k_from_config(cfg: GSM8KSection) -> JsonlTask:
    if cfg.data_dir is None:
        raise ValueError("task.data_dir: gsm8k needs the folder holding train.jsonl and test.jsonl")
    return gsm8k_task(cfg.data_dir, **_dataset_options(cfg))


@register_task("math500", config=MATH500Section)
def math500_from_config(cfg: MATH500Section) -> JsonlTask:
    if cfg.eval_path is None:
        raise ValueError("task.eval_path: math500 needs the path of its test.jsonl")
    return math500_task(cfg.eval_path, train_path=cfg.train_path, **_dataset_options(cfg))


@register_task("jsonl", config=JsonlSection)
def jsonl_from_config(cfg: JsonlSection) -> JsonlTask:
    if cfg.eval_path is None:
        raise ValueError("task.eval_path: a jsonl task needs eval_path (and optionally train_path)")
    return JsonlTask(train_path=cfg.train_path, eval_path=cfg.eval_path, question_field=cfg.question_field,
                     answer_field=cfg.answer_field, answer_is_solution=cfg.answer_is_solution, **_dataset_options(cfg))


@register_task("hub", config=HubSection)
def hub_from_config(cfg: HubSection) -> JsonlTask:
    if cfg.hub_name is None:
        raise ValueError("task.hub_name: name the hub dataset to load")
    return hub_task(cfg.hub_name, config=cfg.hub_config, train_split=cfg.train_split, eval_split=cfg.eval_split,
                    question_field=cfg.question_field, answer_field=cfg.answer_field,
                    answer_is_solution=cfg.answer_is_solution, **_dataset_options(cfg))
