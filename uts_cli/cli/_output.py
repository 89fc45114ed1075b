"""Everything the CLI shows: consoles, progress, JSON results, and error handling.

Results go to stdout (a human summary, or exactly one JSON object with ``--json``); progress,
logs, warnings and errors go to stderr, so ``uts ... --json | jq`` always works.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from uts_cli.errors import Interrupted, UtsError, first_line, resource_error

log = logging.getLogger("uts")


@dataclass
class OutputState:
    quiet: bool = False
    verbose: int = 0
    debug: bool = False
    no_color: bool = False


STATE = OutputState()


def err_console() -> Console:
    return Console(stderr=True, no_color=STATE.no_color or None, highlight=False)


def out_console() -> Console:
    return Console(no_color=STATE.no_color or None, highlight=False)


def setup_logging() -> None:
    level = logging.WARNING if STATE.quiet else (logging.DEBUG if STATE.verbose > 1 else logging.INFO)
    logger = logging.getLogger("uts")
    logger.setLevel(level)
    for h in list(logger.handlers):
        if getattr(h, "_uts_console", False):
            logger.removeHandler(h)
    console = err_console()
    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False,
                                               show_time=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler._uts_console = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


class CliReporter:
    """Reporter that draws a rich progress bar on a terminal and prints plain lines elsewhere.

    Off a terminal (CI, cluster logs, pipes) it logs one line per 10% of a phase, or per step
    when the phase has few steps (training epochs), so logs still show progress.
    """

    def __init__(self, console: Console | None = None):
        self.console = console or err_console()
        self.interactive = self.console.is_interactive and not STATE.quiet
        self._progress: Progress | None = None
        self._task = None
        self._desc = ""
        self._total: int | None = None
        self._done = 0
        self._next_line = 0
        self._t0 = 0.0
        self._metrics: dict[str, float] = {}

    def start(self, description: str, total: int | None) -> None:
        self.finish()
        self._desc, self._total, self._done, self._t0 = description, total, 0, time.monotonic()
        self._next_line = 0
        self._metrics = {}
        if self.interactive:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(description, total=total, metrics="")

    def advance(self, n: int = 1, **metrics: float) -> None:
        self._done += n
        self._metrics.update(metrics)
        text = "  ".join(f"{k} {v:.4g}" for k, v in self._metrics.items())
        if self._progress is not None:
            self._progress.update(self._task, advance=n, metrics=text)
            return
        if STATE.quiet:
            return
        total = self._total or 0
        step = max(1, total // 10) if total else 50
        if self._done >= self._next_line or (total and self._done >= total):
            self._next_line = self._done + step
            pct = f" ({100 * self._done / total:.0f}%)" if total else ""
            of = f"/{total}" if total else ""
            rate = self._done / max(time.monotonic() - self._t0, 1e-9)
            log.info(f"{self._desc}: {self._done}{of}{pct}, {rate:.1f}/s {text}".rstrip())

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            if not STATE.quiet and self._total:
                elapsed = time.monotonic() - self._t0
                log.info(f"{self._desc}: {self._done}/{self._total} in {elapsed:.1f}s")

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            log.info(message)

    def warn(self, message: str) -> None:
        log.warning(message)


def emit_json(payload: dict[str, Any]) -> None:
    # Plain print, never through rich: no wrapping and no colour codes in machine output.
    print(json.dumps(payload, sort_keys=True, default=str))


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, str(value))
    out_console().print(table)


def _silent_rank(exc: UtsError) -> bool:
    """Under torchrun, ranks other than 0 leave the shared errors to rank 0.

    Usage and input errors (and interruptions) are the same on every rank; resource errors
    (this rank's GPU, a lost partner) and internal errors are each rank's own and are shown.
    """
    rank = os.environ.get("RANK", "0")
    if rank in ("", "0") or os.environ.get("WORLD_SIZE", "1") == "1":
        return False
    if getattr(exc, "mirrored", False):
        return True
    return exc.exit_code in (2, 3, 130)


def _report_error(command: str, exc: UtsError, as_json: bool) -> None:
    if _silent_rank(exc):
        return
    rank = os.environ.get("RANK")
    if rank not in (None, "", "0") and os.environ.get("WORLD_SIZE", "1") != "1":
        exc = type(exc)(f"rank {rank}: {exc.message}", hint=exc.hint)
    from rich.markup import escape

    console = err_console()
    # Messages quote paths and library errors, which may hold "[...]" (gloo's "[.../pair.cc:545]").
    console.print(f"[bold red]Error:[/] {escape(exc.message)}", markup=True, highlight=False, soft_wrap=True)
    if exc.hint:
        console.print(f"[bold]Hint:[/] {escape(exc.hint)}", markup=True, highlight=False, soft_wrap=True)
    if as_json:
        emit_json({"ok": False, "command": command,
                   "error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint,
                             "exit_code": exc.exit_code}})


# What continues an interrupted command: training commands need --resume, the store writers
# pick up their partial output by themselves.
INTERRUPT_HINTS = {
    "teach": "rerun the same command with --resume to continue",
    "distill": "rerun the same command with --resume to continue",
    "prepare": "rerun the same command to resume",
    "normalize": "rerun the same command to resume",
}


def cli_errors(command: str) -> Callable:
    """Decorator for commands: UtsError -> message + hint on stderr (JSON on stdout) + exit code.

    Ctrl-C becomes exit 130 (the hint says how to continue); a full disk and an accelerator out
    of memory become resource errors (exit 4); any other exception is a bug: exit 1 with a
    one-line message, and the traceback only with ``--debug`` or ``UTS_DEBUG=1``.
    """

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            as_json = bool(kwargs.get("json_output", False))
            setup_logging()
            try:
                return fn(*args, **kwargs)
            except typer.Exit:
                raise
            except UtsError as exc:
                _report_error(command, exc, as_json)
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                hint = INTERRUPT_HINTS.get(command, "rerun the same command")
                _report_error(command, Interrupted("interrupted", hint=hint), as_json)
                raise typer.Exit(130) from None
            except Exception as exc:
                mapped = resource_error(exc)
                if mapped is not None:
                    _report_error(command, mapped, as_json)
                    raise typer.Exit(mapped.exit_code) from None
                # Anything else is a bug: keep the shell output short unless debugging.
                if STATE.debug or os.environ.get("UTS_DEBUG") == "1":
                    raise
                _report_error(command, UtsError(f"internal error: {type(exc).__name__}: {first_line(exc)}",
                                                hint="rerun with --debug for a traceback and report it"),
                              as_json)
                raise typer.Exit(1) from None

        return wrapper

    return deco
