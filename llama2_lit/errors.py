"""User-facing errors: raised for bad input, printed as one line by the entry point (no traceback)."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's config or data. The entry point prints ``str(err)`` and exits 2."""


class DataError(UserError):
    """A bad record: names the file, the 1-based line (or row) and the field."""

    def __init__(self, path: str | None, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = path, line, field, message
        where = str(path) if path is not None else "<data>"
        if line is not None:
            where += f":{line}"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")
