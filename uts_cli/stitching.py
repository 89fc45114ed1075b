"""Stitch tile probability maps band by band and find blobs without ever holding the whole map
(numpy + scikit-image). Shared by ``predict`` and ``eval``.

A *band* is the rows owned by one row of tiles (see :mod:`uts_cli.tileplan`). Tiles paste their
owned part into the band buffer; when every kept tile of the band has arrived (and every band
above it is done), the band is thresholded and labelled. A blob that touches the band's last row
may continue below, so its rows are carried into the next band (with every finished blob erased
from the carried rows) and labelled again together with it. Blobs are reported once, when they
are complete, with the centroid, peak score and area that labelling the whole map at once would
give (8-connectivity, as :func:`uts_cli.localize.detections_from_prob`), and in the same
raster-scan order.

Memory: one band (tile-row height x image width, float32) plus the rows carried for open blobs,
plus any band whose tiles arrive early. Tiles skipped as background count as probability 0.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from skimage.measure import label

from uts_cli.localize import Detections
from uts_cli.tileplan import TilePlan


class BandStitcher:
    """Accumulate tiles of one image and collect its detections.

    Args:
        plan: the tile plan (only tiles with ``plan.keep`` are expected).
        threshold: pixel threshold (``prob >= threshold`` is foreground).
        min_area: smallest blob kept, pixels.
        on_band: optional callback ``(y0, band)`` called with each finished band's owned rows
            (float32 ``(h, W)``), e.g. to draw a heatmap; the array is only valid during the call.
    """

    def __init__(self, plan: TilePlan, threshold: float, min_area: int = 1,
                 on_band: Callable[[int, np.ndarray], None] | None = None):
        self.plan = plan
        self.threshold = float(threshold)
        self.min_area = int(min_area)
        self.on_band = on_band
        self._bands: dict[int, np.ndarray] = {}
        self._seen = np.zeros(plan.n_rows, np.int64)
        self._expected = plan.keep.sum(axis=1).astype(np.int64)
        self._next = 0
        self._carry: np.ndarray | None = None      # rows carried from above (erased where done)
        self._carry_y0 = 0
        self._found: list[tuple[np.ndarray, ...]] = []   # (key, y, x, score, area) per band
        self.peak_band_bytes = 0
        self._advance()

    @property
    def done(self) -> bool:
        return self._next >= self.plan.n_rows

    def add(self, row: int, col: int, tile_map: np.ndarray) -> None:
        """Add the probability map ``(P, P)`` of tile ``(row, col)``; finished bands are processed."""
        p = self.plan
        if not p.keep[row, col]:
            raise ValueError(f"tile {(row, col)} is not in the plan")
        y0, x0 = p.tile_origin(row, col)
        (ly, hy), (lx, hx) = p.own_y[row], p.own_x[col]
        band = self._bands.get(row)
        if band is None:
            band = np.zeros((hy - ly, p.width), np.float32)
            self._bands[row] = band
            self.peak_band_bytes = max(self.peak_band_bytes, sum(b.nbytes for b in self._bands.values()))
        band[:, lx:hx] = tile_map[ly - y0:hy - y0, lx - x0:hx - x0]
        self._seen[row] += 1
        self._advance()

    def _advance(self) -> None:
        while self._next < self.plan.n_rows and self._seen[self._next] >= self._expected[self._next]:
            row = self._next
            band = self._bands.pop(row, None)
            ly, hy = (int(v) for v in self.plan.own_y[row])
            if band is None:
                band = np.zeros((hy - ly, self.plan.width), np.float32)
            if self.on_band is not None:
                self.on_band(ly, band)
            self._process(ly, band, last=row == self.plan.n_rows - 1)
            self._next += 1

    def _process(self, y0: int, band: np.ndarray, last: bool) -> None:
        if self._carry is not None:
            y0 = self._carry_y0
            band = np.concatenate([self._carry, band], axis=0)
            self._carry = None
        fg = band >= self.threshold
        if not fg.any():
            return
        labels, n = label(fg, connectivity=2, return_num=True)
        rows, cols = np.nonzero(labels)
        lab = labels[rows, cols]
        area = np.bincount(lab, minlength=n + 1)[1:]
        sy = np.bincount(lab, weights=rows, minlength=n + 1)[1:]
        sx = np.bincount(lab, weights=cols, minlength=n + 1)[1:]
        score = np.full(n + 1, -np.inf)
        np.maximum.at(score, lab, band[rows, cols].astype(np.float64))
        # label() numbers blobs in raster order, so its first pixel is a blob's raster key.
        first = np.full(n + 1, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first, lab, rows.astype(np.int64) * band.shape[1] + cols)
        first = first[1:]
        open_ = np.zeros(n, bool)
        if not last:
            open_[np.unique(labels[-1][labels[-1] > 0]) - 1] = True
        done = ~open_
        if done.any():
            key = (first[done] // band.shape[1] + y0) * band.shape[1] + first[done] % band.shape[1]
            self._found.append((key, sy[done] / area[done] + y0, sx[done] / area[done], score[1:][done],
                                area[done]))
        if open_.any():
            top = int((first[open_] // band.shape[1]).min())
            carry = band[top:].copy()
            # Erase finished blobs from the carried rows so they are not reported twice.
            finished = np.concatenate([[False], done])[labels[top:]]
            carry[finished] = 0.0
            self._carry, self._carry_y0 = carry, y0 + top

    def detections(self) -> Detections:
        """All detections, in image coordinates of the plan, in raster order of their first pixel.

        Raises:
            RuntimeError: when tiles are still missing.
        """
        if not self.done:
            missing = int((self._expected - self._seen).clip(0).sum())
            raise RuntimeError(f"{missing} tiles of the plan were never added")
        if not self._found:
            return Detections.empty()
        key, y, x, score, area = (np.concatenate(a) for a in zip(*self._found))
        keep = area >= self.min_area
        order = np.argsort(key[keep], kind="stable")
        return Detections(np.stack([y, x], axis=1)[keep][order].astype(np.float32),
                          score[keep][order].astype(np.float32), area[keep][order].astype(np.int64))


def stitch_owned(plan: TilePlan, tiles: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    """The whole stitched map at once (reference for tests and small fields; skipped tiles are 0)."""
    out = np.zeros((plan.height, plan.width), np.float32)
    for (r, c), m in tiles.items():
        y0, x0 = plan.tile_origin(r, c)
        (ly, hy), (lx, hx) = plan.own_y[r], plan.own_x[c]
        out[ly:hy, lx:hx] = m[ly - y0:hy - y0, lx - x0:hx - x0]
    return out


class LowresMax:
    """Block-maximum of finished bands onto a low-resolution grid (a heatmap for the thumbnail).

    Args:
        shape: ``(h, w)`` of the low-resolution grid.
        scale: low-resolution pixels per band pixel.
    """

    def __init__(self, shape: tuple[int, int], scale: float):
        self.map = np.zeros(tuple(int(v) for v in shape), np.float32)
        self.scale = float(scale)

    def _groups(self, start: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.clip(np.floor((start + np.arange(n) + 0.5) * self.scale).astype(np.int64), 0, size - 1)
        firsts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
        return idx[firsts], firsts

    def add(self, y0: int, band: np.ndarray) -> None:
        """Fold the rows ``y0 ..`` of ``band`` into the map (max over each low-resolution cell)."""
        if band.size == 0 or self.map.size == 0:
            return
        rows, rstart = self._groups(y0, band.shape[0], self.map.shape[0])
        cols, cstart = self._groups(0, band.shape[1], self.map.shape[1])
        block = np.maximum.reduceat(np.maximum.reduceat(band, rstart, axis=0), cstart, axis=1)
        cells = np.ix_(rows, cols)
        self.map[cells] = np.maximum(self.map[cells], block)
