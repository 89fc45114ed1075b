"""Error types that carry an exit code and a hint for the user (stdlib only)."""
from __future__ import annotations


class UtsError(Exception):
    """Base class for errors the CLI reports as one line plus a hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(UtsError):
    """Bad option, invalid combination, or an output that exists already (exit 2)."""

    exit_code = 2


class InputDataError(UtsError):
    """Unreadable, corrupt, malformed or incompatible input data (exit 3)."""

    exit_code = 3


class ResourceError(UtsError):
    """The environment cannot do what was asked: no CUDA, out of memory, disk full (exit 4)."""

    exit_code = 4


class Interrupted(UtsError):
    """The user interrupted the work; partial state was saved where possible (exit 130)."""

    exit_code = 130


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug; rerun with --debug for a traceback)",
    2: "usage error (bad option, existing output without --overwrite/--resume)",
    3: "input data error (missing/corrupt/malformed data, wrong or incomplete store)",
    4: "resource error (CUDA unavailable, out of memory, disk full)",
    130: "interrupted (Ctrl-C); rerun the same command to resume",
}
