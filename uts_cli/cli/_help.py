"""Help rendering tweaks shared by the root group and every command.

Typer 0.29 shows a type placeholder after every option, including ``<bool>`` after on/off flags
and ``<int>`` after counted options such as ``-v``, which take no value at all. Such options get
an empty metavar here, so the help shows only what a user actually types.
"""
from __future__ import annotations

import typer.core


def _no_value_placeholders(params: list) -> list:
    for param in params:
        takes_no_value = getattr(param, "is_flag", False) or getattr(param, "count", False)
        if isinstance(param, typer.core.TyperOption) and takes_no_value and param.metavar is None:
            param.metavar = ""
    return params


class Command(typer.core.TyperCommand):
    """A command whose flags show no value placeholder in ``--help``."""

    def get_params(self, ctx):  # noqa: D102 - Click's own method, same contract
        return _no_value_placeholders(super().get_params(ctx))


class Group(typer.core.TyperGroup):
    """The root group, with the same help rendering as :class:`Command`."""

    def get_params(self, ctx):  # noqa: D102 - Click's own method, same contract
        return _no_value_placeholders(super().get_params(ctx))
