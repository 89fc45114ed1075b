"""Write detections and review lists as CSV or QuPath-importable GeoJSON (stdlib + numpy).

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
