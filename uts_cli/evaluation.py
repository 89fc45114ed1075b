"""Localization scoring from CAM probability maps, at patch and at region level (numpy only).

Region level is how the original reports its final numbers: the patch maps of a field are put back
together, detections are found on the whole field (so a mitosis cut by a tile border is one blob,
not two), and matched against every point of that field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from uts_cli.localize import Detections, detections_from_prob, stitch_region
from uts_cli.metrics import Counts, MatchResult, match


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


@dataclass
class FieldMaps:
    """Patch maps of one field, collected until the field is complete."""

    image_idx: int
    expected: int
    tiles: list = field(default_factory=list)


class FieldStitcher:
    """Collect per-patch maps as they stream in and hand back whole fields when complete.

    Patches may arrive in any order; a field is released (and its memory freed) as soon as all of
    its patches have been seen.
    """

    def __init__(self, image_idx_of_patch: np.ndarray, origin: np.ndarray, expected_per_image: dict[int, int],
                 shapes: np.ndarray):
        self._image_of = image_idx_of_patch
        self._origin = origin
        self._shapes = shapes
        self._open: dict[int, FieldMaps] = {}
        self._expected = expected_per_image

    def add(self, patch_indices: np.ndarray, maps: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Add maps ``(B, P, P)`` of patches; yield ``(image_idx, field_map)`` for completed fields."""
        for k, m in zip(patch_indices, maps):
            img = int(self._image_of[k])
            fm = self._open.setdefault(img, FieldMaps(img, self._expected[img]))
            fm.tiles.append((tuple(int(v) for v in self._origin[k]), np.asarray(m, np.float32)))
            if len(fm.tiles) == fm.expected:
                del self._open[img]
                h, w = (int(v) for v in self._shapes[img][:2])
                yield img, stitch_region(fm.tiles, (h, w))

    @property
    def pending(self) -> int:
        return len(self._open)


class ThresholdSweep:
    """Localization counts at many pixel thresholds, accumulated map by map.

    Used to pick the pixel threshold on the validation set by localization F1, instead of reusing
    the image-level threshold as the original does.
    """

    def __init__(self, thresholds: np.ndarray, radius: float, matching: str = "one-to-one"):
        self.thresholds = np.asarray(thresholds, np.float64)
        self.radius = radius
        self.matching = matching
        self.counts = [Counts() for _ in self.thresholds]

    def add(self, prob: np.ndarray, truth_yx: np.ndarray) -> None:
        for k, t in enumerate(self.thresholds):
            self.counts[k] = self.counts[k] + score_map(prob, float(t), truth_yx, self.radius,
                                                        self.matching).counts

    def best(self) -> tuple[float, Counts]:
        """Threshold with the best F1 (ties: the higher threshold)."""
        f1 = np.array([c.f1 for c in self.counts])
        k = int(np.flatnonzero(f1 == f1.max())[-1])
        return float(self.thresholds[k]), self.counts[k]
