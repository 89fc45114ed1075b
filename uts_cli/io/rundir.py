"""The run directory written by ``teach``/``distill``: config, history, metrics, log, checkpoints.

Layout (DESIGN 2.3)::

    <run>/config.json  env.json  history.csv  metrics.json  log.txt
    <run>/checkpoints/last.pt  best.pt

Every file except ``log.txt`` is replaced atomically (temporary file + ``os.replace``), so a crash
never leaves half a checkpoint or half a CSV. Checkpoints hold only tensors and plain Python
values and load with ``torch.load(weights_only=True)``. torch is imported only by the checkpoint
helpers.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from uts_cli.choices import CHECKPOINT_NAMES
from uts_cli.config import SCHEMA_VERSION, check_schema_version
from uts_cli.errors import InputDataError, UsageError, first_line, resource_error
from uts_cli.io.atomic import atomic_write, atomic_write_json, atomic_write_text

HISTORY_FIELDS = (
    "epoch", "train_loss", "loss_ce", "loss_location", "val_loss", "val_f1", "val_precision",
    "val_recall", "threshold", "val_loc_f1", "val_loc_precision", "val_loc_recall", "val_loc_threshold",
    "lr", "seconds", "train_seconds", "samples_per_s",
    "n_train_samples", "timestamp",
)
# Entries a run directory may hold; --overwrite deletes a folder only if it looks like a run.
RUN_ENTRIES = {"config.json", "env.json", "history.csv", "history.png", "metrics.json", "log.txt",
               "checkpoints", "distill", "eval", "predictions", "plots"}


def resolve_run(name_or_path: str | os.PathLike, runs_dir: str | os.PathLike) -> Path:
    """Where a run lives: a name is a folder of ``runs_dir``; a path (with a separator) is taken as is."""
    text = str(name_or_path)
    if "/" in text or os.sep in text or Path(text).is_absolute():
        return Path(text)
    return Path(runs_dir) / text


def check_run_name(name: str) -> None:
    """Refuse a run name that is not a single plain folder name.

    Raises:
        UsageError: empty, hidden, or holding a path separator or white space.
    """
    if not name or name.startswith(".") or any(c in name for c in "/\\ \t\n"):
        raise UsageError(f"invalid run name {name!r}", hint="use letters, digits, '-', '_' or '.'")


def collect_env(device: Any = None) -> dict:
    """The software and hardware a run ran on, for ``env.json`` (imports torch).

    Args:
        device: the resolved ``torch.device`` (its GPU is named when it is a CUDA device).
    """
    import platform
    import socket

    import torch

    def version(module: str) -> str | None:
        try:
            from importlib.metadata import version as _v

            return _v(module)
        except Exception:  # not installed
            return None

    from uts_cli import __version__

    cuda = torch.cuda.is_available()
    gpu = None
    if cuda and (device is None or getattr(device, "type", "") == "cuda"):
        index = getattr(device, "index", None)
        gpu = torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())
    return {
        "uts": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "torchstain": version("torchstain"),
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": gpu,
        "device": None if device is None else str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "recorded_at": _now(),
    }


class RunLogReporter:
    """A reporter that also writes what the run reports at INFO into the run's ``log.txt``.

    Lines (``log``), warnings and the end of each progress phase go to the file; per-step
    progress does not. Everything is forwarded to ``inner`` unchanged.
    """

    def __init__(self, inner: Any, run: "RunDir"):
        self.inner = inner
        self.run = run
        self._phase: tuple[str, int | None, int] | None = None

    def start(self, description: str, total: int | None) -> None:
        self._phase = (description, total, 0)
        self.inner.start(description, total)

    def advance(self, n: int = 1, **metrics: float) -> None:
        if self._phase is not None:
            desc, total, done = self._phase
            self._phase = (desc, total, done + n)
        self.inner.advance(n, **metrics)

    def finish(self) -> None:
        if self._phase is not None:
            desc, total, done = self._phase
            self.run.log(f"{desc}: {done}/{total}" if total else f"{desc}: {done}")
            self._phase = None
        self.inner.finish()

    def log(self, message: str) -> None:
        self.run.log(message)
        self.inner.log(message)

    def warn(self, message: str) -> None:
        self.run.log(f"WARNING: {message}")
        self.inner.warn(message)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _parse(field: str, value: str) -> Any:
    if value == "":
        return None
    if field == "timestamp":
        return value
    if field in ("epoch", "n_train_samples"):
        return int(float(value))
    return float(value)


class RunDir:
    """A run directory; nothing touches the disk until :meth:`create` or :meth:`open_existing`.

    Args:
        path: the directory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -- paths -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def env_path(self) -> Path:
        return self.path / "env.json"

    @property
    def history_path(self) -> Path:
        return self.path / "history.csv"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_path(self, name: str) -> Path:
        """Path of checkpoint ``name`` (``"last"`` or ``"best"``)."""
        if name not in CHECKPOINT_NAMES:
            raise UsageError(f"unknown checkpoint {name!r}", hint=f"use one of {', '.join(CHECKPOINT_NAMES)}")
        return self.checkpoint_dir / f"{name}.pt"

    # -- lifecycle ---------------------------------------------------------------------------
    def _is_nonempty_dir(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def _looks_like_run(self) -> bool:
        names = {p.name for p in self.path.iterdir() if not p.name.startswith(".")}
        return "config.json" in names or names <= RUN_ENTRIES

    def create(self, overwrite: bool = False) -> "RunDir":
        """Create a fresh run directory.

        Args:
            overwrite: delete an existing run in the same place first.

        Returns:
            self.

        Raises:
            UsageError: the directory exists and is not empty (without ``overwrite``), it is not a
                directory, or ``overwrite`` would delete a folder that is not a uts run.
        """
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"run directory path is a file: {self.path}",
                             hint="choose another --name or --runs-dir")
        if self._is_nonempty_dir():
            if not overwrite:
                raise UsageError(f"run directory exists and is not empty: {self.path}",
                                 hint="pass --resume to continue it, --overwrite to replace it, "
                                      "or choose another --name")
            if not self._looks_like_run():
                raise UsageError(f"refusing to overwrite {self.path}: it does not look like a uts run "
                                 "directory", hint="choose another --name or --runs-dir")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def restart(self) -> "RunDir":
        """Start afresh in a run folder that holds no checkpoint yet (a run killed early).

        Files already there are kept (the config is rewritten by the new start); history rows
        are dropped, since one may have been written just before the kill.

        Raises:
            UsageError: the path is a file, or a non-empty folder that is not a uts run.
        """
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"run directory path is a file: {self.path}", hint="choose another --name")
        if self._is_nonempty_dir() and not self._looks_like_run():
            raise UsageError(f"{self.path} is not empty and does not look like a uts run directory",
                             hint="choose another --name or --runs-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        self.truncate_history(0)
        return self

    def open_existing(self) -> "RunDir":
        """Open a run written before (for resume, eval, distill or predict).

        Raises:
            InputDataError: the directory or its ``config.json`` is missing.
        """
        if not self.path.is_dir():
            raise InputDataError(f"run directory not found: {self.path}",
                                 hint="check the run name and --runs-dir (runs are folders made by `uts teach` or `uts distill`)")
        if not self.config_path.is_file():
            raise InputDataError(f"not a uts run (no config.json): {self.path}",
                                 hint="pass the directory `uts teach` wrote, or start a new run")
        return self

    # -- JSON files --------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        # A run written by a newer uts may mean something this one would misread: readers refuse it.
        atomic_write_json(self.config_path, {"schema_version": SCHEMA_VERSION, **config})

    def read_config(self) -> dict:
        """The run's ``config.json``.

        Raises:
            InputDataError: missing, unreadable, or written by a newer uts (``schema_version``).
        """
        config = self._read_json(self.config_path, "config")
        if not isinstance(config, dict):
            raise InputDataError(f"{self.config_path} is not a JSON object",
                                 hint="the run directory is damaged; rerun with --overwrite")
        check_schema_version(config, self.config_path)
        return config

    def write_env(self, env: dict) -> None:
        atomic_write_json(self.env_path, env)

    def add_resumed_env(self, env: dict) -> None:
        """Record the software and machine of a resumed session beside the run's first one.

        ``env.json`` keeps what the run started on; each resume appends to its ``resumed`` list, so
        a run trained partly on another machine or torch version says so. An unreadable or missing
        ``env.json`` (older runs) is replaced by this session's, as before.
        """
        try:
            first = json.loads(self.env_path.read_text())
        except (OSError, ValueError):
            first = None
        if not isinstance(first, dict):
            self.write_env(env)
            return
        first["resumed"] = [*first.get("resumed", []), env]
        atomic_write_json(self.env_path, first)

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.metrics_path, metrics)

    def read_metrics(self) -> dict:
        return self._read_json(self.metrics_path, "metrics")

    def _read_json(self, path: Path, what: str) -> dict:
        if not path.is_file():
            raise InputDataError(f"run has no {path.name}: {self.path}",
                                 hint=f"the run's {what} is written by `uts teach`; rerun it")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputDataError(f"cannot read {path}: {exc}", hint="the run directory is damaged; "
                                 "rerun with --overwrite") from None

    # -- history -----------------------------------------------------------------------------
    def read_history(self) -> list[dict]:
        """History rows (numbers parsed; empty cells are None). No file gives an empty list."""
        if not self.history_path.is_file():
            return []
        with open(self.history_path, newline="", encoding="utf-8") as f:
            return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]

    def _write_history(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            unknown = set(row) - set(HISTORY_FIELDS)
            if unknown:
                raise ValueError(f"unknown history fields: {sorted(unknown)}")
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in HISTORY_FIELDS})
        atomic_write_text(self.history_path, buf.getvalue())

    def append_history(self, row: dict) -> None:
        """Add one epoch row (the file is rewritten atomically; ``timestamp`` filled if absent)."""
        row = dict(row)
        row.setdefault("timestamp", _now())
        self._write_history(self.read_history() + [row])

    def truncate_history(self, last_epoch: int) -> int:
        """Keep rows with ``epoch <= last_epoch`` (resume); returns the number of rows kept."""
        rows = [r for r in self.read_history() if r["epoch"] is not None and r["epoch"] <= last_epoch]
        if self.history_path.is_file():
            self._write_history(rows)
        return len(rows)

    # -- log ---------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """Append a timestamped plain-text line to ``log.txt``."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(f"{_now()} {message}\n")
        except OSError as exc:
            raise resource_error(exc, self.log_path) or exc

    # -- checkpoints -------------------------------------------------------------------------
    def has_checkpoint(self, name: str) -> bool:
        return self.checkpoint_path(name).is_file()

    def save_checkpoint(self, name: str, state: dict) -> Path:
        """Write checkpoint ``name`` atomically; ``state`` must be tensors and plain values only."""
        import torch

        path = self.checkpoint_path(name)
        atomic_write(path, lambda f: torch.save(state, f))
        return path

    def load_checkpoint(self, name: str, map_location: Any = "cpu") -> dict:
        """Load checkpoint ``name`` with ``weights_only=True``.

        Raises:
            InputDataError: the run or the checkpoint is missing or unreadable.
        """
        import torch

        path = self.checkpoint_path(name)
        if not path.is_file():
            if not self.path.is_dir():
                raise InputDataError(f"run directory not found: {self.path}",
                                     hint="check the run name and --runs-dir (runs are folders made by `uts teach`)")
            raise InputDataError(f"checkpoint not found: {path}",
                                 hint="the run has not finished an epoch yet; train it with "
                                      "`uts teach` (or continue it with --resume)")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ...
            raise InputDataError(f"cannot load checkpoint {path}: {type(exc).__name__}: {first_line(exc)}",
                                 hint="the file is damaged or not a uts checkpoint; retrain the run") from None
        if not isinstance(state, dict) or state.get("format") != "uts-checkpoint":
            raise InputDataError(f"not a uts checkpoint: {path}", hint="retrain the run with `uts teach`")
        return state
