"""Frozen configuration records for each command, serialisable to JSON (stdlib only).

A config holds everything needed to repeat a command; stores and runs embed theirs, which is how
``prepare``/``normalize`` detect that a partial output was made with other settings, and how
``distill``/``eval`` inherit a teacher's settings.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-safe dict of a config dataclass (paths become strings)."""

    def conv(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


@dataclass(frozen=True)
class PrepareConfig:
    dataset: str
    root: Path | None = None            # None: ./local_data/datasets/<dataset>
    output: Path | None = None          # None: ./local_data/stores/<dataset>-p<patch>.h5
    patch_size: int = 500
    compression: str = "gzip"
    splits_file: Path | None = None
    min_tissue: float | None = None     # None: 0 for fields, 0.2 for whole slides
    overwrite: bool = False
    dataset_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NormalizeConfig:
    store: Path
    output: Path | None = None          # None: <store stem>-norm.h5 beside the input
    reference: Path | None = None       # an image file; None: choose a field from the store
    reference_image_id: str | None = None
    hist_match: bool = True
    macenko: bool = True
    io: float = 240.0
    alpha: float = 1.0
    beta: float = 0.15
    batch_size: int = 16
    device: str = "auto"
    compression: str | None = None      # None: same as the input store
    overwrite: bool = False
