"""MIDOG 2021 training set: 200 breast cancer HPFs from four scanners, 50 each.

Layout (``discover(root)``)::

    <root>/images/001.tiff ... 200.tiff
    <root>/MIDOG.json        (COCO-like; category 1 mitotic figure, 2 look-alike)

Each image is its own case: ``case_id`` and ``image_id`` are the file stem (``"001"``).
Category 2 points are kept as hard negatives. Images 151-200 (the fourth scanner) carry no
labels (no annotation in the JSON): they are left out unless ``include_unlabelled=True``, in
which case they are listed with ``labelled=False`` in the test split, so that they can never
reach training; consumers must skip unlabelled images when computing metrics.
Default split (the original's): val 41-45, 91-95, 141-145; test 46-50, 96-100, 146-150;
the rest of 1-150 train. Pixel size: the value the TIFF records when it does, else 0.25 um
(the dataset's nominal value; the four scanners differ slightly and that is not tabulated
here).
"""
from __future__ import annotations

from pathlib import Path

from uts_cli.datasets.base import DatasetListing
from uts_cli.datasets.folder import make_image, require_root, summarise
from uts_cli.datasets.splits import apply_root_splits
from uts_cli.errors import InputDataError
from uts_cli.io.annotations import read_midog_json
from uts_cli.io.images import list_image_files, read_header

NAME = "MIDOG21"
PIXEL_SIZE_UM = 0.25
LAST_LABELLED = 150
VAL_IMAGES = frozenset(range(41, 46)) | frozenset(range(91, 96)) | frozenset(range(141, 146))
TEST_IMAGES = frozenset(range(46, 51)) | frozenset(range(96, 101)) | frozenset(range(146, 151))
_EXPECTED = "<root>/images/001.tiff and <root>/MIDOG.json"


def default_split(number: int) -> str:
    """The original split of MIDOG21 image ``number`` (151-200, unlabelled, go to test)."""
    if number in VAL_IMAGES:
        return "val"
    if number in TEST_IMAGES or number > LAST_LABELLED:
        return "test"
    return "train"


def discover(root: str | Path, annotations: str | Path | None = None,
             include_unlabelled: bool = False) -> DatasetListing:
    """List the MIDOG21 images with their mitoses and hard negatives.

    Args:
        root: the MIDOG21 folder (see the module docstring).
        annotations: the JSON file; default ``<root>/MIDOG.json``.
        include_unlabelled: also list images 151-200 (``labelled=False``, split test).

    Returns:
        The dataset listing, images sorted by id.

    Raises:
        InputDataError: missing/empty root, missing images folder or JSON, a malformed JSON,
            or a point outside its image.
    """
    root = Path(root)
    require_root(root, NAME, _EXPECTED)
    json_path = Path(annotations) if annotations is not None else root / "MIDOG.json"
    if not json_path.is_file():
        raise InputDataError(f"MIDOG21 annotation file not found: {json_path}",
                             hint=f"expected {_EXPECTED}; pass --root or --annotations")
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise InputDataError(f"MIDOG21 images folder not found: {images_dir}",
                             hint=f"expected {_EXPECTED}; pass --root")
    coco = read_midog_json(json_path)
    files = {p.stem: p for p in list_image_files(images_dir) if p.suffix.lower() in (".tif", ".tiff")}
    listing = DatasetListing(NAME, root, [])
    listed: set[str] = set()
    missing: list[str] = []
    unlabelled: list[str] = []
    for entry in coco.images:
        stem = Path(entry.file_name).stem
        listed.add(stem)
        if stem not in files:
            missing.append(entry.file_name)
            continue
        number = int(stem) if stem.isdigit() else None
        has_points = len(coco.points[entry.id][0]) > 0
        labelled = number is None or number <= LAST_LABELLED or has_points
        if not labelled:
            unlabelled.append(stem)
            if not include_unlabelled:
                continue
        if number is None:
            listing.warnings.append(f"image {entry.file_name} has no MIDOG number; put in train")
        shape, recorded = read_header(files[stem])
        if (shape[0], shape[1]) != (entry.height, entry.width):
            listing.warnings.append(
                f"image {stem} is {shape[0]} x {shape[1]} px but {json_path.name} says "
                f"{entry.height} x {entry.width}; points are checked against the file")
        listing.images.append(make_image(
            stem, stem, files[stem], coco.points[entry.id],
            default_split(number) if number is not None else "train",
            recorded or PIXEL_SIZE_UM, shape, where=f"image {stem} ({json_path.name})",
            labelled=labelled,
        ))
    if missing:
        listing.warnings.append(f"{len(missing)} image(s) in {json_path.name} are not in "
                                f"{images_dir}: {summarise(missing)}")
    extra = sorted(set(files) - listed)
    if extra:
        listing.warnings.append(f"{len(extra)} image file(s) are not in {json_path.name} and "
                                f"were skipped: {summarise(extra)}")
    if unlabelled and not include_unlabelled:
        listing.warnings.append(
            f"{len(unlabelled)} unlabelled image(s) ({unlabelled[0]}-{unlabelled[-1]}) left out; "
            "pass include_unlabelled to list them")
    listing.images.sort(key=lambda image: image.image_id)
    return apply_root_splits(listing)
