"""Where the tiles of a field or slide go, which pixels each tile owns, and which to skip (numpy only).

Tiles are squares of the model's input size ``P``. Two layouts:

* **overlap 0** is exactly the grid ``uts prepare`` cuts for a store: tiles at ``0, P, 2P, ...``
  with the last one padded with white past the border. Predict with this layout sees the same
  pixels as ``eval`` on the store, so the two give the same detections.
* **overlap > 0** steps by ``P - overlap`` and shifts the last tile back to end at the border, so
  no tile is padded unless the image is smaller than a tile.

Ownership: where tiles overlap, each pixel takes its value from the tile whose centre is nearest
along each axis (the "most central" rule). A CNN's CAM near a tile border is computed on zero
padding and differs from the CAM with more context; the most central tile keeps every owned pixel
at least ``overlap / 2`` away from a tile border inside the image. Because ownership depends only
on the layout, reading an image as one field or tile by tile gives the same stitched map.
With overlap 0 the owned part of a tile is the tile itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from uts_cli.errors import UsageError


def axis_starts(length: int, tile: int, overlap: int) -> np.ndarray:
    """Tile start offsets along one axis.

    Args:
        length: image size along the axis, pixels (>= 1).
        tile: tile side, pixels (>= 1).
        overlap: pixels shared by neighbouring tiles (0 <= overlap < tile).

    Returns:
        int64 starts. Overlap 0: ``0, P, 2P, ...`` (the store's grid, last tile padded). Otherwise
        steps of ``tile - overlap`` and a last tile ending exactly at ``length``.

    Raises:
        UsageError: when the sizes are out of range.
    """
    if length < 1 or tile < 1:
        raise UsageError(f"tile plan needs a positive length and tile size (got {length}, {tile})",
                         hint="check the image and the run's input size")
    if not 0 <= overlap < tile:
        raise UsageError(f"--overlap must be in 0..{tile - 1} pixels for {tile} px tiles (got {overlap})",
                         hint="use a smaller --overlap")
    if overlap == 0 or length <= tile:
        return np.arange(0, length, tile, dtype=np.int64)
    step = tile - overlap
    n = math.ceil((length - tile) / step) + 1
    starts = np.arange(n, dtype=np.int64) * step
    starts[-1] = length - tile
    return np.unique(starts)


def axis_ownership(starts: np.ndarray, tile: int, length: int) -> np.ndarray:
    """Owned interval ``[lo, hi)`` of each tile along one axis (the most-central rule).

    Cuts lie halfway between consecutive tile centres, so a pixel belongs to the tile whose centre
    is nearest (ties go to the later tile). With touching tiles the cuts are the tile borders.

    Returns:
        int64 array (n, 2) of ``lo, hi``; consecutive intervals tile ``[0, length)``.
    """
    starts = np.asarray(starts, np.int64)
    # centre_i + centre_{i+1} over 2 = (s_i + s_{i+1} + tile) / 2; floor keeps integer pixels.
    cuts = (starts[:-1] + starts[1:] + tile) // 2
    lo = np.concatenate([[0], cuts])
    hi = np.concatenate([cuts, [length]])
    return np.stack([lo, hi], axis=1)


@dataclass(frozen=True)
class TilePlan:
    """Tiles over an image, in row-major order, with the pixels each one owns.

    Attributes:
        height, width: image size in pixels (at the resolution the model sees).
        tile: tile side.
        overlap: pixels shared by neighbours.
        ys, xs: start offsets of the tile rows / columns.
        own_y, own_x: (n, 2) owned ``[lo, hi)`` per tile row / column.
        keep: (n_rows, n_cols) bool, False for tiles skipped as background.
    """

    height: int
    width: int
    tile: int
    overlap: int
    ys: np.ndarray
    xs: np.ndarray
    own_y: np.ndarray
    own_x: np.ndarray
    keep: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.ys)

    @property
    def n_cols(self) -> int:
        return len(self.xs)

    @property
    def n_tiles(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())

    def origins(self, kept_only: bool = True) -> np.ndarray:
        """(N, 3) int64 rows ``(row, col, flat)`` of tiles in row-major order (kept ones by default)."""
        rr, cc = np.nonzero(self.keep) if kept_only else np.indices(self.keep.shape).reshape(2, -1)
        return np.stack([rr, cc, rr * self.n_cols + cc], axis=1).astype(np.int64)

    def tile_origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left ``(y, x)`` of a tile."""
        return int(self.ys[row]), int(self.xs[col])

    def kept_in_row(self, row: int) -> int:
        return int(self.keep[row].sum())

    def skipped_area_fraction(self) -> float:
        """Share of the image area owned by skipped tiles."""
        hy = np.diff(self.own_y, axis=1)[:, 0].astype(np.float64)
        wx = np.diff(self.own_x, axis=1)[:, 0].astype(np.float64)
        area = np.outer(hy, wx)
        return float(area[~self.keep].sum() / area.sum())

    def with_keep(self, keep: np.ndarray) -> "TilePlan":
        keep = np.asarray(keep, bool).reshape(self.n_rows, self.n_cols)
        return TilePlan(self.height, self.width, self.tile, self.overlap, self.ys, self.xs,
                        self.own_y, self.own_x, keep)


def plan_tiles(height: int, width: int, tile: int, overlap: int = 0) -> TilePlan:
    """Tile plan covering an image, every tile kept.

    Args:
        height: image height, pixels.
        width: image width, pixels.
        tile: tile side (the run's input size).
        overlap: pixels shared by neighbouring tiles; 0 reproduces the store grid of ``prepare``.

    Returns:
        The :class:`TilePlan`.

    Raises:
        UsageError: sizes out of range.
    """
    ys = axis_starts(int(height), int(tile), int(overlap))
    xs = axis_starts(int(width), int(tile), int(overlap))
    return TilePlan(int(height), int(width), int(tile), int(overlap), ys, xs,
                    axis_ownership(ys, tile, height), axis_ownership(xs, tile, width),
                    np.ones((len(ys), len(xs)), bool))


def keep_tissue(plan: TilePlan, mask: np.ndarray, scale: float, min_fraction: float = 0.0,
                dilate: int = 1) -> TilePlan:
    """Mark tiles whose owned area holds (almost) no tissue as skipped.

    Args:
        plan: the plan (coordinates at the resolution of ``scale``'s full-resolution side).
        mask: bool (mh, mw) low-resolution tissue mask.
        scale: mask pixels per plan pixel.
        min_fraction: a tile is kept when the tissue share of its owned area is above this
            (0: any tissue pixel).
        dilate: grow the mask by this many mask pixels first, so a mitosis at the edge of a
            tissue fragment is not lost to the coarse mask.

    Returns:
        A new plan with ``keep`` set.
    """
    m = np.asarray(mask, bool)
    if dilate > 0 and m.any():
        from scipy.ndimage import binary_dilation

        m = binary_dilation(m, iterations=int(dilate))
    # Summed-area table: each tile's tissue count in O(1).
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
    sat[1:, 1:] = m.cumsum(0).cumsum(1)

    def span(lo, hi, size):
        a = np.clip(np.floor(lo * scale).astype(np.int64), 0, size)
        b = np.clip(np.ceil(hi * scale).astype(np.int64), 0, size)
        return a, np.maximum(b, np.minimum(a + 1, size))

    ya, yb = span(plan.own_y[:, 0], plan.own_y[:, 1], m.shape[0])
    xa, xb = span(plan.own_x[:, 0], plan.own_x[:, 1], m.shape[1])
    count = (sat[yb[:, None], xb[None, :]] - sat[ya[:, None], xb[None, :]]
             - sat[yb[:, None], xa[None, :]] + sat[ya[:, None], xa[None, :]])
    area = np.maximum((yb - ya)[:, None] * (xb - xa)[None, :], 1)
    return plan.with_keep(count / area > min_fraction)
