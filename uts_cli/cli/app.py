"""The ``uts`` command: root options and command registration.

Command modules are imported here, but they import torch and the numeric code only inside the
command bodies, so ``uts --help`` and TAB completion stay instant.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Annotated

import typer

from uts_cli.cli import _help, _output
from uts_cli.errors import EXIT_CODES

EPILOG = "Exit codes: " + "; ".join(f"{code} {text.split(' (')[0]}" for code, text in EXIT_CODES.items())

app = typer.Typer(
    name="uts",
    cls=_help.Group,
    help="Uninformed Teacher-Student (UTS) mitosis localization in H&E images.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if not value:
        return
    from uts_cli import __version__

    try:
        import torch

        torch_text = f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}"
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_text = "torch missing"
    typer.echo(f"uts {__version__} (Python {platform.python_version()}, {torch_text})")
    raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Show the version and exit.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of internal errors.",
                                        envvar="UTS_DEBUG")] = False,
    no_color: Annotated[bool, typer.Option("--no-color", help="No colour in output.")] = False,
) -> None:
    """Uninformed Teacher-Student (UTS) mitosis localization in H&E images."""
    _output.STATE.quiet = quiet
    _output.STATE.verbose = verbose
    _output.STATE.debug = debug
    _output.STATE.no_color = no_color or bool(os.environ.get("NO_COLOR"))


def _register() -> None:
    from uts_cli.cli import demo, distill, evaluate, normalize, predict, prepare, teach

    for name, module, fn in (("prepare", prepare, prepare.prepare_cmd),
                             ("normalize", normalize, normalize.normalize_cmd),
                             ("teach", teach, teach.teach_cmd),
                             ("distill", distill, distill.distill_cmd),
                             # "eval" shadows a builtin, hence the module and function names.
                             ("eval", evaluate, evaluate.eval_cmd),
                             ("predict", predict, predict.predict_cmd),
                             ("demo", demo, demo.demo_cmd)):
        app.command(name, cls=_help.Command, epilog=module.EXAMPLES + "\n\n" + EPILOG)(fn)


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="uts")
    except KeyboardInterrupt:  # pragma: no cover - interrupted outside a command body
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
