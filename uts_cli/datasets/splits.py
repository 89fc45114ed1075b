"""Train/val/test splits by case: a splits file overrides each dataset's default rule.

A splits file is a CSV with a header line ``case,split`` and one line per case, the split
being ``train``, ``val`` or ``test``. Every dataset reader applies ``<root>/splits.csv`` when
it exists (:func:`apply_root_splits`); ``uts prepare --splits FILE`` applies another one.

Cases not named in a file keep their default split. Numeric case ids match regardless of
leading zeros (``1`` names TUPAC16 case ``01``).
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from uts_cli.choices import SPLITS
from uts_cli.datasets.base import DatasetListing
from uts_cli.errors import InputDataError

ROOT_SPLITS_FILE = "splits.csv"


def read_splits_file(path: str | Path) -> dict[str, str]:
    """Read a ``case,split`` CSV.

    Args:
        path: the CSV file; its first line is the header ``case,split``.

    Returns:
        case id -> split name.

    Raises:
        InputDataError: missing file, bad header, a malformed line or unknown split name
            (with the line number), or one case given two different splits.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(
            f"cannot read splits file {path}: {exc}", hint="pass a CSV file with lines case,split"
        ) from exc
    mapping: dict[str, str] = {}
    seen_header = False
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        fields = [f.strip() for f in row]
        if not any(fields):
            continue
        if not seen_header:
            if [f.lower() for f in fields] != ["case", "split"]:
                raise InputDataError(
                    f"{path}, line {lineno}: expected the header 'case,split', found {','.join(fields)!r}",
                    hint="start the file with the line: case,split",
                )
            seen_header = True
            continue
        case, split = _split_row(path, lineno, fields)
        if mapping.get(case, split) != split:
            raise InputDataError(
                f"{path}, line {lineno}: case {case!r} is given both {mapping[case]!r} and {split!r}",
                hint="name each case once",
            )
        mapping[case] = split
    if not seen_header:
        raise InputDataError(f"splits file {path} is empty", hint="write 'case,split' and one line per case")
    return mapping


def _split_row(path: Path, lineno: int, fields: list[str]) -> tuple[str, str]:
    if len(fields) != 2 or not fields[0]:
        raise InputDataError(
            f"{path}, line {lineno}: expected 'case,split', found {','.join(fields)!r}",
            hint="one case per line, e.g. 01,val",
        )
    split = fields[1].lower()
    if split not in SPLITS:
        raise InputDataError(
            f"{path}, line {lineno}: unknown split {fields[1]!r}",
            hint="the split must be train, val or test",
        )
    return fields[0], split


def _case_key(case: str) -> str:
    return str(int(case)) if case.isdigit() else case


def apply_splits(
    listing: DatasetListing, mapping: dict[str, str], strict: bool = True, source: str = "splits file"
) -> DatasetListing:
    """Override the default splits of ``listing`` (in place) with ``mapping``.

    Args:
        listing: the dataset listing.
        mapping: case id -> split, e.g. from :func:`read_splits_file`.
        strict: a case in ``mapping`` that the listing lacks is an error (else a warning).
        source: how to name the mapping in messages (e.g. its path).

    Returns:
        The same listing.

    Raises:
        InputDataError: unknown case(s) when ``strict``, or an invalid split name.
    """
    by_key: dict[str, str] = {}
    for case, split in mapping.items():
        if split not in SPLITS:
            raise InputDataError(
                f"{source}: unknown split {split!r} for case {case!r}",
                hint="the split must be train, val or test",
            )
        by_key[_case_key(case)] = split
    cases = {_case_key(image.case_id) for image in listing.images}
    unknown = sorted(case for case in mapping if _case_key(case) not in cases)
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        message = f"{source}: {len(unknown)} case(s) not in dataset {listing.name}: {shown}"
        if strict:
            raise InputDataError(message, hint=f"case ids of {listing.name} look like "
                                 f"{', '.join(sorted(cases)[:3]) or '(none)'}")
        listing.warnings.append(message)
    for image in listing.images:
        split = by_key.get(_case_key(image.case_id))
        if split is not None:
            image.split = split
    return listing


def apply_root_splits(listing: DatasetListing) -> DatasetListing:
    """Apply ``<root>/splits.csv`` when it exists (every reader calls this last).

    Returns:
        The same listing, with a note in ``warnings`` when a file was applied.

    Raises:
        InputDataError: as :func:`read_splits_file` and :func:`apply_splits` (strict).
    """
    path = Path(listing.root) / ROOT_SPLITS_FILE
    if path.is_file():
        apply_splits(listing, read_splits_file(path), strict=True, source=str(path))
        listing.warnings.append(f"splits taken from {path} (overriding the default rule)")
    return listing


def hash_fraction(case_id: str) -> float:
    """A stable number in [0, 1) for a case id (first 8 bytes of its SHA-256)."""
    digest = hashlib.sha256(case_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_splits(
    case_ids: list[str], val_fraction: float = 0.15, test_fraction: float = 0.15
) -> tuple[dict[str, str], list[str]]:
    """Split cases by a stable hash: about 70/15/15 by default.

    Each case's split depends on its own id only (via :func:`hash_fraction`), so adding or
    removing a case never moves another. With few cases the proportions can be far off;
    when there are at least three cases and val or test would be empty, the train case(s)
    with the largest hash values move there, and a warning says so.

    Args:
        case_ids: the cases.
        val_fraction: share of cases for validation.
        test_fraction: share of cases for test.

    Returns:
        ``(case -> split, warnings)``.
    """
    cases = sorted(set(case_ids))
    fractions = {case: hash_fraction(case) for case in cases}
    splits: dict[str, str] = {}
    for case in cases:
        u = fractions[case]
        if u < 1.0 - val_fraction - test_fraction:
            splits[case] = "train"
        elif u < 1.0 - test_fraction:
            splits[case] = "val"
        else:
            splits[case] = "test"
    warnings: list[str] = []
    if len(cases) >= 3:
        for target in ("test", "val"):
            if target in splits.values():
                continue
            train = sorted((c for c in cases if splits[c] == "train"), key=lambda c: fractions[c])
            if len(train) > 1:
                moved = train[-1]
                splits[moved] = target
                warnings.append(
                    f"hash split left {target} empty; moved case {moved!r} there "
                    "(pass a splits file for full control)"
                )
    return splits, warnings
