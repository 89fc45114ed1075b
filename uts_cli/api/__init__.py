"""Library entry points, one per command: each takes a config and a Reporter, returns a result.

Nothing here prints or exits. Attributes load lazily (``api.teach`` imports torch only when first
used), so importing ``uts_cli.api`` is cheap.
"""
from __future__ import annotations

import importlib

_ENTRY_POINTS = {
    "prepare": "uts_cli.api.prepare",
    "normalize": "uts_cli.api.normalize",
    "teach": "uts_cli.api.teach",
    "distill": "uts_cli.api.distill",
    "evaluate": "uts_cli.api.evaluate",
    "demo": "uts_cli.api.demo",
    "predict": "uts_cli.api.predict",
}


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(name)


__all__ = list(_ENTRY_POINTS)
