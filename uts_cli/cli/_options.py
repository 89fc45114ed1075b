"""Options shared by several commands (Annotated aliases, so each is defined once)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

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
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
