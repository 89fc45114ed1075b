"""Every option of every command reaches the config the command hands to the API.

The test reads the options from the Click command objects Typer builds, so a command or option
added later is walked too. For each option it runs the command twice with the API function
replaced by a recorder: once with the defaults, once with that option set to a non-default value,
and requires the two configs to differ. An option that is accepted and then dropped fails here.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import typing
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from conftest import write_tiny_store
from uts_cli.cli.app import app

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()

# Options that shape only what is printed, not what is computed: their effect is tested elsewhere
# (test_app.py: --json output). The root options (-v, -q, --debug, --no-color, --version) belong to
# the app callback, not to a command, so the walk does not see them; they set the console state.
EXEMPT = {"json_output", "help"}
# Command name -> API module where it differs from the command name.
API_MODULE = {"eval": "evaluate"}
# Options that only apply to some datasets: walk them with a dataset that takes them.
PREPARE_DATASET = {"seed": "synthetic", "n_cases": "synthetic", "val_cases": "synthetic", "test_cases": "synthetic",
                   "stain_spread": "synthetic", "nucleus_density": "synthetic", "lookalikes_per_field": "synthetic",
                   "min_confidence": "MITOS14", "include_unlabelled": "MIDOG21",
                   "labels": "TUPAC16", "annotations": "folder"}

COMMAND = typer.main.get_command(app)


def _walk():
    for name, cmd in sorted(COMMAND.commands.items()):
        for param in cmd.params:
            if isinstance(param, typer.core.TyperOption) and param.name not in EXEMPT:
                yield name, param.name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the options point at; read only (the API is replaced, so nothing is written)."""
    tmp_path = tmp_path_factory.mktemp("walk")
    store = write_tiny_store(tmp_path / "s.h5", n_images=3)
    (tmp_path / "dir").mkdir()
    csv = tmp_path / "x.csv"
    csv.write_text("case,split\n")
    ref = tmp_path / "ref.tif"
    ref.write_bytes(b"")
    return {"store": store, "dir": tmp_path / "dir", "csv": csv, "ref": ref, "tmp": tmp_path}


def _base(command: str, files: dict, option: str) -> tuple[list[str], dict[str, str]]:
    """Positional arguments and required options to run ``command`` at all."""
    if command == "prepare":
        return [PREPARE_DATASET.get(option, "folder")], {}
    if command in ("normalize", "teach", "predict"):
        req = {"teach": {"--name": "r"}, "predict": {"--run": "t"}}.get(command, {})
        return [str(files["store"])], req
    if command == "distill":
        return [], {"--teacher": "t", "--name": "s"}
    if command == "eval":
        return ["t"], {}
    return [], {}


def _hints(cmd) -> dict:
    fn = cmd.callback
    fn = getattr(fn, "__wrapped__", fn)
    return typing.get_type_hints(fn, include_extras=True)


def _base_type(hint):
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


# Values for options whose type alone does not say what a valid non-default is.
SPECIAL = {"device": "cpu", "weights": "none", "checkpoint": "last", "pixel_threshold": "localization",
           "teacher": "other-teacher", "name": "other-name", "reference_id": "c1/f0"}


def _value(param, hint, files) -> list[str]:
    """The command-line words that set ``param`` to something other than its default."""
    opt = param.opts[0]
    kind = _base_type(hint)
    default = param.default
    if getattr(param, "is_flag", False) and kind is bool:
        if param.secondary_opts and default:
            return [param.secondary_opts[0]]
        return [opt]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        current = default.value if isinstance(default, enum.Enum) else default
        choice = next(m.value for m in kind if m.value != current)
        return [opt, choice]
    if param.name in SPECIAL and SPECIAL[param.name] != default:
        return [opt, SPECIAL[param.name]]
    if kind is int:
        value = 2 if default is None else default + 1
        if getattr(param, "min", None) is not None and value < param.min:
            value = int(param.min)
        if getattr(param, "max", None) is not None and value > param.max:
            value = default - 1
        return [opt, str(value)]
    if kind is float:
        return [opt, str(0.5 if default is None else default + 0.25)]
    if kind is Path:
        if param.name in ("splits", "annotations"):
            return [opt, str(files["csv"])]
        if param.name in ("store", "like"):
            return [opt, str(files["store"])]
        if param.name == "reference":
            return [opt, str(files["ref"])]
        if param.name == "labels":
            return [opt, str(files["dir"])]
        if param.name == "root":
            return [opt, str(files["dir"])]
        return [opt, str(files["tmp"] / f"other-{param.name}")]
    if kind is str:
        return [opt, f"other-{param.name}"]
    raise AssertionError(f"the walk does not know how to set {opt} ({kind}); teach it")


def _config_for(command: str, argv: list[str], monkeypatch) -> object:
    module = importlib.import_module(f"uts_cli.api.{API_MODULE.get(command, command)}")
    seen = []

    def record(cfg, reporter=None, *args, **kwargs):
        seen.append(cfg)
        raise typer.Exit(0)

    fn_name = API_MODULE.get(command, command)
    assert hasattr(module, fn_name), f"uts_cli.api.{module.__name__} has no {fn_name}()"
    monkeypatch.setattr(module, fn_name, record)
    r = runner.invoke(app, [command, *argv], env=ENV)
    assert r.exit_code == 0 and seen, (argv, r.exit_code, r.stderr)
    return seen[0]


def _as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))


@pytest.mark.parametrize("command,option", list(_walk()))
def test_option_reaches_the_config(command, option, files, monkeypatch):
    monkeypatch.chdir(files["tmp"])
    cmd = COMMAND.commands[command]
    param = next(p for p in cmd.params if p.name == option)
    positional, required = _base(command, files, option)
    words = _value(param, _hints(cmd)[option], files)
    if command == "prepare" and option != "root":
        required = {**required, "--root": str(files["dir"])}
    base = positional + [w for kv in required.items() for w in kv]
    changed = dict(required)
    if words[0] in changed:  # a required option: change its value instead of adding it
        changed[words[0]] = words[1]
        argv = positional + [w for kv in changed.items() for w in kv]
    else:
        argv = base + words
    default_cfg = _as_dict(_config_for(command, base, monkeypatch))
    new_cfg = _as_dict(_config_for(command, argv, monkeypatch))
    assert new_cfg != default_cfg, f"uts {command} {' '.join(words)} was accepted and then ignored"


def test_the_walk_covers_every_command():
    walked = {c for c, _ in _walk()}
    assert walked == set(COMMAND.commands), set(COMMAND.commands) - walked


@pytest.mark.parametrize("option", sorted(PREPARE_DATASET))
def test_prepare_refuses_a_dataset_option_its_dataset_does_not_take(option, files, monkeypatch):
    """Given to a dataset that has no use for it, a dataset option is a usage error, not dropped."""
    monkeypatch.chdir(files["tmp"])
    cmd = COMMAND.commands["prepare"]
    param = next(p for p in cmd.params if p.name == option)
    from uts_cli.datasets.registry import DATASET_OPTIONS

    other = next(d for d in ("TUPAC16", "MITOS14", "synthetic") if d not in DATASET_OPTIONS[option])
    words = _value(param, _hints(cmd)[option], files)
    r = runner.invoke(app, ["prepare", other, "--root", str(files["dir"]), *words], env=ENV)
    assert r.exit_code == 2, r.stderr
    assert param.opts[0] in r.stderr
