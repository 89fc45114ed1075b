"""Validation by what is scored: region-level localization F1 over a pixel-threshold sweep.

The fit loop validates once per epoch with one CAM pass over the validation patches. The maps are
stitched back into their fields and matched one-to-one against the annotated mitoses within the
run's radius, at every candidate pixel threshold at once, so the checkpoint and the pixel threshold
can be chosen by the same localization F1 that ``uts eval`` reports (instead of the image-level F1,
which does not track localization).

Region scoring goes through :func:`region_sweep` only, so the stitching behind it can change
without touching the fit loop.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from uts_cli.io.store import PatchStore
from uts_cli.metrics import Counts

# Candidate pixel thresholds. Finer steps near both ends: a saturated CAM (sigmoid near 1 on a
# mitosis) may need a threshold above 0.95, and a timid one below 0.05; a best value at the very
# end of this grid is reported as such (see ``SweepResult.at_edge``).
SWEEP = np.round(np.concatenate([[0.01, 0.02, 0.03], np.arange(0.05, 0.951, 0.05), [0.97, 0.98, 0.99]]), 2)
DEFAULT_RADIUS_PX = 30.0
# Largest field (pixels) the sweep stitches whole: about 40 bytes a pixel while it is scored.
WHOLE_FIELD_PIXELS = 8 * 2**20


@dataclass(frozen=True)
class SweepResult:
    """Localization counts at every swept pixel threshold, and the best of them.

    Attributes:
        thresholds: the swept pixel thresholds, ascending.
        counts: one :class:`~uts_cli.metrics.Counts` per threshold (summed over fields).
        threshold: the threshold with the best F1 (ties: the higher one, fewer false positives).
        best: the counts at ``threshold``.
        at_edge: the best threshold is the lowest or the highest of the sweep, so a better one
            may lie outside it (or the maps are degenerate: flat, or everything/nothing detected).
        n_fields: fields scored.
        n_points: annotated mitoses in the scored fields.
    """

    thresholds: tuple[float, ...]
    counts: tuple[Counts, ...]
    threshold: float
    best: Counts
    at_edge: bool
    n_fields: int
    n_points: int

    @property
    def f1(self) -> float:
        return self.best.f1

    def curve(self) -> list[float]:
        """F1 at every threshold of the sweep."""
        return [c.f1 for c in self.counts]


def best_of_sweep(thresholds: np.ndarray, counts: list[Counts], n_fields: int = 0, n_points: int = 0) -> SweepResult:
    """Pick the best-F1 threshold of a sweep (ties go to the higher threshold) and flag an edge choice."""
    f1 = np.array([c.f1 for c in counts])
    k = int(np.flatnonzero(f1 == f1.max())[-1])
    return SweepResult(tuple(float(t) for t in thresholds), tuple(counts), float(thresholds[k]), counts[k],
                       at_edge=k in (0, len(thresholds) - 1), n_fields=n_fields, n_points=n_points)


def region_sweep(store: PatchStore, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
                 thresholds: np.ndarray = SWEEP, radius_px: float = DEFAULT_RADIUS_PX,
                 matching: str = "one-to-one", indices: np.ndarray | None = None) -> SweepResult:
    """Region-level localization counts of CAM maps at every threshold of a sweep.

    The patch maps of each field are stitched as they arrive; a field is scored once all of its
    patches among ``indices`` are in. Fields only partly covered by ``indices`` (a distilled
    validation set) are scored on the covered patches, against the annotated points inside them.

    Args:
        store: the patch store the maps belong to.
        batches: ``(patch_indices, maps)`` pairs, ``maps`` of shape ``(b, P, P)`` (probabilities).
        thresholds: pixel thresholds to score.
        radius_px: one-to-one matching radius in pixels.
        matching: ``one-to-one`` or ``legacy``.
        indices: every patch that ``batches`` will deliver (None: the patches seen; then fields
            are assumed complete in the store).

    Returns:
        The sweep's counts and its best threshold.
    """
    from uts_cli.evaluation import RegionStitcher, score_detections
    from uts_cli.localize import detections_at_thresholds, stitch_region

    thresholds = np.asarray(thresholds, np.float64)
    if indices is not None:
        indices = np.asarray(indices, np.int64)
    else:
        indices = np.arange(len(store), dtype=np.int64)
    imgs, per_image = np.unique(store.image_idx[indices], return_counts=True)
    expected = {int(i): int(n) for i, n in zip(imgs, per_image)}
    partial = {i for i, n in expected.items() if n < int(store.image_patch_count[i])}
    # Fields up to WHOLE_FIELD_PIXELS (every val field of the synthetic and HPF datasets) are
    # stitched whole and scored at all thresholds in one pass. Larger ones on the store grid (whole
    # slides) go through eval's banded stitcher, once per threshold, so no slide is ever held whole.
    # Off the grid (hand-made stores of overlapping crops, e.g. the benchmarks') fields are always
    # whole, overlaps taking the maximum.
    on_grid = _on_store_grid(store, indices)
    banded = np.zeros(len(store.image_patch_count), bool)
    if on_grid:
        sizes = np.prod(np.asarray(store.image_shape[imgs], np.int64)[:, :2], axis=1)
        banded[imgs[sizes > WHOLE_FIELD_PIXELS]] = True
    banded_indices = indices[banded[store.image_idx[indices]]]
    stitchers = [RegionStitcher(store.image_idx, store.origin, store.image_shape, store.patch_size,
                                banded_indices, float(t)) for t in thresholds] if len(banded_indices) else []
    pending: dict[int, list] = {}
    counts = [Counts() for _ in thresholds]
    seen: dict[int, list[int]] = {}
    n_fields = n_points = 0

    def truth_of(img: int) -> np.ndarray:
        if img not in partial:
            return store.image_points(img, truth=False, kind=0)
        parts = []
        for k in seen[img]:
            yx, kind = store.points_for(k)
            parts.append(yx[kind == 0] + np.asarray(store.origin[k], np.float32))
        return np.concatenate(parts) if parts else np.zeros((0, 2), np.float32)

    for patch_indices, maps in batches:
        patch_indices = np.asarray(patch_indices)
        maps = np.asarray(maps, np.float32)
        for k in patch_indices:
            seen.setdefault(int(store.image_idx[k]), []).append(int(k))
        finished: dict[int, np.ndarray] = {}
        in_band = banded[store.image_idx[patch_indices]]
        if in_band.any():
            for j, stitcher in enumerate(stitchers):
                for img, dets in stitcher.add(patch_indices[in_band], maps[in_band]):
                    if img not in finished:
                        finished[img] = truth_of(img)
                    counts[j] = counts[j] + score_detections(dets, finished[img], radius_px, matching).counts
        for k, m in zip(patch_indices[~in_band], maps[~in_band]):
            img = int(store.image_idx[k])
            tiles = pending.setdefault(img, [])
            tiles.append((tuple(int(v) for v in store.origin[k]), m))
            if len(tiles) < expected[img]:
                continue
            del pending[img]
            field = stitch_region(tiles, tuple(int(v) for v in store.image_shape[img][:2]))
            finished[img] = truth = truth_of(img)
            for j, dets in enumerate(detections_at_thresholds(field, thresholds)):
                counts[j] = counts[j] + score_detections(dets, truth, radius_px, matching).counts
        for img, truth in finished.items():
            seen.pop(img, None)
            n_fields += 1
            n_points += len(truth)
    return best_of_sweep(thresholds, counts, n_fields, n_points)


def _on_store_grid(store: PatchStore, indices: np.ndarray) -> bool:
    """Whether the patches sit on their fields' non-overlapping grid, each cell once."""
    origin = np.asarray(store.origin[indices], np.int64)
    if len(origin) == 0:
        return True
    if (origin % store.patch_size).any():
        return False
    keys = np.column_stack([store.image_idx[indices], origin])
    return len(np.unique(keys, axis=0)) == len(keys)
