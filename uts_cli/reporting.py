"""How library code reports progress without printing (stdlib only).

Library functions take a ``Reporter``; the CLI passes one that draws rich progress bars,
notebooks and tests get ``NullReporter``.
"""
from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger("uts")


class Reporter(Protocol):
    def start(self, description: str, total: int | None) -> None:
        """Begin a phase of work with ``total`` steps (None when unknown)."""

    def advance(self, n: int = 1, **metrics: float) -> None:
        """Mark ``n`` steps done; ``metrics`` (loss, f1, ...) may be shown beside the bar."""

    def finish(self) -> None:
        """End the current phase."""

    def log(self, message: str) -> None:
        """An informational line."""

    def warn(self, message: str) -> None:
        """A warning the user should see."""


class NullReporter:
    """Reporter that sends messages to the ``uts`` logger and draws nothing."""

    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1, **metrics: float) -> None:
        pass

    def finish(self) -> None:
        pass

    def log(self, message: str) -> None:
        log.info(message)

    def warn(self, message: str) -> None:
        log.warning(message)
