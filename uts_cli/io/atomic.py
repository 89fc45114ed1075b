"""Atomic file writes: write a temporary file beside the target, then rename (stdlib only).

A reader never sees a half-written file: ``os.replace`` is atomic on one filesystem, which is
why the temporary file lives in the target's own directory. A write that fails for lack of disk
space becomes a :class:`~uts_cli.errors.ResourceError` naming the target (exit 4 in the CLI).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from uts_cli.errors import resource_error


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(fileobj)`` on a temporary file and move it onto ``path`` when it returns.

    Raises:
        ResourceError: the disk (or quota) is full; nothing is left behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise resource_error(exc, path) or exc
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        mapped = resource_error(exc, path) if isinstance(exc, OSError) else None
        if mapped is not None:
            raise mapped from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
