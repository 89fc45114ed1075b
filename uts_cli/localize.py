"""Turn CAM probability maps into scored points, merge duplicates, stitch patch maps (numpy,
scipy, scikit-image only).

Points are ``(y, x)`` = (row, col) float32 pixel coordinates, pixel centres at integers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.spatial import cKDTree
from skimage.feature import peak_local_max
from skimage.measure import label

from uts_cli.errors import InputDataError, UsageError


@dataclass(frozen=True)
class Detections:
    """Scored points found in one map.

    Attributes:
        yx: ``(K, 2)`` float32 centroids (row, col) in pixels.
        score: ``(K,)`` float32 confidence (the maximum probability of the blob or the peak value).
        area: ``(K,)`` int64 blob area in pixels (0 for peak detections, which have no extent).
    """

    yx: np.ndarray
    score: np.ndarray
    area: np.ndarray

    def __len__(self) -> int:
        return int(len(self.score))

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def take(self, index) -> "Detections":
        """Detections at ``index`` (an int array or a bool mask)."""
        return Detections(self.yx[index], self.score[index], self.area[index])

    def shifted(self, origin_yx: Sequence[float]) -> "Detections":
        """Detections moved by ``origin_yx`` (e.g. from patch to field coordinates)."""
        offset = np.asarray(origin_yx, dtype=np.float32).reshape(1, 2)
        return Detections(self.yx + offset, self.score, self.area)


def concat_detections(parts: Iterable[Detections]) -> Detections:
    """Concatenate several :class:`Detections` into one.

    Args:
        parts: detections to join, in order.

    Returns:
        One :class:`Detections` holding all points (empty if ``parts`` is empty).
    """
    parts = list(parts)
    if not parts:
        return Detections.empty()
    return Detections(
        np.concatenate([p.yx for p in parts]).astype(np.float32, copy=False),
        np.concatenate([p.score for p in parts]).astype(np.float32, copy=False),
        np.concatenate([p.area for p in parts]).astype(np.int64, copy=False),
    )


def _as_map(prob, name: str = "probability map") -> np.ndarray:
    arr = np.asarray(prob)
    if arr.ndim != 2:
        raise InputDataError(f"{name}: expected a 2-D (H, W) array, got shape {arr.shape}",
                             hint="pass one single-channel map per image")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    return arr


def _check_min_area(min_area: int) -> None:
    if min_area < 1:
        raise UsageError(f"min_area must be >= 1 pixel, got {min_area}", hint="use a minimum area of at least 1 pixel")


def detections_from_prob(prob, threshold: float, min_area: int = 1) -> Detections:
    """Threshold a probability map and return one point per connected blob (the original method).

    Pixels with ``prob >= threshold`` are grouped into 8-connected components; each component of at
    least ``min_area`` pixels gives its centroid (mean row, mean col of its pixels, as
    ``skimage.measure.regionprops`` computes it), its maximum probability as score, and its area.

    Args:
        prob: ``(H, W)`` probability map (sigmoid of the CAM), values in [0, 1].
        threshold: pixel threshold, usually the run's image-level validation threshold.
        min_area: smallest blob kept, in pixels.

    Returns:
        :class:`Detections` in label (raster-scan) order.

    Raises:
        InputDataError: when ``prob`` is not 2-D.
        UsageError: when ``min_area`` < 1.
    """
    prob = _as_map(prob)
    _check_min_area(min_area)
    labels, n = label(prob >= threshold, connectivity=2, return_num=True)
    if n == 0:
        return Detections.empty()
    # Work on foreground pixels only: full-size index grids would cost GBs on a whole HPF.
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    area = np.bincount(lab, minlength=n + 1)[1:]
    cy = np.bincount(lab, weights=rows, minlength=n + 1)[1:] / area
    cx = np.bincount(lab, weights=cols, minlength=n + 1)[1:] / area
    score = np.full(n + 1, -np.inf)
    np.maximum.at(score, lab, prob[rows, cols].astype(np.float64))
    keep = area >= min_area
    return Detections(
        yx=np.stack([cy, cx], axis=1)[keep].astype(np.float32),
        score=score[1:][keep].astype(np.float32),
        area=area[keep].astype(np.int64),
    )


def detections_at_thresholds(prob, thresholds, min_area: int = 1) -> list[Detections]:
    """:func:`detections_from_prob` at every threshold of a sweep, summing each pixel once.

    The blobs at a higher threshold nest inside those at a lower one, so a blob's area, pixel-row
    and pixel-column sums and maximum are those of its own pixels that first pass at this
    threshold plus those of the blobs it swallows. Walking the thresholds from the highest down,
    each pixel is summed at one threshold only; only the labelling (fast, in C) is repeated. The
    sums are of whole numbers, so they are exact and the detections equal, bit for bit, those of
    :func:`detections_from_prob` at each threshold with ``prob >= threshold`` compared in the
    map's dtype (as a Python float threshold is). Each level is labelled on its foreground with
    runs of empty rows and columns squeezed to one (see :func:`_label_squeezed`). The validation
    sweep scores 25 thresholds a field this way, several times faster than one
    :func:`detections_from_prob` each (``benchmarks/bench_sweep.py``).

    Args:
        prob: ``(H, W)`` probability map; NaN is never foreground.
        thresholds: pixel thresholds, in any order.
        min_area: smallest blob kept, in pixels.

    Returns:
        One :class:`Detections` per threshold, in the order given, each in raster-scan order.

    Raises:
        InputDataError: when ``prob`` is not 2-D.
        UsageError: when ``min_area`` < 1.
    """
    prob = _as_map(prob)
    _check_min_area(min_area)
    given = np.asarray(thresholds, np.float64).ravel().astype(prob.dtype)
    levels = np.unique(given)
    width = prob.shape[1]
    values = prob.ravel()
    # passes[i]: how many levels pixel i reaches (it is foreground at levels[:passes[i]]).
    passes = np.searchsorted(levels, values, side="right").astype(np.int32)
    passes[np.isnan(values)] = 0
    passes = passes.reshape(prob.shape)
    flat_passes = passes.ravel()
    lit = np.flatnonzero(flat_passes)
    # Lit pixels grouped by the highest level they reach, in raster order within a group.
    lit = lit[np.argsort(flat_passes[lit], kind="stable")]
    bounds = np.searchsorted(flat_passes[lit], np.arange(1, len(levels) + 2))
    out: list[Detections] = [Detections.empty()] * len(levels)
    inner = None        # per-blob (area, row sum, col sum, max, first pixel) one level up
    for k in range(len(levels) - 1, -1, -1):
        label_at, n = _label_squeezed(passes > k)
        if n == 0:
            inner = None
            continue
        new = lit[bounds[k]:bounds[k + 1]]
        new_row, new_col = np.divmod(new, width)
        lab = label_at(new_row, new_col)
        area = _label_sums(lab, None, n)
        sy = _label_sums(lab, new_row, n)
        sx = _label_sums(lab, new_col, n)
        score = np.full(n + 1, -np.inf)
        np.maximum.at(score, lab, values[new].astype(np.float64))
        first = np.full(n + 1, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first, lab, new)
        if inner is not None:
            i_area, i_sy, i_sx, i_score, i_first = inner
            parent = label_at(*np.divmod(i_first, width))
            area += _label_sums(parent, i_area, n)
            sy += _label_sums(parent, i_sy, n)
            sx += _label_sums(parent, i_sx, n)
            np.maximum.at(score, parent, i_score)
            np.minimum.at(first, parent, i_first)
        inner = (area[1:], sy[1:], sx[1:], score[1:], first[1:])
        keep = area[1:] >= min_area
        out[k] = Detections(
            yx=np.stack([sy[1:] / area[1:], sx[1:] / area[1:]], axis=1)[keep].astype(np.float32),
            score=score[1:][keep].astype(np.float32),
            area=area[1:][keep].astype(np.int64),
        )
    return [out[int(i)] for i in np.searchsorted(levels, given)]


def _label_squeezed(foreground: np.ndarray):
    """8-connected labels of ``foreground`` as ``(label_at, n)``; ``label_at(rows, cols)`` gives the
    labels of foreground pixels by their row and column in the full map.

    The labelling runs on the map with every run of empty rows cut to one empty row, and the same
    for columns: an 8-connected blob cannot cross an empty row or column, and the cut keeps rows
    and columns in order, so blobs and their raster-order numbers are those of the full map. A
    thresholded CAM is mostly empty: on a teacher's validation maps the squeezed maps held 9 % of
    the pixels over the sweep's levels, and labelling took a third of the time.
    """
    rows, cols = _kept_lines(foreground.any(axis=1)), _kept_lines(foreground.any(axis=0))
    if not rows.size:
        return None, 0
    labels, n = label(foreground[np.ix_(rows, cols)], connectivity=2, return_num=True)
    row_at = np.zeros(foreground.shape[0], np.int64)
    row_at[rows] = np.arange(rows.size)
    col_at = np.zeros(foreground.shape[1], np.int64)
    col_at[cols] = np.arange(cols.size)

    def label_at(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return labels[row_at[r], col_at[c]]

    return label_at, n


def _kept_lines(occupied: np.ndarray) -> np.ndarray:
    """Indices of the occupied lines and of the first empty line after each occupied run."""
    after_occupied = np.concatenate([[False], occupied[:-1]])
    return np.flatnonzero(occupied | after_occupied)


def _label_sums(lab: np.ndarray, weights: np.ndarray | None, n: int) -> np.ndarray:
    """Per-label sums (counts without weights) as float64 for labels 0..n (bincount gives int64 on empty input)."""
    return np.bincount(lab, weights=None if weights is None else weights.astype(np.float64),
                       minlength=n + 1).astype(np.float64, copy=False)


def peaks_from_prob(prob, threshold: float, min_distance: int) -> Detections:
    """Local maxima of a probability map as detections (alternative to blob centroids).

    Uses ``skimage.feature.peak_local_max`` with ``exclude_border=False`` so a peak on the image
    border is kept (tiled inference needs it; the default would drop it). Peaks must satisfy
    ``prob >= threshold``, as in :func:`detections_from_prob`. A perfectly flat map has no peak.

    Args:
        prob: ``(H, W)`` probability map.
        threshold: minimum peak value.
        min_distance: minimum separation of peaks, in pixels (>= 1).

    Returns:
        :class:`Detections` sorted by descending score; ``area`` is 0.

    Raises:
        InputDataError: when ``prob`` is not 2-D.
        UsageError: when ``min_distance`` < 1.
    """
    prob = _as_map(prob)
    if min_distance < 1:
        raise UsageError(f"min_distance must be >= 1 pixel, got {min_distance}",
                         hint="use a peak distance of at least 1 pixel")
    # peak_local_max keeps values strictly above threshold_abs; step one ulp down for `>=`.
    below = np.nextafter(np.float64(threshold), -np.inf)
    coords = peak_local_max(prob, min_distance=int(min_distance), threshold_abs=below,
                            exclude_border=False)
    if len(coords) == 0:
        return Detections.empty()
    return Detections(
        yx=coords.astype(np.float32),
        score=prob[coords[:, 0], coords[:, 1]].astype(np.float32),
        area=np.zeros(len(coords), np.int64),
    )


def nms_points(yx, scores, radius: float) -> np.ndarray:
    """Greedy distance non-maximum suppression of points.

    Points are visited by descending score (ties: lower index first); each kept point suppresses
    every not-yet-kept point within ``radius`` (distance ``<= radius``). Used to merge duplicate
    detections of one object found in two adjacent tiles.

    Args:
        yx: ``(N, 2)`` points.
        scores: ``(N,)`` scores.
        radius: suppression radius in pixels.

    Returns:
        Sorted int64 indices of the kept points.

    Raises:
        InputDataError: when shapes disagree.
        UsageError: when ``radius`` is negative.
    """
    pts = np.asarray(yx, dtype=np.float64).reshape(-1, 2) if np.size(yx) else np.zeros((0, 2))
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(pts) != len(scores):
        raise InputDataError(f"nms_points: {len(pts)} points but {len(scores)} scores",
                             hint="pass one score per point")
    if radius < 0:
        raise UsageError(f"NMS radius must be >= 0, got {radius}", hint="use a radius in pixels")
    if len(pts) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    neighbours = cKDTree(pts).query_ball_point(pts, r=float(radius))
    suppressed = np.zeros(len(pts), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[neighbours[i]] = True
    return np.sort(np.asarray(keep, dtype=np.int64))


def stitch_region(tiles: Iterable[tuple[Sequence[int], np.ndarray]], shape: Sequence[int],
                  fill: float = 0.0, dtype=np.float32) -> np.ndarray:
    """Paste per-patch maps back into one field map.

    Each tile is placed with its top-left corner at ``origin_yx``; parts outside the field (the last
    tile of a field is padded beyond its border) are cropped. Overlapping pixels take the maximum.
    Pixels no tile covers get ``fill``.

    Args:
        tiles: iterable of ``(origin_yx, tile_map)`` with ``tile_map`` of shape ``(h, w)``.
        shape: ``(H, W)`` of the field.
        fill: value for uncovered pixels.
        dtype: output dtype.

    Returns:
        ``(H, W)`` array.

    Raises:
        InputDataError: when a tile is not 2-D or lies entirely outside the field.
    """
    height, width = (int(v) for v in shape)
    out = np.full((height, width), -np.inf, dtype=dtype)
    covered = np.zeros((height, width), dtype=bool)
    for origin, tile in tiles:
        tile = np.asarray(tile)
        if tile.ndim != 2:
            raise InputDataError(f"tile at {tuple(origin)}: expected a 2-D map, got shape {tile.shape}",
                                 hint="pass single-channel patch maps")
        y0, x0 = (int(v) for v in origin)
        h, w = tile.shape
        ys, ye = max(y0, 0), min(y0 + h, height)
        xs, xe = max(x0, 0), min(x0 + w, width)
        if ys >= ye or xs >= xe:
            raise InputDataError(
                f"tile at {(y0, x0)} of size {(h, w)} lies outside the {height} x {width} field",
                hint="the patch origins do not belong to this field; check the store",
            )
        src = tile[ys - y0:ye - y0, xs - x0:xe - x0]
        np.maximum(out[ys:ye, xs:xe], src, out=out[ys:ye, xs:xe])
        covered[ys:ye, xs:xe] = True
    out[~covered] = fill
    return out
