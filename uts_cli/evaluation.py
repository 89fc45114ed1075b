"""Localization scoring from CAM probability maps, at patch and at region level (numpy only).

Region level is how the original reports its final numbers: the patch maps of a field are put back
together, detections are found on the whole field (so a mitosis cut by a tile border is one blob,
not two), and matched against every point of that field. The putting together is banded (see
:mod:`uts_cli.stitching`), so a whole-slide field is never held in memory at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from uts_cli.localize import Detections, detections_from_prob
from uts_cli.metrics import Counts, MatchResult, match
from uts_cli.stitching import BandStitcher


@dataclass
class Scored:
    """Detections of one map matched against its true points."""

    detections: Detections
    truth_yx: np.ndarray
    result: MatchResult

    @property
    def counts(self) -> Counts:
        return self.result.counts


def score_map(prob: np.ndarray, threshold: float, truth_yx: np.ndarray, radius: float,
              matching: str = "one-to-one", min_area: int = 1) -> Scored:
    """Detect blobs in one probability map and match them to the true points.

    Args:
        prob: (H, W) probabilities.
        threshold: pixel threshold on ``prob``.
        truth_yx: (T, 2) true points in the map's coordinates.
        radius: matching radius in pixels.
        matching: "one-to-one" or "legacy".
        min_area: smallest blob kept, in pixels.

    Returns:
        The detections with their match result.
    """
    dets = detections_from_prob(prob, threshold, min_area=min_area)
    truth = np.asarray(truth_yx, np.float32).reshape(-1, 2)
    return Scored(dets, truth, match(dets.yx, truth, radius, mode=matching))


def match_rows(image_id: str, scored: Scored, offset=(0.0, 0.0), extra: dict | None = None) -> list[dict]:
    """One CSV row per detection (TP/FP) and per missed point (FN), in field coordinates."""
    extra = extra or {}
    res, dets = scored.result, scored.detections
    partner = np.full(len(dets), -1)
    dist = np.full(len(dets), np.nan)
    if len(res.pairs):
        partner[res.pairs[:, 0]] = res.pairs[:, 1]
        dist[res.pairs[:, 0]] = res.distances
    oy, ox = float(offset[0]), float(offset[1])
    rows = []
    for k in range(len(dets)):
        rows.append({"image": image_id, **extra, "status": "TP" if res.pred_matched[k] else "FP",
                     "y": round(float(dets.yx[k, 0]) + oy, 2), "x": round(float(dets.yx[k, 1]) + ox, 2),
                     "score": round(float(dets.score[k]), 4), "area": int(dets.area[k]),
                     "distance": "" if np.isnan(dist[k]) else round(float(dist[k]), 2)})
    for t in np.flatnonzero(~res.true_matched):
        rows.append({"image": image_id, **extra, "status": "FN",
                     "y": round(float(scored.truth_yx[t, 0]) + oy, 2),
                     "x": round(float(scored.truth_yx[t, 1]) + ox, 2), "score": "", "area": "", "distance": ""})
    return rows


def score_detections(dets: Detections, truth_yx: np.ndarray, radius: float,
                     matching: str = "one-to-one") -> Scored:
    """Match detections found elsewhere (e.g. by the banded stitcher) to the true points."""
    truth = np.asarray(truth_yx, np.float32).reshape(-1, 2)
    return Scored(dets, truth, match(dets.yx, truth, radius, mode=matching))


class RegionStitcher:
    """Region-level detections of store fields from per-patch maps, band by band.

    Patches may arrive in any order (in store order each field's bands complete one after
    another, so only one band per open field is held). A field is released, with its detections
    in field coordinates, as soon as all of its patches in ``patch_indices`` have been seen. This
    is the machinery ``predict`` uses (:class:`uts_cli.stitching.BandStitcher` over the store grid,
    overlap 0), so a whole-slide field never exists as one array.

    Args:
        image_idx_of_patch: store ``image_idx`` per patch.
        origin: store ``origin`` ``(N, 2)`` per patch.
        shapes: store ``image_shape`` per image.
        patch_size: the store's patch side.
        patch_indices: every patch that will be added (fields not fully covered by them, e.g.
            whole slides with background tiles dropped, count missing tiles as 0).
        threshold: pixel threshold.
        min_area: smallest blob kept, pixels.
    """

    def __init__(self, image_idx_of_patch: np.ndarray, origin: np.ndarray, shapes: np.ndarray, patch_size: int,
                 patch_indices: np.ndarray, threshold: float, min_area: int = 1):
        from uts_cli.tileplan import plan_tiles

        self._image_of = np.asarray(image_idx_of_patch)
        self._origin = np.asarray(origin)
        self._p = int(patch_size)
        self._stitchers: dict = {}
        idx = np.asarray(patch_indices, np.int64)
        for img in np.unique(self._image_of[idx]):
            h, w = (int(v) for v in shapes[img][:2])
            plan = plan_tiles(h, w, self._p, 0)
            keep = np.zeros_like(plan.keep)
            mine = idx[self._image_of[idx] == img]
            keep[self._origin[mine, 0] // self._p, self._origin[mine, 1] // self._p] = True
            self._stitchers[int(img)] = BandStitcher(plan.with_keep(keep), threshold, min_area=min_area)

    def add(self, patch_indices: np.ndarray, maps: np.ndarray) -> Iterator[tuple[int, Detections]]:
        """Add maps ``(B, P, P)``; yield ``(image_idx, detections)`` for each completed field."""
        for k, m in zip(patch_indices, maps):
            img = int(self._image_of[k])
            st = self._stitchers[img]
            y, x = (int(v) for v in self._origin[k])
            st.add(y // self._p, x // self._p, np.asarray(m, np.float32))
            if st.done:
                del self._stitchers[img]
                yield img, st.detections()

    @property
    def pending(self) -> int:
        return len(self._stitchers)
