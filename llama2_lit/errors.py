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


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after saving a checkpoint; the entry point exits with ``exit_code``
    (75, see ``callbacks/preemption.py``) and the same command with ``ckpt_path=last`` resumes."""

    def __init__(self, message: str, exit_code: int = 75):
        super().__init__(message)
        self.exit_code = exit_code
