"""Clinical read-outs of a slide's detections: mitotic count, density and the hotspot (numpy only).

Coordinates follow the rest of ``uts``: detections are (row, col) in pixels of the full-resolution
input image with pixel centres at integers, so the image covers ``[-0.5, H - 0.5) x [-0.5, W - 0.5)``.

The hotspot is the square window of a given area (default 2.37 mm^2: ten high-power fields of
0.237 mm^2, the MIDOG definition) that holds the most detections. A window with top-left corner
``(y0, x0)`` and side ``s`` is half-open: it holds a detection at ``(y, x)`` when
``y0 <= y < y0 + s`` and ``x0 <= x < x0 + s`` (top and left edges included, bottom and right
excluded), and it always lies inside the image.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from uts_cli.errors import InputDataError, UsageError

#: Ten high-power fields of 0.237 mm^2 each (MIDOG's hotspot area).
DEFAULT_HOTSPOT_AREA_MM2 = 2.37


@dataclass(frozen=True)
class Hotspot:
    """The densest square window of detections.

    Attributes:
        y0: top edge of the window, input pixels (same frame as the detections; -0.5 is the
            image's top border).
        x0: left edge of the window, input pixels (-0.5 is the image's left border).
        side_px: requested side of the square in input pixels.
        count: detections inside the window (half-open: top/left edges in, bottom/right out).
        area_mm2: area of the window actually used; smaller than requested when the image is
            smaller than the window on a side (the window is then clipped to the image).
        height_px: window height actually used (``min(side_px, image height)``; defaults to
            ``side_px``).
        width_px: window width actually used (``min(side_px, image width)``; defaults to
            ``side_px``).
    """

    y0: float
    x0: float
    side_px: float
    count: int
    area_mm2: float
    height_px: float = math.nan
    width_px: float = math.nan

    def __post_init__(self) -> None:
        # Built by hand without the used sides: the full square was used.
        for name in ("height_px", "width_px"):
            if not math.isfinite(getattr(self, name)):
                object.__setattr__(self, name, float(self.side_px))

    @property
    def density_per_mm2(self) -> float:
        """Detections per mm^2 inside the window."""
        return self.count / self.area_mm2 if self.area_mm2 > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (floats rounded to 1/1000 px and 1e-6 mm^2)."""
        d = asdict(self)
        for key in ("y0", "x0", "side_px", "height_px", "width_px"):
            d[key] = round(float(d[key]), 3)
        d["area_mm2"] = round(float(d["area_mm2"]), 6)
        d["density_per_mm2"] = round(self.density_per_mm2, 4)
        return d


@dataclass(frozen=True)
class ClinicalSummary:
    """Count, density and hotspot of one slide.

    Attributes:
        count: number of detections.
        tissue_area_mm2: tissue area the density refers to, or None when unknown.
        density_per_mm2: ``count / tissue_area_mm2``, or None when the area is unknown or zero.
        hotspot: the densest window, or None when there are no detections or no pixel size.
    """

    count: int
    tissue_area_mm2: float | None
    density_per_mm2: float | None
    hotspot: Hotspot | None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; ``hotspot`` is a nested dict or None."""
        return {
            "count": int(self.count),
            "tissue_area_mm2": None if self.tissue_area_mm2 is None else round(self.tissue_area_mm2, 6),
            "density_per_mm2": None if self.density_per_mm2 is None else round(self.density_per_mm2, 4),
            "hotspot": None if self.hotspot is None else self.hotspot.to_dict(),
        }


def _check_pixel_size(pixel_size_um: float) -> float:
    value = float(pixel_size_um)
    if not math.isfinite(value) or value <= 0:
        raise InputDataError(f"pixel size must be a positive number of micrometres, got {pixel_size_um}",
                             hint="give the slide's pixel size with --mpp")
    return value


def _check_area(area_mm2: float) -> float:
    value = float(area_mm2)
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--hotspot-area must be a positive area in mm^2, got {area_mm2}",
                         hint=f"the default is {DEFAULT_HOTSPOT_AREA_MM2} (ten 0.237 mm^2 high-power fields)")
    return value


def _points(yx: Any) -> np.ndarray:
    pts = np.asarray(yx, dtype=np.float64)
    if pts.size == 0:
        return pts.reshape(0, 2)
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise InputDataError(f"detections must be finite (K, 2) rows of (y, x), got shape {pts.shape}",
                             hint="pass one (row, col) pair per detection")
    return pts


def _window_starts(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Candidate window starts: each point's coordinate clamped into the allowed range."""
    return np.unique(np.minimum(np.maximum(values, lo), hi))


def count_in_window(yx: Any, y0: float, x0: float, height: float, width: float) -> int:
    """Number of detections in the half-open window ``[y0, y0+height) x [x0, x0+width)``."""
    pts = _points(yx)
    y, x = pts[:, 0], pts[:, 1]
    return int(np.count_nonzero((y0 <= y) & (y < y0 + height) & (x0 <= x) & (x < x0 + width)))


def find_hotspot(yx: Any, image_hw: tuple[int, int], pixel_size_um: float,
                 area_mm2: float = DEFAULT_HOTSPOT_AREA_MM2) -> Hotspot | None:
    """Find the square window of ``area_mm2`` inside the image that holds the most detections.

    Exact maximum, at most O(K * U) numpy work for K detections and U distinct candidate rows
    (0.2-0.6 s for 20,000 points on one busy core). Why the candidates suffice: slide an optimal
    window right until its left edge meets the leftmost point it holds (or the image's right
    limit); it loses no point because the left edge is closed and the right edge only moves
    outward. Doing the same downwards, some optimal window starts at (clamped) point coordinates
    on both axes. The sweep walks the candidate left edges in order, keeping for every candidate
    top edge the count of points in the current vertical strip (a range add per point entering
    or leaving); the best top edge is a max over that array, searched only where a point just
    entered. Ties go to the smallest x0, then the smallest y0.

    Args:
        yx: (K, 2) detections (row, col) in full-resolution input pixels.
        image_hw: (height, width) of the input image in pixels.
        pixel_size_um: micrometres per input pixel.
        area_mm2: window area in mm^2 (side = sqrt(area) mm).

    Returns:
        The hotspot, or None when there are no detections inside the image.

    Raises:
        InputDataError: on a non-positive pixel size, bad image size or malformed detections.
        UsageError: on a non-positive area.
    """
    px_um = _check_pixel_size(pixel_size_um)
    area = _check_area(area_mm2)
    h, w = (int(v) for v in image_hw)
    if h <= 0 or w <= 0:
        raise InputDataError(f"image size must be positive, got {h} x {w}", hint="check the input image")
    pts = _points(yx)
    side = math.sqrt(area) * 1000.0 / px_um
    sy, sx = min(side, float(h)), min(side, float(w))
    lo_y, lo_x = -0.5, -0.5
    hi_y, hi_x = h - 0.5 - sy, w - 0.5 - sx
    inside = (pts[:, 0] >= lo_y) & (pts[:, 0] < h - 0.5) & (pts[:, 1] >= lo_x) & (pts[:, 1] < w - 0.5)
    pts = pts[inside]
    if len(pts) == 0:
        return None

    ys = _window_starts(pts[:, 0], lo_y, hi_y)        # candidate top edges, sorted
    # Point p is in a window starting at ys[j] iff ys[j] <= y_p < ys[j] + sy, i.e. j in [a_p, b_p).
    # The same float expressions as count_in_window, so the sweep and a direct count agree.
    a = np.searchsorted(ys + sy, pts[:, 0], side="right")
    b = np.searchsorted(ys, pts[:, 0], side="right")

    order = np.argsort(pts[:, 1], kind="stable")
    px, a, b = pts[order, 1], a[order], b[order]
    cov = np.zeros(len(ys), dtype=np.int32)
    n = len(px)
    enter = leave = 0
    best = (-1, 0.0, 0.0)
    for x0 in _window_starts(px, lo_x, hi_x):
        first = enter
        while enter < n and px[enter] < x0 + sx:
            cov[a[enter]:b[enter]] += 1
            enter += 1
        while leave < n and px[leave] < x0:
            cov[a[leave]:b[leave]] -= 1
            leave += 1
        # A window holding none of the points that just entered is a subset of a window of the
        # previous strip, so it cannot beat the best so far: only search the entrants' rows.
        if enter > first:
            j0, j1 = int(a[first:enter].min()), int(b[first:enter].max())
            if j1 > j0:
                j = j0 + int(np.argmax(cov[j0:j1]))
                if cov[j] > best[0]:
                    best = (int(cov[j]), float(ys[j]), float(x0))
    count, y0, x0 = best
    um2_per_mm2 = 1e6
    return Hotspot(y0=y0, x0=x0, side_px=side, count=count,
                   area_mm2=sy * sx * px_um * px_um / um2_per_mm2, height_px=sy, width_px=sx)


def clinical_summary(yx: Any, image_hw: tuple[int, int], pixel_size_um: float | None,
                     tissue_area_px: float | None,
                     hotspot_area_mm2: float = DEFAULT_HOTSPOT_AREA_MM2) -> ClinicalSummary:
    """Mitotic count, density per mm^2 of tissue and the hotspot of one slide.

    Args:
        yx: (K, 2) detections (row, col) in full-resolution input pixels.
        image_hw: (height, width) of the input image in pixels.
        pixel_size_um: micrometres per input pixel, or None when unknown (then no density and no
            hotspot: both need physical units).
        tissue_area_px: tissue area in input pixels (e.g. from the tissue mask), or None.
        hotspot_area_mm2: hotspot window area in mm^2.

    Returns:
        The summary. ``density_per_mm2`` is None when the tissue area or pixel size is unknown or
        the tissue area is zero; ``hotspot`` is None without detections or pixel size.
    """
    pts = _points(yx)
    _check_area(hotspot_area_mm2)
    tissue_mm2 = None
    density = None
    hotspot = None
    if pixel_size_um is not None:
        px_um = _check_pixel_size(pixel_size_um)
        if tissue_area_px is not None:
            tissue_mm2 = float(tissue_area_px) * px_um * px_um / 1e6
            if tissue_mm2 > 0:
                density = len(pts) / tissue_mm2
        if len(pts):
            hotspot = find_hotspot(pts, image_hw, px_um, hotspot_area_mm2)
    return ClinicalSummary(count=len(pts), tissue_area_mm2=tissue_mm2, density_per_mm2=density,
                           hotspot=hotspot)
