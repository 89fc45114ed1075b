"""Dataset names -> readers; every reader returns a :class:`DatasetListing`.

Readers are imported when used, so listing the names costs nothing and the ``synthetic``
reader (its own module) is only needed when asked for.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from uts_cli.choices import DATASET_NAMES
from uts_cli.datasets.base import DatasetListing
from uts_cli.datasets.splits import apply_splits, read_splits_file
from uts_cli.errors import UsageError


_MODULES = {
    "TUPAC16": "uts_cli.datasets.tupac16",
    "MIDOG21": "uts_cli.datasets.midog21",
    "MITOS14": "uts_cli.datasets.mitos14",
    "CCMCT": "uts_cli.datasets.ccmct",
    "folder": "uts_cli.datasets.folder",
    "synthetic": "uts_cli.datasets.synthetic",
}

# The reader options ``uts prepare`` exposes, and the datasets whose reader takes each one. An
# option given for any other dataset is refused rather than silently dropped; a test keeps this
# table in step with the readers' signatures.
DATASET_OPTIONS: dict[str, tuple[str, ...]] = {
    "seed": ("synthetic",),
    "n_cases": ("synthetic",),
    "val_cases": ("synthetic",),
    "test_cases": ("synthetic",),
    "stain_spread": ("synthetic",),
    "nucleus_density": ("synthetic",),
    "lookalikes_per_field": ("synthetic",),
    "min_confidence": ("MITOS14",),
    "include_unlabelled": ("MIDOG21",),
    "labels": ("TUPAC16",),
    "annotations": ("folder", "MIDOG21", "CCMCT"),
}


def option_flag(option: str) -> str:
    """The command-line spelling of a reader option (``min_confidence`` -> ``--min-confidence``)."""
    return "--" + option.replace("_", "-")


def check_dataset_options(name: str, options: dict[str, object]) -> None:
    """Refuse reader options that the dataset ``name`` does not take.

    Args:
        name: a dataset name (any case).
        options: the reader options that were given (``None`` values count as not given).

    Raises:
        UsageError: an option of ``DATASET_OPTIONS`` given for a dataset that does not take it;
            the hint names the datasets that do.
    """
    canonical = canonical_name(name)
    for option in sorted(k for k, v in options.items() if v is not None):
        takers = DATASET_OPTIONS.get(option)
        if takers is not None and canonical not in takers:
            raise UsageError(f"{option_flag(option)} does not apply to dataset {canonical}",
                             hint=f"{option_flag(option)} is taken by: {', '.join(takers)}; "
                                  f"leave it out for {canonical}")


def canonical_name(name: str) -> str:
    """The spelling in ``DATASET_NAMES`` of a case-insensitive dataset name.

    Raises:
        UsageError: unknown name (the message lists the known ones).
    """
    for known in DATASET_NAMES:
        if known.lower() == name.strip().lower():
            return known
    raise UsageError(f"unknown dataset {name!r}", hint=f"choose one of: {', '.join(DATASET_NAMES)}")


def default_root(name: str) -> Path:
    """Default raw-data folder of a dataset: ``local_data/datasets/<NAME>`` (relative to cwd)."""
    return Path("local_data") / "datasets" / canonical_name(name)


def discover(
    name: str, root: str | Path | None = None, splits: str | Path | None = None, **options: object
) -> DatasetListing:
    """Scan a raw dataset folder with the reader for ``name``.

    Args:
        name: one of ``DATASET_NAMES`` (any case).
        root: the dataset folder; default :func:`default_root`.
        splits: optional ``case,split`` CSV applied after the reader's own rules (and after
            ``<root>/splits.csv``); an unknown case in it is an error.
        **options: reader options, e.g. ``annotations=``, ``labels=``, ``min_confidence=``,
            ``include_unlabelled=``; ``None`` means not given.

    Returns:
        The dataset listing.

    Raises:
        UsageError: unknown dataset name or an option the reader does not take.
        InputDataError: as raised by the reader (missing/malformed data).
    """
    canonical = canonical_name(name)
    check_dataset_options(canonical, options)
    options = {k: v for k, v in options.items() if v is not None}
    module = importlib.import_module(_MODULES[canonical])
    reader = module.discover
    _check_options(canonical, reader, options)
    listing = reader(Path(root) if root is not None else default_root(canonical), **options)
    if splits is not None:
        apply_splits(listing, read_splits_file(splits), strict=True, source=str(splits))
    return listing


def _check_options(name: str, reader: object, options: dict[str, object]) -> None:
    parameters = inspect.signature(reader).parameters  # type: ignore[arg-type]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [p for p in parameters if p != "root"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UsageError(
            f"dataset {name} does not take option(s) {', '.join(unknown)}",
            hint=f"{name} options: {', '.join(accepted) or 'none'}",
        )
