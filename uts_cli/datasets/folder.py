"""Generic dataset: any folder of images plus one CSV of points; and helpers for all readers.

Layout::

    <root>/images/**/<name>.{tif,tiff,svs,png,jpg}   (or the images directly under <root>)
    <root>/annotations.csv        image,x,y[,label]  (see io.annotations.read_points_csv)
    <root>/dataset.json           optional: {"pixel_size_um": 0.25}
    <root>/splits.csv             optional: case,split

* ``image_id`` is the image path relative to the images folder, without suffix (posix).
* ``case_id`` is the first sub-folder under the images folder when images sit in
  sub-folders (one folder per patient/slide), else the file stem.
* The CSV names an image by its relative path or by its bare file name (with or without
  suffix) when that name is unique.
* Images the CSV does not name are listed with no points (and a warning); a line with empty
  x and y marks an image as checked and free of mitoses, which silences the warning.
* Default split without a splits file: a stable hash of each case id, about 70/15/15
  (:func:`uts_cli.datasets.splits.hash_splits`): adding a case never moves another.
* Pixel size: ``dataset.json`` when given, else the value the image file records, else None.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from uts_cli.datasets.base import DatasetListing, SourceImage, empty_points
from uts_cli.datasets.splits import apply_root_splits, hash_splits
from uts_cli.errors import InputDataError
from uts_cli.io.annotations import check_points_in_image, load_json, read_points_csv
from uts_cli.io.images import is_junk, list_image_files, read_header

NAME = "folder"


def summarise(items: list[str], limit: int = 5) -> str:
    """``"a, b, c, ... (12 in all)"`` for warning lines."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def require_root(root: Path, dataset: str, expected: str) -> None:
    """Refuse a missing, non-directory or empty dataset root.

    Args:
        root: the dataset folder.
        dataset: dataset name for the message.
        expected: an example path of the expected layout, for the hint.

    Raises:
        InputDataError: with a hint showing the expected layout.
    """
    hint = f"expected {expected}; pass --root"
    if not root.exists():
        raise InputDataError(f"{dataset} dataset folder not found: {root}", hint=hint)
    if not root.is_dir():
        raise InputDataError(f"{dataset} dataset root is not a folder: {root}", hint=hint)
    if not any(not is_junk(entry) for entry in root.iterdir()):
        raise InputDataError(f"{dataset} dataset folder is empty: {root}", hint=hint)


def make_image(
    image_id: str,
    case_id: str,
    path: Path,
    points: tuple[np.ndarray, np.ndarray],
    split: str,
    pixel_size_um: float | None,
    shape: tuple[int, ...],
    where: str | None = None,
    **extra: object,
) -> SourceImage:
    """Build a :class:`SourceImage` after checking its points lie inside the image.

    Args:
        image_id: stable id.
        case_id: patient/slide id.
        path: the image file.
        points: ``(yx, kinds)``.
        split: default split.
        pixel_size_um: micrometres per pixel or None.
        shape: ``(H, W, ...)`` of the image (from its header).
        where: how to name the image and its annotation file in errors.
        **extra: further SourceImage fields (``whole_slide``, ``labelled``).

    Raises:
        InputDataError: a point further than half a pixel outside the image.
    """
    yx, kinds = points
    yx = check_points_in_image(yx, int(shape[0]), int(shape[1]), where or f"image {path}")
    return SourceImage(
        image_id=image_id,
        case_id=case_id,
        path=path.resolve(),
        points_yx=yx,
        kinds=np.asarray(kinds, np.uint8).reshape(-1),
        split=split,
        pixel_size_um=pixel_size_um,
        **extra,  # type: ignore[arg-type]
    )


def _read_pixel_size(root: Path) -> float | None:
    path = root / "dataset.json"
    if not path.is_file():
        return None
    data = load_json(path)
    value = data.get("pixel_size_um") if isinstance(data, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 100:
        raise InputDataError(
            f"{path}: pixel_size_um must be a positive number of micrometres, found {value!r}",
            hint='write for instance {"pixel_size_um": 0.25}',
        )
    return float(value)


def _lookup_table(files: dict[str, Path]) -> dict[str, str | None]:
    """CSV key -> image_id: relative paths always; bare names/stems when unique (else None)."""
    owners: dict[str, set[str]] = {}
    for image_id, path in files.items():
        for short in (path.name, path.stem):
            owners.setdefault(short, set()).add(image_id)
    table: dict[str, str | None] = {
        short: (next(iter(ids)) if len(ids) == 1 else None) for short, ids in owners.items()
    }
    for image_id, path in files.items():
        table[image_id] = image_id
        table[f"{image_id}{path.suffix}"] = image_id
    return table


def discover(root: str | Path, annotations: str | Path | None = None) -> DatasetListing:
    """List a generic image folder with a points CSV.

    Args:
        root: the dataset folder (see the module docstring for the layout).
        annotations: the points CSV; default ``<root>/annotations.csv``.

    Returns:
        The dataset listing, images sorted by id.

    Raises:
        InputDataError: missing/empty root, no images, missing or malformed CSV, an ambiguous
            image name, duplicate image ids, or a point outside its image.
    """
    root = Path(root)
    require_root(root, NAME, f"{root}/images/<case>/<image>.tif and {root}/annotations.csv")
    images_dir = root / "images" if (root / "images").is_dir() else root
    files: dict[str, Path] = {}
    for path in list_image_files(images_dir, recursive=True):
        image_id = path.relative_to(images_dir).with_suffix("").as_posix()
        if image_id in files:
            raise InputDataError(
                f"two images share the id {image_id!r}: {files[image_id].name} and {path.name}",
                hint="keep one file per image name (suffixes are not part of the id)",
            )
        files[image_id] = path
    if not files:
        raise InputDataError(
            f"no images (.tif, .tiff, .svs, .png, .jpg) found under {images_dir}",
            hint=f"put the images in {root}/images/; pass --root",
        )
    csv_path = Path(annotations) if annotations is not None else root / "annotations.csv"
    if not csv_path.is_file():
        raise InputDataError(
            f"annotation file not found: {csv_path}",
            hint="write a CSV with the header image,x,y[,label]; or pass --annotations",
        )
    points, unmatched = _match_points(csv_path, read_points_csv(csv_path), files)
    listing = DatasetListing(NAME, root, [])
    if unmatched:
        listing.warnings.append(
            f"{csv_path}: {len(unmatched)} image name(s) match no image file: {summarise(unmatched)}"
        )
    missing = sorted(i for i in files if i not in points)
    if missing:
        listing.warnings.append(
            f"{len(missing)} image(s) have no line in {csv_path.name} and are listed with no "
            f"points: {summarise(missing)}"
        )
    pixel_size = _read_pixel_size(root)
    case_of = {i: (i.split("/")[0] if "/" in i else i) for i in files}
    splits, split_warnings = hash_splits(list(case_of.values()))
    listing.warnings.extend(split_warnings)
    for image_id in sorted(files):
        path = files[image_id]
        shape, recorded = read_header(path)
        listing.images.append(make_image(
            image_id, case_of[image_id], path, points.get(image_id, empty_points()),
            splits[case_of[image_id]], pixel_size if pixel_size is not None else recorded,
            shape, where=f"image {image_id} ({csv_path.name})",
        ))
    return apply_root_splits(listing)


def _match_points(
    csv_path: Path, raw: dict[str, tuple[np.ndarray, np.ndarray]], files: dict[str, Path]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    table = _lookup_table(files)
    matched: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    unmatched: list[str] = []
    for key, value in raw.items():
        if key in table and table[key] is None:
            candidates = sorted(i for i, p in files.items() if key in (p.name, p.stem))
            raise InputDataError(
                f"{csv_path}: image name {key!r} is ambiguous: {summarise(candidates)}",
                hint="give the path relative to the images folder, e.g. "
                f"{candidates[0]}{files[candidates[0]].suffix}",
            )
        image_id = table.get(key)
        if image_id is None:
            unmatched.append(key)
            continue
        matched.setdefault(image_id, []).append(value)
    merged = {
        image_id: (np.concatenate([v[0] for v in values]), np.concatenate([v[1] for v in values]))
        for image_id, values in matched.items()
    }
    return merged, unmatched
