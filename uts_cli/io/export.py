"""Write detections and review lists as CSV, QuPath-importable GeoJSON or grand-challenge JSON.

GeoJSON layout follows QuPath's own reader/writer (qupath-core ``PathObjectTypeAdapters``, and
qupath/qupath PR #1099 "Improved GeoJSON support", v0.4+):

* a ``FeatureCollection`` of ``Feature`` objects, coordinates in full-resolution image pixels with
  the origin at the top-left corner (QuPath docs, "Exporting annotations": "Units and origin"),
  ordered ``[x, y]`` as GeoJSON requires, i.e. ``[col, row]``;
* ``properties.objectType`` = ``"annotation"`` or ``"detection"`` (a missing type is read as an
  annotation);
* ``properties.classification`` = ``{"name": str, "color": [r, g, b]}``;
* ``properties.measurements`` = a JSON object mapping a name to a number (QuPath >= 0.4; the older
  list of ``{"name", "value"}`` is still read but no longer written);
* ``properties.name`` is shown as the object's name. Other properties are ignored by QuPath but kept
  in the file, so extra fields such as ``reason`` survive a round trip through this module.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from uts_cli.errors import InputDataError
from uts_cli.io.atomic import atomic_write_text

# Colours of the evaluation overlays (METHOD.md section 4) and of the point kinds.
DEFAULT_COLORS: dict[str, tuple[int, int, int]] = {
    "TP": (0, 200, 0),
    "FP": (255, 215, 0),
    "FN": (0, 90, 255),
    "mitosis": (220, 20, 60),
    "hard negative": (150, 150, 150),
    "removed": (255, 120, 0),
}


def _plain(value: Any) -> Any:
    """Convert numpy scalars/arrays to builtin Python values so csv/json write them plainly."""
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        # Shortest decimal that round-trips in the narrow type: float32 0.1 is written "0.1",
        # not "0.10000000149011612".
        return float(str(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value] if value.ndim else _plain(value[()])
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return _plain(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def write_points_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
                     fieldnames: Sequence[str] | None = None) -> int:
    """Write rows of dicts as a CSV file with a header line, atomically.

    Args:
        path: destination file; written through a temporary file and renamed.
        rows: one mapping per point (e.g. ``{"image": ..., "y": ..., "x": ..., "score": ...}``).
        fieldnames: column order. Defaults to the keys in order of first appearance; a row
            missing a column gets an empty cell. Give it explicitly so an empty result still
            writes a header.

    Returns:
        The number of data rows written.

    Raises:
        InputDataError: when a row holds a key not in an explicit ``fieldnames``.
    """
    rows = [{k: _plain(v) for k, v in row.items()} for row in rows]
    if fieldnames is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        fieldnames = list(seen)
    buf = io.StringIO()
    if fieldnames:
        writer = csv.DictWriter(buf, fieldnames=list(fieldnames), restval="", lineterminator="\n")
        writer.writeheader()
        try:
            writer.writerows(rows)
        except ValueError as exc:
            raise InputDataError(f"{os.fspath(path)}: {exc}",
                                 hint="add the column to fieldnames or drop it from the rows") from exc
    atomic_write_text(path, buf.getvalue())
    return len(rows)


def class_color(name: str) -> list[int]:
    """RGB colour for a class name: the default table, else a stable colour derived from the name."""
    if name in DEFAULT_COLORS:
        return list(DEFAULT_COLORS[name])
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return [64 + b % 192 for b in digest[:3]]


def point_feature(y: float, x: float, classification: str, *,
                  color: Sequence[int] | None = None,
                  measurements: Mapping[str, float] | None = None,
                  name: str | None = None,
                  object_type: str = "annotation",
                  properties: Mapping[str, Any] | None = None) -> dict:
    """Build one QuPath-style GeoJSON Point feature.

    Args:
        y: row in image pixels.
        x: column in image pixels.
        classification: class name shown in QuPath (e.g. ``"mitosis"``, ``"FP"``).
        color: ``[r, g, b]`` 0-255; defaults to :func:`class_color`.
        measurements: numeric values shown in QuPath's measurement table (e.g. ``{"score": 0.9}``).
        name: object name shown in QuPath.
        object_type: ``"annotation"`` (editable in QuPath) or ``"detection"``.
        properties: extra JSON-serialisable properties kept in the file (e.g. ``{"reason": ...}``).

    Returns:
        The feature as a dict.

    Raises:
        InputDataError: when a coordinate or measurement is not a finite number.
    """
    y, x = float(_plain(y)), float(_plain(x))
    if not (math.isfinite(y) and math.isfinite(x)):
        raise InputDataError(f"point ({y}, {x}) has a non-finite coordinate",
                             hint="drop invalid points before export")
    props: dict[str, Any] = {k: _plain(v) for k, v in (properties or {}).items()}
    props["objectType"] = object_type
    props["classification"] = {
        "name": classification,
        "color": [int(c) for c in (color if color is not None else class_color(classification))],
    }
    if name is not None:
        props["name"] = name
    if measurements:
        meas = {}
        for key, value in measurements.items():
            value = float(_plain(value))
            if not math.isfinite(value):
                raise InputDataError(f"measurement {key!r} of point ({y}, {x}) is not finite",
                                     hint="JSON cannot hold NaN; drop or replace the value")
            meas[str(key)] = value
        props["measurements"] = meas
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [x, y]},
        "properties": props,
    }


def write_geojson_points(path: str | os.PathLike, features: Iterable[Mapping[str, Any]]) -> int:
    """Write points as a GeoJSON FeatureCollection that QuPath imports, atomically.

    Each item is either a ready feature (a mapping with ``"type": "Feature"``, e.g. from
    :func:`point_feature`) or a mapping of :func:`point_feature` keyword arguments with at least
    ``y``, ``x`` and ``classification``.

    Args:
        path: destination (``.geojson``); drag it onto an open image in QuPath to import.
        features: the points.

    Returns:
        The number of features written.

    Raises:
        InputDataError: when an item lacks ``y``/``x``/``classification`` or holds a non-finite
            number.
    """
    out = []
    for item in features:
        if item.get("type") == "Feature":
            out.append(dict(item))
            continue
        missing = [k for k in ("y", "x", "classification") if k not in item]
        if missing:
            raise InputDataError(f"{os.fspath(path)}: point item lacks {', '.join(missing)}",
                                 hint="give each point y, x (pixels) and a classification name")
        kwargs = dict(item)
        out.append(point_feature(kwargs.pop("y"), kwargs.pop("x"), kwargs.pop("classification"),
                                 **kwargs))
    collection = {"type": "FeatureCollection", "features": out}
    try:
        text = json.dumps(collection, indent=1, allow_nan=False, default=_json_default)
    except ValueError as exc:
        raise InputDataError(f"{os.fspath(path)}: a property holds NaN or infinity ({exc})",
                             hint="JSON cannot store NaN or infinity; drop or replace such values") from exc
    atomic_write_text(path, text + "\n")
    return len(out)


# ---------------------------------------------------------------------------------------------
# Per-slide detection exports used by `uts predict`.
#
# Every writer below takes detections as ``yx``: float array (K, 2) of (row, col) in pixels of the
# full-resolution INPUT image with pixel centres at integer coordinates, and ``scores``: (K,) in
# [0, 1]. Files are written atomically, so a reader never sees a half-written export.
# ---------------------------------------------------------------------------------------------

#: The formats ``uts predict --format`` accepts.
EXPORT_FORMATS = ("csv", "geojson", "midog")

#: Class name of exported detections (QuPath shows it as the classification).
DETECTION_CLASS = "Mitotic figure"

# Summary columns written first, in this order; any other key follows in order of first appearance.
SUMMARY_COLUMNS = (
    "slide", "path", "status", "count", "tissue_area_mm2", "density_per_mm2",
    "hotspot_count", "hotspot_area_mm2", "hotspot_density_per_mm2",
    "hotspot_x0", "hotspot_y0", "hotspot_side_px", "hotspot_width_px", "hotspot_height_px",
)


def _detections(yx: Any, scores: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate detections: (K, 2) finite coordinates and (K,) finite scores in [0, 1].

    Returns float64 copies sorted by row then column (a stable order makes files diffable).
    """
    yx = np.asarray(yx, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if yx.size == 0:
        yx = yx.reshape(0, 2)
    if yx.ndim != 2 or yx.shape[1] != 2:
        raise InputDataError(f"{where}: detections have shape {yx.shape}, expected (K, 2) rows of (y, x)",
                             hint="pass one (row, col) pair per detection")
    if len(scores) != len(yx):
        raise InputDataError(f"{where}: {len(yx)} detections but {len(scores)} scores",
                             hint="pass one score per detection")
    if not (np.isfinite(yx).all() and np.isfinite(scores).all()):
        raise InputDataError(f"{where}: a detection coordinate or score is NaN or infinite",
                             hint="drop invalid detections before export")
    if len(scores) and (scores.min() < 0.0 or scores.max() > 1.0):
        raise InputDataError(f"{where}: scores must lie in [0, 1] (got {scores.min():g}..{scores.max():g})",
                             hint="export probabilities (after the sigmoid), not logits")
    order = np.lexsort((yx[:, 1], yx[:, 0]))
    return yx[order], scores[order]


def _num(value: float, digits: int) -> float:
    """Round for the file: sub-pixel positions to 1/1000 px, so files stay small and readable."""
    return round(float(value), digits)


def write_detections_csv(path: str | os.PathLike, yx: Any, scores: Any,
                         pixel_size_um: float | None) -> Path:
    """Write detections as CSV ``x,y,score`` (plus ``x_um,y_um`` when the pixel size is known).

    Args:
        path: destination ``.csv``; parent folders are created, the file is written atomically.
        yx: (K, 2) detection positions (row, col) in full-resolution input pixels.
        scores: (K,) detection scores in [0, 1].
        pixel_size_um: micrometres per input pixel, or None when unknown (then no micrometre
            columns are written).

    Returns:
        The written path.

    Raises:
        InputDataError: on mismatched shapes, non-finite values or scores outside [0, 1].
    """
    yx, scores = _detections(yx, scores, os.fspath(path))
    fields = ["x", "y", "score"]
    if pixel_size_um is not None:
        fields += ["x_um", "y_um"]
    rows = []
    for (y, x), s in zip(yx, scores):
        row = {"x": _num(x, 3), "y": _num(y, 3), "score": _num(s, 6)}
        if pixel_size_um is not None:
            row["x_um"] = _num(x * pixel_size_um, 4)
            row["y_um"] = _num(y * pixel_size_um, 4)
        rows.append(row)
    write_points_csv(path, rows, fieldnames=fields)
    return Path(path)


def write_detections_geojson(path: str | os.PathLike, yx: Any, scores: Any, *,
                             classification: str = DETECTION_CLASS,
                             properties: Mapping[str, Any] | None = None) -> Path:
    """Write detections as a QuPath-importable GeoJSON FeatureCollection of Point detections.

    Each feature has ``objectType: "detection"``, ``classification: {"name", "color"}`` and the
    score as the measurement ``score``; coordinates are ``[x, y]`` in input pixels.

    Args:
        path: destination ``.geojson``; parent folders are created, the file is written atomically.
        yx: (K, 2) detection positions (row, col) in full-resolution input pixels.
        scores: (K,) detection scores in [0, 1].
        classification: class name shown in QuPath.
        properties: extra JSON-serialisable properties copied onto every feature (QuPath keeps
            but ignores them).

    Returns:
        The written path.

    Raises:
        InputDataError: on mismatched shapes, non-finite values or scores outside [0, 1].
    """
    yx, scores = _detections(yx, scores, os.fspath(path))
    color = class_color(classification) if classification != DETECTION_CLASS else list(DEFAULT_COLORS["mitosis"])
    features = [point_feature(_num(y, 3), _num(x, 3), classification, color=color,
                              measurements={"score": _num(s, 6)}, object_type="detection",
                              properties=properties)
                for (y, x), s in zip(yx, scores)]
    write_geojson_points(path, features)
    return Path(path)


def write_multiple_points(path: str | os.PathLike, yx: Any, scores: Any, pixel_size_um: float,
                          *, name: str = "mitotic figure") -> Path:
    """Write detections as a grand-challenge / MIDOG "Multiple points" JSON (millimetres).

    Layout: ``{"type": "Multiple points", "points": [{"name", "point": [x_mm, y_mm, 0],
    "probability"}], "version": {"major": 1, "minor": 0}}`` with ``x_mm = x * pixel_size_um /
    1000`` (origin at the centre of the top-left pixel, like the pixel coordinates).

    Args:
        path: destination ``.json``; parent folders are created, the file is written atomically.
        yx: (K, 2) detection positions (row, col) in full-resolution input pixels.
        scores: (K,) detection scores in [0, 1], written as ``probability``.
        pixel_size_um: micrometres per input pixel (required: the format is in millimetres).
        name: the ``name`` of every point.

    Returns:
        The written path.

    Raises:
        InputDataError: on mismatched shapes, non-finite values, scores outside [0, 1], or a
            missing / non-positive pixel size.
    """
    if pixel_size_um is None or not math.isfinite(float(pixel_size_um)) or float(pixel_size_um) <= 0:
        raise InputDataError(f"{os.fspath(path)}: the Multiple points format needs a positive pixel size "
                             f"(got {pixel_size_um})",
                             hint="give the slide's pixel size (--mpp) or leave out the midog format")
    yx, scores = _detections(yx, scores, os.fspath(path))
    mm = float(pixel_size_um) / 1000.0
    points = [{"name": name, "point": [_num(x * mm, 7), _num(y * mm, 7), 0],
               "probability": _num(s, 6)}
              for (y, x), s in zip(yx, scores)]
    doc = {"type": "Multiple points", "points": points, "version": {"major": 1, "minor": 0}}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return Path(path)


def _flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into ``outer_inner`` keys (a hotspot dict becomes hotspot_* columns)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        key = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{key}_"))
        elif value is None:
            # A missing nested record (a slide without hotspot) still fills its known columns,
            # so the header is the same whether or not any slide has one.
            known = [c for c in SUMMARY_COLUMNS if c.startswith(f"{key}_")]
            out.update(dict.fromkeys(known or [key], ""))
        else:
            out[key] = value
    return out


def write_summary_csv(path: str | os.PathLike, rows: list[Mapping[str, Any]]) -> Path:
    """Write one row per slide, with a stable column order, atomically.

    Nested mappings are flattened (``{"hotspot": {"count": 3}}`` -> column ``hotspot_count``) and
    None becomes an empty cell. Known columns (:data:`SUMMARY_COLUMNS`) come first in their fixed
    order; other keys follow in order of first appearance, so the header does not depend on which
    slide happens to come first when some lack a field.

    Args:
        path: destination ``.csv``; parent folders are created.
        rows: one mapping per slide.

    Returns:
        The written path.
    """
    flat = [_flatten(row) for row in rows]
    seen: dict[str, None] = {}
    for row in flat:
        seen.update(dict.fromkeys(row))
    # A nested value that is None for every slide (e.g. no hotspot) would otherwise leave an
    # empty "hotspot" column beside the hotspot_* columns of the slides that have one.
    for key in list(seen):
        if any(k.startswith(f"{key}_") for k in seen) and all(row.get(key, "") == "" for row in flat):
            del seen[key]
            for row in flat:
                row.pop(key, None)
    fields = [c for c in SUMMARY_COLUMNS if c in seen] + [c for c in seen if c not in SUMMARY_COLUMNS]
    write_points_csv(path, flat, fieldnames=fields or ["slide"])
    return Path(path)
