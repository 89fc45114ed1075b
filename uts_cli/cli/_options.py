"""Options shared by several commands (Annotated aliases, so each is defined once)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from uts_cli.choices import DEVICE_KEYWORDS, is_device


def choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A ``str`` Enum of ``values`` for a Typer option (member names: values with '-' as '_').

    The CLI's choices are generated from ``uts_cli.choices`` so the library and ``--help`` never
    disagree on what is allowed.
    """
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str, module=__name__)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for scripts).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="auto, cpu, cuda or cuda:N (auto picks CUDA when available).",
    callback=lambda v: _check_device(v))]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Data-loading worker processes.")]
StoreArg = Annotated[Path, typer.Argument(
    help="Patch store (.h5) written by `uts prepare` or `uts normalize`.",
    exists=True, dir_okay=False, readable=True, resolve_path=True)]
OptionalPath = Optional[Path]


def _check_device(value: str) -> str:
    v = value.strip().lower()
    if is_device(v):
        return v
    raise typer.BadParameter(f"{value!r} is not a device; use {', '.join(DEVICE_KEYWORDS)} or cuda:N")
