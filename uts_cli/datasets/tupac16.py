"""TUPAC16 auxiliary mitosis dataset (high-power fields of 73 breast cancer cases).

Layout (``discover(root)``)::

    <root>/mitoses_train_image_data/          (or mitoses-train_image_data)
        mitoses_train_image_data_part_1/01/01.tif ...   (parts 1..3, case folders 01..73)
    <root>/mitoses_ground_truth/01/01.csv              (row,col per mitosis, 1-based)
    <root>/nonmitoses_ground_truth/01/01.csv           (optional: hard negatives)

``labels=PATH`` reads the ground-truth folders from elsewhere, e.g. the alternative labels of
Bertram et al. (2020), ``TUPAC_AL/`` with the same two folders. No CSV for an ROI means no
mitosis (one summary warning lists such ROIs). ``image_id`` is ``"<case>/<roi>"``, the case
is the case folder, the pixel size 0.25 um. Default split (the original's): val cases
30, 37, 44, 51, 58, 65, 72; test 31, 38, 45, 52, 59, 66, 73; the rest train.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from uts_cli.choices import KIND_HARD_NEGATIVE, KIND_MITOSIS
from uts_cli.datasets.base import DatasetListing
from uts_cli.datasets.folder import make_image, require_root, summarise
from uts_cli.datasets.splits import apply_root_splits
from uts_cli.errors import InputDataError
from uts_cli.io.annotations import check_points_in_image, read_tupac_csv
from uts_cli.io.images import is_junk, list_image_files, read_header

NAME = "TUPAC16"
PIXEL_SIZE_UM = 0.25
VAL_CASES = frozenset({30, 37, 44, 51, 58, 65, 72})
TEST_CASES = frozenset({31, 38, 45, 52, 59, 66, 73})
IMAGE_DIRS = ("mitoses_train_image_data", "mitoses-train_image_data")
MITOSES_DIR = "mitoses_ground_truth"
NONMITOSES_DIR = "nonmitoses_ground_truth"
_EXPECTED = "<root>/mitoses_train_image_data/mitoses_train_image_data_part_1/01/01.tif"


def default_split(case_id: str) -> str:
    """The original split of a TUPAC16 case (``"30"`` or ``"030"`` alike)."""
    number = int(case_id) if case_id.isdigit() else -1
    if number in VAL_CASES:
        return "val"
    if number in TEST_CASES:
        return "test"
    return "train"


def _ground_truth_files(folder: Path) -> dict[str, Path]:
    """``"<case>/<roi>"`` -> CSV for ``folder/<case>/<roi>.csv``."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for case_dir in sorted(folder.iterdir()):
        if not case_dir.is_dir() or is_junk(case_dir):
            continue
        for csv_path in sorted(case_dir.glob("*.csv")):
            if not is_junk(csv_path):
                found[f"{case_dir.name}/{csv_path.stem}"] = csv_path
    return found


def _image_files(root: Path, warnings: list[str]) -> dict[str, Path]:
    image_dirs = [root / name for name in IMAGE_DIRS if (root / name).is_dir()]
    if not image_dirs:
        raise InputDataError(
            f"no TUPAC16 image folder in {root} (looked for {' or '.join(IMAGE_DIRS)})",
            hint=f"expected {_EXPECTED}; pass --root",
        )
    files: dict[str, Path] = {}
    outside: list[str] = []
    for image_dir in image_dirs:
        for path in list_image_files(image_dir, recursive=True):
            if path.suffix.lower() not in (".tif", ".tiff"):
                continue
            case = path.parent.name
            if not case.isdigit():
                outside.append(path.relative_to(root).as_posix())
                continue
            image_id = f"{case}/{path.stem}"
            if image_id in files:
                raise InputDataError(
                    f"TUPAC16 ROI {image_id} appears twice: {files[image_id]} and {path}",
                    hint="keep one copy of each case folder",
                )
            files[image_id] = path
    if outside:
        warnings.append(f"{len(outside)} TIFF(s) not in a numbered case folder were skipped: "
                        f"{summarise(outside)}")
    if not files:
        raise InputDataError(
            f"no TUPAC16 images (.tif) found under {', '.join(str(d) for d in image_dirs)}",
            hint=f"expected {_EXPECTED}; pass --root",
        )
    return files


def _points(image_id: str, shape: tuple[int, ...], mitoses: dict[str, Path],
            negatives: dict[str, Path], one_based: bool) -> tuple[np.ndarray, np.ndarray]:
    parts_yx, parts_kind = [], []
    for table, kind in ((mitoses, KIND_MITOSIS), (negatives, KIND_HARD_NEGATIVE)):
        if image_id in table:
            yx = read_tupac_csv(table[image_id], one_based=one_based)
            yx = check_points_in_image(yx, shape[0], shape[1], f"ROI {image_id} ({table[image_id]})")
            parts_yx.append(yx)
            parts_kind.append(np.full(len(yx), kind, np.uint8))
    if not parts_yx:
        return np.zeros((0, 2), np.float32), np.zeros((0,), np.uint8)
    return np.concatenate(parts_yx), np.concatenate(parts_kind)


def discover(root: str | Path, labels: str | Path | None = None,
             one_based: bool = True) -> DatasetListing:
    """List the TUPAC16 ROIs with their mitoses (and hard negatives when present).

    Args:
        root: the TUPAC16 folder (see the module docstring).
        labels: folder holding ``mitoses_ground_truth/`` (and optionally
            ``nonmitoses_ground_truth/``); default ``root``.
        one_based: the CSVs count rows and columns from 1 (TUPAC16's convention).

    Returns:
        The dataset listing, images sorted by id.

    Raises:
        InputDataError: missing/empty root, no images, no ground-truth folder, a malformed
            CSV line, or a point outside its ROI.
    """
    root = Path(root)
    require_root(root, NAME, _EXPECTED)
    label_root = Path(labels) if labels is not None else root
    listing = DatasetListing(NAME, root, [])
    files = _image_files(root, listing.warnings)
    if not (label_root / MITOSES_DIR).is_dir():
        raise InputDataError(
            f"no TUPAC16 ground truth: {label_root / MITOSES_DIR} is missing",
            hint=f"expected {label_root}/{MITOSES_DIR}/01/01.csv; pass --root or the labels folder",
        )
    mitoses = _ground_truth_files(label_root / MITOSES_DIR)
    negatives = _ground_truth_files(label_root / NONMITOSES_DIR)
    for table, folder in ((mitoses, MITOSES_DIR), (negatives, NONMITOSES_DIR)):
        orphans = sorted(set(table) - set(files))
        if orphans:
            listing.warnings.append(
                f"{len(orphans)} CSV(s) in {folder} have no image: {summarise(orphans)}")
    without = sorted(set(files) - set(mitoses))
    if without:
        listing.warnings.append(
            f"{len(without)} ROI(s) have no CSV in {MITOSES_DIR} and are taken to hold no "
            f"mitosis: {summarise(without)}")
    for image_id in sorted(files):
        case = image_id.split("/")[0]
        shape, _ = read_header(files[image_id])
        points = _points(image_id, shape, mitoses, negatives, one_based)
        listing.images.append(make_image(
            image_id, case, files[image_id], points, default_split(case), PIXEL_SIZE_UM, shape,
        ))
    return apply_root_splits(listing)
