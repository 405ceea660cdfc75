"""The error raised when a dataset file cannot be used as it is."""

from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    """A malformed dataset file or row; the message names the file and, for a row, its line.

    >>> str(DatasetError("data/x.jsonl", 17, "field 'question' is missing"))
    "data/x.jsonl:17: field 'question' is missing"
    """

    def __init__(self, path: Path | str, line: int | None, reason: str):
        self.path, self.line, self.reason = Path(path), line, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keep the three fields when pickled (e.g. across worker processes)
        return type(self), (self.path, self.line, self.reason)
