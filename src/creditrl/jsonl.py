"""Jsonl logs: one JSON record per line, appended as a run goes and read back later.

One rule for a run killed mid-append: its last line is torn, and a last line that does not parse
is taken for one.  `read_jsonl` drops it; `append_jsonl` cuts it off before writing, so it never
ends up inside the file glued to the next record.  A line before the last that does not parse is
an error naming the file and the line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO

_BLOCK = 4096  # bytes read at a time, backwards from the end, to find where the last line starts


def read_jsonl(path: Path) -> list[dict]:
    """The records of a jsonl file, [] if there is none; blank lines are skipped, a torn last line dropped."""
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number != lines[-1][0]:
                raise ValueError(f"{path}:{number}: not a JSON record ({err.msg})") from None
    return records


def append_jsonl(path: Path, record: dict) -> None:
    """Append `record` as a line; a torn last line is cut off first (one that parses only gets its newline)."""
    with open(path, "ab+") as fh:
        start = _last_line_start(fh)
        fh.seek(start)
        last = fh.read()
        if last:
            try:
                json.loads(last)
                fh.write(b"\n")
            except ValueError:  # not JSON, or not even UTF-8
                fh.truncate(start)
        fh.write((json.dumps(record) + "\n").encode())


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the records of steps ≤ `step` (a resumed run writes again what came after its checkpoint).

    The kept records are written to a temporary file that then replaces the log (`os.replace`),
    so a kill mid-rewrite leaves the old log whole.
    """
    if path.exists():
        kept = [r for r in read_jsonl(path) if r["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)


def _last_line_start(fh: BinaryIO) -> int:
    """The offset just past the file's last newline (0 without one): where an unfinished last line starts."""
    end = fh.seek(0, os.SEEK_END)
    while end > 0:
        start = max(end - _BLOCK, 0)
        fh.seek(start)
        newline = fh.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0
