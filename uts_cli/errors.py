"""Error types that carry an exit code and a hint for the user (stdlib only)."""
from __future__ import annotations

import errno
import functools
import os


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


# errno values that mean "no room left": a full disk, or a user/group quota used up.
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
OOM_HINT = "use a smaller --batch-size (or --device cpu)"


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` is a write that failed for lack of disk space or quota.

    h5py reports HDF5 write failures as an ``OSError`` whose errno is unset and whose text
    carries the C library's message, hence the text test.
    """
    if not isinstance(exc, OSError):
        return False
    if exc.errno in _NO_SPACE:
        return True
    text = str(exc)
    return any(os.strerror(code) in text for code in _NO_SPACE) or "errno = 28" in text


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message ("" when it has none): library errors can span many
    lines, and the command line reports one."""
    text = str(exc)
    return text.splitlines()[0] if text else ""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an accelerator out-of-memory error (``torch.OutOfMemoryError`` or its text form)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def resource_error(exc: BaseException, path: str | os.PathLike | None = None) -> ResourceError | None:
    """The :class:`ResourceError` that a disk-full or out-of-memory exception stands for, else None.

    Args:
        exc: the exception caught.
        path: the file being written, when the caller knows it better than ``exc.filename``.
    """
    if is_disk_full(exc):
        where = path if path is not None else getattr(exc, "filename", None)
        place = f" while writing {where}" if where else ""
        target = f"the filesystem holding {where}" if where else "the output filesystem"
        return ResourceError(f"disk full (no space or quota left){place}",
                             hint=f"free space on {target} (or write the output elsewhere) and rerun")
    if is_out_of_memory(exc):
        first = first_line(exc) or type(exc).__name__
        return ResourceError(f"out of accelerator memory: {first[:160]}", hint=OOM_HINT)
    return None


def library_errors(fn):
    """Make a library entry point raise :class:`ResourceError` for a full disk or an accelerator
    out of memory, as the command line reports them, instead of torch's or h5py's own exception."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UtsError:
            raise
        except Exception as exc:
            mapped = resource_error(exc)
            if mapped is None:
                raise
            raise mapped from exc

    return wrapper


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug; rerun with --debug for a traceback)",
    2: "usage error (bad option, existing output without --overwrite/--resume)",
    3: "input data error (missing/corrupt/malformed data, wrong or incomplete store)",
    4: "resource error (CUDA unavailable, out of memory, disk full)",
    130: "interrupted (Ctrl-C); rerun the same command to resume",
}
