"""Every option that a message, hint or help text names exists on some command."""
import re
from pathlib import Path

import typer.main

from uts_cli.cli.app import app

SRC = Path(__file__).resolve().parents[2] / "uts_cli"


def _all_options() -> set[str]:
    root = typer.main.get_command(app)
    names: set[str] = {"--help"}
    for command in [root, *root.commands.values()]:
        for param in command.params:
            names.update(getattr(param, "opts", []))
            names.update(getattr(param, "secondary_opts", []))
    return names


def test_every_option_named_in_the_source_exists():
    known = _all_options()
    named: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", path.read_text(encoding="utf-8")):
            named.setdefault(flag, set()).add(path.relative_to(SRC).as_posix())
    # torchrun's own options, named where uts explains how to launch several processes.
    launcher = {"--nproc-per-node", "--rdzv-endpoint", "--nnodes", "--standalone"}
    unknown = {flag: sorted(where) for flag, where in named.items() if flag not in known | launcher}
    assert not unknown, f"options named but not defined: {unknown}"
    assert "--runs-dir" in named and "--run-dir" not in named
