"""The help a user reads: no value placeholders after flags, and examples that run as written."""
from __future__ import annotations

import shlex

import pytest
import typer.main
from typer.testing import CliRunner

from uts_cli.cli.app import app

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "200"}
runner = CliRunner()
COMMAND = typer.main.get_command(app)
# Examples build on each other's outputs; commands not listed here (added later) run before demo.
ORDER = ["prepare", "normalize", "teach", "distill", "eval", "predict"]


def _help(args: list[str], **env: str) -> str:
    r = runner.invoke(app, [*args, "--help"], env={**ENV, **env})
    assert r.exit_code == 0, r.output
    return r.stdout


@pytest.mark.parametrize("args", [[]] + [[name] for name in sorted(COMMAND.commands)])
@pytest.mark.parametrize("rich", ["1", "0"])
def test_flags_show_no_value_placeholder(args, rich):
    text = _help(args, TYPER_USE_RICH=rich)
    assert "<bool>" not in text
    assert "--help" in text
    if not args:
        verbose = next(line for line in text.splitlines() if "--verbose" in line)
        assert "<int>" not in verbose and "INTEGER" not in verbose


def _examples(name: str) -> list[str]:
    epilog = COMMAND.commands[name].epilog or ""
    return [line.strip() for line in epilog.splitlines() if line.strip().startswith("uts ")]


@pytest.mark.parametrize("name", sorted(COMMAND.commands))
def test_every_command_has_examples_shown_in_its_help(name):
    examples = _examples(name)
    assert examples, f"uts {name} --help has no examples"
    flat = " ".join(_help([name]).split())
    for line in examples:
        assert line in flat, line


def _chain() -> list[str]:
    names = sorted(COMMAND.commands, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER),
                                                   n == "demo", n))
    return [line for name in names for line in _examples(name)]


@pytest.mark.slow  # minutes (26 on 2 cores shared with other jobs): prepare and demo render data, 7 runs train
def test_help_examples_run_as_written(tmp_path, monkeypatch):
    """Every example of every command, in pipeline order, in one empty folder, unchanged."""
    monkeypatch.chdir(tmp_path)
    for line in _chain():
        words = shlex.split(line)
        assert words[0] == "uts"
        r = runner.invoke(app, words[1:], env=ENV)
        assert r.exit_code == 0, f"{line}\n{r.stderr}"
        if "--json" in words:
            import json

            assert json.loads(r.stdout)["ok"] is True
