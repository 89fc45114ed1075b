"""Parse centroid annotations into the one coordinate convention of ``uts``.

Every parser returns points as ``(y, x)`` = (row, column), float32, in pixels, 0-based, with
pixel centres at integer coordinates. Conversions from each format:

* TUPAC16 per-ROI CSV (``row,col`` per line, no header): 1-based in the original data, so 1
  is subtracted. The alternative labels of Bertram et al. (2020) hold a few points at column
  0, which cannot be 1-based; they are read as the first row/column instead of being refused.
* MITOS-ATYPIA-14 CSV (``x,y,confidence``; x = column, y = row): taken as 0-based pixel
  indices of the x40 frame, unchanged. The challenge does not state an origin; a possible
  off-by-one is far below the 30 px matching radius.
* COCO-like JSON (MIDOG21, CCMCT): the centre of ``bbox = [x1, y1, x2, y2]``; these boxes are
  drawn as point +/- 25 px around the annotated pixel, so the centre is that pixel.
* YOLO txt (``class cx cy w h``, normalised): ``(cy * height, cx * width)``. Such label files
  are made from point annotations the same way, so this recovers the annotated pixel.
* Generic CSV (``image,x,y[,label]`` with a header): 0-based pixel coordinates, unchanged.

Malformed input raises :class:`~uts_cli.errors.InputDataError` naming the file and the line
(CSV/TXT) or a JSON pointer such as ``annotations[17].bbox``.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from uts_cli.choices import KIND_HARD_NEGATIVE, KIND_MITOSIS
from uts_cli.errors import InputDataError

MIDOG_CATEGORY_KINDS = {1: KIND_MITOSIS, 2: KIND_HARD_NEGATIVE}

_LABEL_KINDS = {
    "mitosis": KIND_MITOSIS,
    "mitotic_figure": KIND_MITOSIS,
    "1": KIND_MITOSIS,
    "true": KIND_MITOSIS,
    "hard_negative": KIND_HARD_NEGATIVE,
    "non_mitosis": KIND_HARD_NEGATIVE,
    "0": KIND_HARD_NEGATIVE,
    "false": KIND_HARD_NEGATIVE,
}


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 2), np.float32), np.zeros((0,), np.uint8)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise InputDataError(
            f"annotation file not found: {path}", hint="check the path or the dataset root"
        ) from exc
    except IsADirectoryError as exc:
        raise InputDataError(
            f"expected an annotation file, found a folder: {path}", hint="pass the file itself"
        ) from exc
    except UnicodeDecodeError as exc:
        raise InputDataError(
            f"{path} is not a UTF-8 text file (byte {exc.start})",
            hint="annotation files are plain text (CSV/TXT) or JSON",
        ) from exc
    except OSError as exc:
        raise InputDataError(f"cannot read {path}: {exc}", hint="check file permissions") from exc


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based line numbers."""
    lines = _read_text(path).splitlines()
    return [(i, line.strip()) for i, line in enumerate(lines, start=1) if line.strip()]


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _is_header(fields: list[str]) -> bool:
    return all(f.strip() and _number(f) is None for f in fields)


def _numeric_rows(path: Path, n_fields: int, layout: str) -> list[tuple[int, list[float]]]:
    """Parse a headerless (or one-header-line) numeric CSV with ``n_fields`` per line."""
    rows: list[tuple[int, list[float]]] = []
    for index, (lineno, line) in enumerate(_numbered_lines(path)):
        fields = [f.strip() for f in line.split(",")]
        if index == 0 and _is_header(fields):
            continue
        values = [_number(f) for f in fields]
        if len(fields) != n_fields or any(v is None for v in values):
            raise InputDataError(
                f"{path}, line {lineno}: expected '{layout}' (numbers), found {line[:60]!r}",
                hint=f"each line must hold {n_fields} comma-separated numbers: {layout}",
            )
        rows.append((lineno, [float(v) for v in values]))  # type: ignore[arg-type]
    return rows


def read_tupac_csv(path: str | Path, one_based: bool = True) -> np.ndarray:
    """Read a TUPAC16 per-ROI ground-truth CSV (one ``row,col`` per mitosis).

    Args:
        path: the CSV file. An empty file means no points.
        one_based: the file counts from 1 (the TUPAC16 convention); 1 is subtracted.

    Returns:
        (K, 2) float32 ``(y, x)`` points, 0-based.

    Raises:
        InputDataError: unreadable file, a malformed line, or a negative coordinate
            (file and line number in the message).
    """
    path = Path(path)
    rows = _numeric_rows(path, 2, "row,col")
    for lineno, values in rows:
        if min(values) < 0:
            raise InputDataError(
                f"{path}, line {lineno}: negative coordinate {values}",
                hint="TUPAC16 coordinates are row,col pixel positions counted from 1",
            )
    yx = np.array([v for _, v in rows], np.float32).reshape(-1, 2)
    if one_based:
        # Column/row 0 appears in the alternative labels; read it as the first pixel.
        yx = np.maximum(yx - 1.0, 0.0)
    return yx


def read_mitos14_csv(
    path: str | Path, min_confidence: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Read a MITOS-ATYPIA-14 CSV (``x,y,confidence`` per line; x = column, y = row).

    Coordinates are taken as 0-based pixel indices (see the module docstring).

    Args:
        path: the CSV file (``*_mitosis.csv`` or ``*_not_mitosis.csv``).
        min_confidence: keep points whose confidence is at least this (0 keeps all).

    Returns:
        ``(yx, confidence)``: (K, 2) float32 points and (K,) float32 confidences.

    Raises:
        InputDataError: unreadable file or a malformed line (file and line in the message).
    """
    path = Path(path)
    rows = _numeric_rows(path, 3, "x,y,confidence")
    data = np.array([v for _, v in rows], np.float32).reshape(-1, 3)
    keep = data[:, 2] >= min_confidence
    data = data[keep]
    return np.ascontiguousarray(data[:, [1, 0]]), np.ascontiguousarray(data[:, 2])


def parse_label(text: str) -> int | None:
    """Map a label of the generic CSV to a point kind (None when not recognised).

    ``mitosis``/``1``/``true`` (and empty) give ``KIND_MITOSIS``;
    ``hard_negative``/``non_mitosis``/``0``/``false`` give ``KIND_HARD_NEGATIVE``.
    Case and ``-``/space versus ``_`` do not matter.
    """
    key = text.strip().lower().replace("-", "_").replace(" ", "_")
    if not key:
        return KIND_MITOSIS
    return _LABEL_KINDS.get(key)


def normalise_image_key(text: str) -> str:
    """Image key of the generic CSV as a posix relative path (``a\\b.tif`` -> ``a/b.tif``)."""
    key = text.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def read_points_csv(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the generic points CSV: a header ``image,x,y[,label]``, then one point per line.

    ``image`` is the image path relative to the images folder (posix) or a bare file name;
    ``x`` is the column and ``y`` the row, 0-based pixels. ``label`` is optional (see
    :func:`parse_label`; missing means mitosis). A line with ``x`` and ``y`` both empty
    declares an image as annotated with no points.

    Args:
        path: the CSV file.

    Returns:
        image key -> ``(yx (K, 2) float32, kinds (K,) uint8)``, in file order.

    Raises:
        InputDataError: missing header columns or a malformed line (file and line number).
    """
    path = Path(path)
    lines = _read_text(path).splitlines()
    reader = csv.reader(lines)
    header: dict[str, int] | None = None
    points: dict[str, list[tuple[float, float, int]]] = {}
    for lineno, row in enumerate(reader, start=1):
        fields = [f.strip() for f in row]
        if not any(fields):
            continue
        if header is None:
            header = _points_header(path, lineno, fields)
            continue
        key, point = _points_row(path, lineno, fields, header)
        points.setdefault(key, [])
        if point is not None:
            points[key].append(point)
    if header is None:
        raise InputDataError(
            f"{path} is empty; expected a header line 'image,x,y[,label]'",
            hint="write one line per annotated point after the header",
        )
    result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, items in points.items():
        if not items:
            result[key] = _empty()
            continue
        arr = np.array([(y, x) for x, y, _ in items], np.float32)
        kinds = np.array([k for _, _, k in items], np.uint8)
        result[key] = (arr, kinds)
    return result


def _points_header(path: Path, lineno: int, fields: list[str]) -> dict[str, int]:
    names = [f.lower() for f in fields]
    missing = [n for n in ("image", "x", "y") if n not in names]
    if missing:
        raise InputDataError(
            f"{path}, line {lineno}: the header lacks column(s) {', '.join(missing)}; "
            f"found {','.join(fields)!r}",
            hint="the first line must be 'image,x,y' or 'image,x,y,label'",
        )
    return {n: names.index(n) for n in ("image", "x", "y", "label") if n in names}


def _points_row(
    path: Path, lineno: int, fields: list[str], header: dict[str, int]
) -> tuple[str, tuple[float, float, int] | None]:
    def get(name: str) -> str:
        i = header.get(name)
        return fields[i] if i is not None and i < len(fields) else ""

    key = normalise_image_key(get("image"))
    if not key:
        raise InputDataError(
            f"{path}, line {lineno}: empty image name", hint="give the image path on each line"
        )
    x_text, y_text = get("x"), get("y")
    if not x_text and not y_text:
        return key, None
    x, y = _number(x_text), _number(y_text)
    if x is None or y is None:
        raise InputDataError(
            f"{path}, line {lineno}: x and y must be numbers, found x={x_text!r}, y={y_text!r}",
            hint="x is the column and y the row, in pixels from 0",
        )
    kind = parse_label(get("label"))
    if kind is None:
        raise InputDataError(
            f"{path}, line {lineno}: unknown label {get('label')!r}",
            hint="use mitosis/1/true or hard_negative/non_mitosis/0/false",
        )
    return key, (x, y, kind)


def read_yolo_points(
    path: str | Path, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read a YOLO label file ``class cx cy w h`` (normalised) as centre points.

    Class 0 is a mitotic figure, class 1 a look-alike (hard negative).

    Args:
        path: the ``.txt`` label file (empty means no points).
        width: image width in pixels.
        height: image height in pixels.

    Returns:
        ``(yx (K, 2) float32, kinds (K,) uint8)``.

    Raises:
        InputDataError: a malformed line, an unknown class, or a coordinate outside [0, 1].
    """
    path = Path(path)
    points: list[tuple[float, float]] = []
    kinds: list[int] = []
    for lineno, line in _numbered_lines(path):
        fields = line.split()
        values = [_number(f) for f in fields]
        if len(fields) != 5 or any(v is None for v in values):
            raise InputDataError(
                f"{path}, line {lineno}: expected 'class cx cy w h' (5 numbers), found {line[:60]!r}",
                hint="YOLO labels hold one box per line, normalised to the image size",
            )
        cls, cx, cy = values[0], values[1], values[2]
        if cls not in (0.0, 1.0):
            raise InputDataError(
                f"{path}, line {lineno}: unknown class {fields[0]!r}",
                hint="class 0 = mitotic figure, 1 = look-alike",
            )
        if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0):  # type: ignore[operator]
            raise InputDataError(
                f"{path}, line {lineno}: centre ({cx}, {cy}) is outside [0, 1]",
                hint="YOLO coordinates are normalised by the image width and height",
            )
        points.append((cy * height, cx * width))  # type: ignore[operator]
        kinds.append(KIND_MITOSIS if cls == 0.0 else KIND_HARD_NEGATIVE)
    if not points:
        return _empty()
    return np.array(points, np.float32), np.array(kinds, np.uint8)


@dataclass
class CocoImage:
    """One entry of a COCO-like ``images`` list."""

    id: int
    file_name: str
    width: int
    height: int


@dataclass
class CocoPoints:
    """Centre points of a COCO-like annotation file (MIDOG21, CCMCT).

    Attributes:
        images: the ``images`` entries, in file order.
        points: image id -> ``(yx (K, 2) float32, kinds (K,) uint8)``; every image id is
            present, with empty arrays when it has no kept annotation.
        categories: category id -> name, from the file's ``categories`` list.
        ignored: category id -> number of annotations skipped (categories not mapped to a
            kind, when the reader was told to ignore them).
    """

    images: list[CocoImage]
    points: dict[int, tuple[np.ndarray, np.ndarray]]
    categories: dict[int, str] = field(default_factory=dict)
    ignored: dict[int, int] = field(default_factory=dict)


MidogAnnotations = CocoPoints


def _bad(path: Path, pointer: str, problem: str) -> InputDataError:
    return InputDataError(
        f"{path}: {pointer}: {problem}",
        hint="the file must be COCO-like: images [{id, file_name, width, height}], "
        "annotations [{image_id, category_id, bbox [x1, y1, x2, y2]}]",
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def load_json(path: str | Path) -> object:
    """Load a JSON file, turning syntax errors into InputDataError with line and column."""
    path = Path(path)
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputDataError(
            f"{path}, line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})",
            hint="the file is truncated or was edited by hand; get a fresh copy",
        ) from exc


def _list_field(path: Path, data: dict, key: str) -> list:
    if key not in data:
        raise _bad(path, key, "missing")
    value = data[key]
    if not isinstance(value, list):
        raise _bad(path, key, f"expected a list, found {type(value).__name__}")
    return value


def _coco_images(path: Path, raw: list) -> list[CocoImage]:
    images: list[CocoImage] = []
    seen: set[int] = set()
    for i, entry in enumerate(raw):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            raise _bad(path, where, f"expected an object, found {type(entry).__name__}")
        for key in ("id", "file_name", "width", "height"):
            if key not in entry:
                raise _bad(path, f"{where}.{key}", "missing")
        if not _is_int(entry["id"]):
            raise _bad(path, f"{where}.id", f"expected an integer, found {entry['id']!r}")
        if entry["id"] in seen:
            raise _bad(path, f"{where}.id", f"duplicate image id {entry['id']}")
        if not isinstance(entry["file_name"], str) or not entry["file_name"].strip():
            raise _bad(path, f"{where}.file_name", f"expected a file name, found {entry['file_name']!r}")
        for key in ("width", "height"):
            if not _is_int(entry[key]) or entry[key] <= 0:
                raise _bad(path, f"{where}.{key}", f"expected a positive integer, found {entry[key]!r}")
        seen.add(entry["id"])
        images.append(CocoImage(entry["id"], entry["file_name"].strip(), entry["width"], entry["height"]))
    return images


def _coco_categories(path: Path, data: dict) -> dict[int, str]:
    raw = data.get("categories", [])
    if not isinstance(raw, list):
        raise _bad(path, "categories", f"expected a list, found {type(raw).__name__}")
    categories: dict[int, str] = {}
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            raise _bad(path, f"categories[{i}]", "expected an object with an integer id")
        categories[entry["id"]] = str(entry.get("name", ""))
    return categories


def read_coco_points(
    path: str | Path,
    category_kinds: dict[int, int] | Callable[[dict[int, str]], dict[int, int]],
    ignore_other_categories: bool = False,
) -> CocoPoints:
    """Read a COCO-like JSON of point annotations drawn as boxes.

    Args:
        path: the JSON file.
        category_kinds: category id -> point kind (``KIND_MITOSIS`` / ``KIND_HARD_NEGATIVE``),
            or a function that builds that mapping from the file's categories (id -> name).
        ignore_other_categories: skip annotations of other categories (counted in
            ``ignored``) instead of refusing them.

    Returns:
        A :class:`CocoPoints`.

    Raises:
        InputDataError: invalid JSON or structure; the message points at the entry, e.g.
            ``annotations[17].bbox``.
    """
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict):
        raise _bad(path, "(top level)", f"expected an object, found {type(data).__name__}")
    images = _coco_images(path, _list_field(path, data, "images"))
    categories = _coco_categories(path, data)
    if callable(category_kinds):
        category_kinds = category_kinds(categories)
    known = {image.id for image in images}
    collected: dict[int, tuple[list[tuple[float, float]], list[int]]] = {i: ([], []) for i in known}
    ignored: dict[int, int] = {}
    for i, entry in enumerate(_list_field(path, data, "annotations")):
        where = f"annotations[{i}]"
        if not isinstance(entry, dict):
            raise _bad(path, where, f"expected an object, found {type(entry).__name__}")
        for key in ("image_id", "category_id", "bbox"):
            if key not in entry:
                raise _bad(path, f"{where}.{key}", "missing")
        category = entry["category_id"]
        if not _is_int(category):
            raise _bad(path, f"{where}.category_id", f"expected an integer, found {category!r}")
        if category not in category_kinds:
            if ignore_other_categories:
                ignored[category] = ignored.get(category, 0) + 1
                continue
            expected = " or ".join(str(c) for c in sorted(category_kinds))
            raise _bad(path, f"{where}.category_id", f"unknown category {category} (expected {expected})")
        image_id = entry["image_id"]
        if not _is_int(image_id) or image_id not in known:
            raise _bad(path, f"{where}.image_id", f"no image with id {image_id!r} in 'images'")
        box = entry["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(_is_num(v) for v in box):
            raise _bad(path, f"{where}.bbox", f"expected [x1, y1, x2, y2] numbers, found {box!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if x2 < x1 or y2 < y1:
            raise _bad(path, f"{where}.bbox", f"expected x1 <= x2 and y1 <= y2, found {box!r}")
        yx, kinds = collected[image_id]
        yx.append(((y1 + y2) / 2.0, (x1 + x2) / 2.0))
        kinds.append(category_kinds[category])
    points = {
        image_id: (np.array(yx, np.float32).reshape(-1, 2), np.array(kinds, np.uint8))
        for image_id, (yx, kinds) in collected.items()
    }
    return CocoPoints(images, points, categories, ignored)


def read_midog_json(path: str | Path) -> MidogAnnotations:
    """Read ``MIDOG.json``: category 1 (mitotic figure) -> mitosis, 2 -> hard negative.

    Args:
        path: the MIDOG21 annotation file.

    Returns:
        A :class:`CocoPoints` (alias ``MidogAnnotations``).

    Raises:
        InputDataError: invalid JSON or structure, an unknown category, or an annotation for
            an image that is not listed (the message points at the entry).
    """
    return read_coco_points(path, MIDOG_CATEGORY_KINDS)


def check_points_in_image(
    yx: np.ndarray, height: int, width: int, where: str, slack: float = 0.5
) -> np.ndarray:
    """Refuse points outside an image; clip those within ``slack`` pixels of the border.

    Args:
        yx: (K, 2) points.
        height: image height in pixels.
        width: image width in pixels.
        where: the image (and annotation file) to name in the error.
        slack: tolerance beyond the outermost pixel centres, in pixels.

    Returns:
        (K, 2) float32 points clipped to ``[0, height - 1] x [0, width - 1]``.

    Raises:
        InputDataError: a point lies further outside (the first such point is named).
    """
    yx = np.asarray(yx, np.float32).reshape(-1, 2)
    if yx.size == 0:
        return yx
    outside = (
        (yx[:, 0] < -slack) | (yx[:, 0] > height - 1 + slack)
        | (yx[:, 1] < -slack) | (yx[:, 1] > width - 1 + slack)
    )
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        y, x = float(yx[k, 0]), float(yx[k, 1])
        raise InputDataError(
            f"{where}: point {k} at (y={y:g}, x={x:g}) lies outside the image "
            f"({height} x {width} px); {int(outside.sum())} point(s) outside in all",
            hint="check that the annotations belong to this image and use its pixel coordinates",
        )
    clipped = yx.copy()
    clipped[:, 0] = np.clip(clipped[:, 0], 0, height - 1)
    clipped[:, 1] = np.clip(clipped[:, 1], 0, width - 1)
    return clipped
