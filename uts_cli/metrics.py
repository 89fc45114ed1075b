"""Point matching, detection counts and image-level threshold selection (numpy + scipy only).

Points are ``(y, x)`` = (row, col) arrays of shape ``(N, 2)`` in pixels.

Two matching rules are offered:

* ``one-to-one`` (default): each prediction matches at most one mitosis and vice versa, pairs must be
  within ``radius`` (distance ``<= radius``), and the assignment maximises the number of matches
  (ties broken by the smallest total distance). This is the usual detection protocol (MIDOG).
* ``legacy``: the counting of the original UTS evaluation scripts, kept only to compare numbers with
  the paper. It double-counts (see :func:`match_points_legacy`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from uts_cli.choices import MATCHING_MODES
from uts_cli.errors import InputDataError, UsageError


# Above this many candidate pairs (P * T) the dense cost matrix is replaced by a KD-tree graph.
_DENSE_MAX_PAIRS = 250_000


@dataclass(frozen=True)
class Counts:
    """Detection counts with precision, recall and F1.

    Conventions when a denominator is zero: precision is 0.0 when there are no predictions,
    recall is 0.0 when there are no true points, and F1 is 0.0 whenever ``tp == 0``. An image with
    neither predictions nor truths therefore scores 0 on its own, which is why counts should be
    summed over images (``sum(counts, Counts())``) before reading the ratios (micro averaging).
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        if not isinstance(other, Counts):
            return NotImplemented
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def __radd__(self, other: object) -> "Counts":
        # Lets the builtin sum() start from 0.
        if other == 0:
            return self
        return NotImplemented

    @property
    def precision(self) -> float:
        denom = self.tp + self.fp
        return self.tp / denom if denom > 0 else 0.0

    @property
    def recall(self) -> float:
        denom = self.tp + self.fn
        return self.tp / denom if denom > 0 else 0.0

    @property
    def f1(self) -> float:
        if self.tp == 0:
            return 0.0
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn)

    def to_dict(self) -> dict:
        """Counts and ratios as plain Python numbers (for JSON output)."""
        return {
            "tp": int(self.tp),
            "fp": int(self.fp),
            "fn": int(self.fn),
            "precision": float(self.precision),
            "recall": float(self.recall),
            "f1": float(self.f1),
        }


@dataclass(frozen=True)
class MatchResult:
    """Outcome of matching predicted points to true points.

    Attributes:
        tp, fp, fn: the counts.
        pairs: ``(K, 2)`` int64 array of ``(pred_index, true_index)`` for matched pairs.
        distances: ``(K,)`` float64 distances of those pairs, in pixels.
        pred_matched: ``(P,)`` bool, True where a prediction counts as a true positive.
        true_matched: ``(T,)`` bool, True where a true point was found (not a false negative).
    """

    tp: int
    fp: int
    fn: int
    pairs: np.ndarray
    distances: np.ndarray
    pred_matched: np.ndarray
    true_matched: np.ndarray

    @property
    def counts(self) -> Counts:
        return Counts(self.tp, self.fp, self.fn)


def _as_points(points, name: str) -> np.ndarray:
    """Return ``points`` as a finite float64 ``(N, 2)`` array; empty input gives ``(0, 2)``."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputDataError(
            f"{name}: expected an (N, 2) array of (y, x) points, got shape {arr.shape}",
            hint="pass points as rows of (row, col) pixel coordinates",
        )
    if not np.all(np.isfinite(arr)):
        raise InputDataError(
            f"{name}: contains NaN or infinite coordinates",
            hint="check the annotation or detection file for empty or invalid values",
        )
    return arr


def _check_radius(radius: float) -> float:
    radius = float(radius)
    if not np.isfinite(radius) or radius < 0:
        raise UsageError(
            f"matching radius must be a finite number >= 0, got {radius}",
            hint="use a radius in pixels, e.g. 30 (7.5 um at 0.25 um/px)",
        )
    return radius


def _result(pairs: np.ndarray, dists: np.ndarray, n_pred: int, n_true: int) -> MatchResult:
    pred_matched = np.zeros(n_pred, dtype=bool)
    true_matched = np.zeros(n_true, dtype=bool)
    pred_matched[pairs[:, 0]] = True
    true_matched[pairs[:, 1]] = True
    tp = int(len(pairs))
    return MatchResult(
        tp=tp,
        fp=n_pred - tp,
        fn=n_true - tp,
        pairs=pairs,
        distances=dists,
        pred_matched=pred_matched,
        true_matched=true_matched,
    )


def _assign(dist: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-cardinality, then minimum-distance assignment on a dense distance block.

    Pairs beyond ``radius`` cost more than any set of valid pairs can add up to, so the solver
    never trades a valid match for a shorter but invalid one; they are dropped afterwards.
    """
    n = min(dist.shape)
    big = (radius + 1.0) * (n + 1)
    cost = np.where(dist <= radius, dist, big)
    rows, cols = linear_sum_assignment(cost)
    keep = dist[rows, cols] <= radius
    return rows[keep], cols[keep]


def _empty_pairs() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float64)


def _match_dense(pred: np.ndarray, true: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    if len(pred) == 0 or len(true) == 0:
        return _empty_pairs()
    dist = cdist(pred, true)
    rows, cols = _assign(dist, radius)
    pairs = np.stack([rows, cols], axis=1).astype(np.int64)
    return pairs, dist[rows, cols]


def _match_sparse(pred: np.ndarray, true: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Same objective as :func:`_match_dense`, solved per connected component of the
    within-radius graph (the objective is a sum over components, so this is exact)."""
    n_pred, n_true = len(pred), len(true)
    if n_pred == 0 or n_true == 0:
        return _empty_pairs()
    cand = cKDTree(pred).sparse_distance_matrix(cKDTree(true), radius, output_type="ndarray")
    pi = cand["i"].astype(np.int64)
    ti = cand["j"].astype(np.int64)
    # Recompute exactly as the dense path does, so both agree on pairs at distance == radius.
    d = np.sqrt(((pred[pi] - true[ti]) ** 2).sum(axis=1))
    ok = d <= radius
    pi, ti, d = pi[ok], ti[ok], d[ok]
    if len(pi) == 0:
        return _empty_pairs()

    graph = coo_matrix((np.ones(len(pi)), (pi, n_pred + ti)), shape=(n_pred + n_true,) * 2)
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[pi]
    order = np.argsort(edge_comp, kind="stable")
    pi, ti, d, edge_comp = pi[order], ti[order], d[order], edge_comp[order]
    starts = np.flatnonzero(np.r_[True, edge_comp[1:] != edge_comp[:-1]])
    ends = np.r_[starts[1:], len(edge_comp)]

    out_p, out_t, out_d = [], [], []
    single = (ends - starts) == 1
    # A component with one edge is one isolated pair: match it without calling the solver.
    out_p.append(pi[starts[single]])
    out_t.append(ti[starts[single]])
    out_d.append(d[starts[single]])
    for s, e in zip(starts[~single], ends[~single]):
        p_ids, p_loc = np.unique(pi[s:e], return_inverse=True)
        t_ids, t_loc = np.unique(ti[s:e], return_inverse=True)
        block = np.full((len(p_ids), len(t_ids)), np.inf)
        block[p_loc, t_loc] = d[s:e]
        rows, cols = _assign(block, radius)
        out_p.append(p_ids[rows])
        out_t.append(t_ids[cols])
        out_d.append(block[rows, cols])
    p_all = np.concatenate(out_p)
    t_all = np.concatenate(out_t)
    d_all = np.concatenate(out_d)
    order = np.argsort(p_all, kind="stable")
    return np.stack([p_all[order], t_all[order]], axis=1).astype(np.int64), d_all[order]


def match_points(pred_yx, true_yx, radius: float) -> MatchResult:
    """Match predicted points to true points one-to-one within ``radius``.

    A prediction and a true point may pair only when their distance is ``<= radius``. Among all
    one-to-one assignments the one with the most pairs is chosen, ties broken by the smallest total
    distance (Hungarian algorithm). Small sets use a dense distance matrix; large ones a KD-tree
    graph of the within-radius pairs solved per connected component, so 10k x 10k points stay fast.

    Args:
        pred_yx: ``(P, 2)`` predicted points (row, col).
        true_yx: ``(T, 2)`` true points (row, col).
        radius: matching radius in pixels (30 px = 7.5 um at 0.25 um/px).

    Returns:
        A :class:`MatchResult`; ``tp + fp == P`` and ``tp + fn == T``.

    Raises:
        InputDataError: when a point array is not ``(N, 2)`` or holds NaN/inf.
        UsageError: when ``radius`` is negative or not finite.
    """
    pred = _as_points(pred_yx, "predicted points")
    true = _as_points(true_yx, "true points")
    radius = _check_radius(radius)
    if len(pred) * len(true) <= _DENSE_MAX_PAIRS:
        pairs, dists = _match_dense(pred, true, radius)
    else:
        pairs, dists = _match_sparse(pred, true, radius)
    return _result(pairs, dists, len(pred), len(true))


def match_points_legacy(pred_yx, true_yx, radius: float) -> MatchResult:
    """Count detections the way the original UTS evaluation scripts did (for comparison only).

    The rule, reproduced exactly, is not a matching:

    * TP = number of predictions whose distance to *some* true point is ``< radius`` (strict).
      Two predictions on one mitosis count as two TPs.
    * FP = number of predictions with no true point at distance ``< radius``.
    * FN = number of true points whose distance to *every* prediction is ``> radius``.

    Because TP uses ``<`` and FN uses ``>``, a pair at distance exactly ``radius`` makes the
    prediction an FP while the true point is not an FN. ``tp + fn`` may differ from the number of
    true points, so recall from these counts is not a proper recall.

    Args:
        pred_yx: ``(P, 2)`` predicted points (row, col).
        true_yx: ``(T, 2)`` true points (row, col).
        radius: radius in pixels.

    Returns:
        A :class:`MatchResult` whose ``pairs`` link each TP prediction to its nearest true point;
        ``true_matched`` marks true points that are not FN.

    Raises:
        InputDataError: when a point array is not ``(N, 2)`` or holds NaN/inf.
        UsageError: when ``radius`` is negative or not finite.
    """
    pred = _as_points(pred_yx, "predicted points")
    true = _as_points(true_yx, "true points")
    radius = _check_radius(radius)
    n_pred, n_true = len(pred), len(true)
    if n_pred == 0 or n_true == 0:
        pairs, dists = _empty_pairs()
        return MatchResult(0, n_pred, n_true, pairs, dists,
                           np.zeros(n_pred, bool), np.zeros(n_true, bool))
    pred_d, pred_nn = cKDTree(true).query(pred)
    true_d, _ = cKDTree(pred).query(true)
    pred_tp = pred_d < radius
    true_found = ~(true_d > radius)
    idx = np.flatnonzero(pred_tp)
    pairs = np.stack([idx, pred_nn[idx]], axis=1).astype(np.int64)
    return MatchResult(
        tp=int(pred_tp.sum()),
        fp=int((~pred_tp).sum()),
        fn=int((~true_found).sum()),
        pairs=pairs,
        distances=pred_d[idx].astype(np.float64),
        pred_matched=pred_tp,
        true_matched=true_found,
    )


def match(pred_yx, true_yx, radius: float, mode: str = "one-to-one") -> MatchResult:
    """Dispatch to :func:`match_points` or :func:`match_points_legacy` by ``mode``.

    Args:
        pred_yx: ``(P, 2)`` predicted points.
        true_yx: ``(T, 2)`` true points.
        radius: radius in pixels.
        mode: ``"one-to-one"`` or ``"legacy"``.

    Returns:
        The :class:`MatchResult`.

    Raises:
        UsageError: for an unknown ``mode``.
    """
    if mode == "one-to-one":
        return match_points(pred_yx, true_yx, radius)
    if mode == "legacy":
        return match_points_legacy(pred_yx, true_yx, radius)
    raise UsageError(
        f"unknown matching mode {mode!r}",
        hint=f"choose one of: {', '.join(MATCHING_MODES)}",
    )


class ThresholdChoice(NamedTuple):
    """Result of :func:`best_f1_threshold`; unpacks as ``(threshold, f1, precision, recall)``."""

    threshold: float
    f1: float
    precision: float
    recall: float


# Returned when no sample is positive: every threshold gives F1 = 0, so keep a neutral midpoint.
NO_POSITIVE_THRESHOLD = 0.5


def best_f1_threshold(scores, labels) -> ThresholdChoice:
    """Pick the image-level threshold at the point of the precision-recall curve with the best F1.

    Samples are sorted by score (descending); every distinct score is a candidate threshold, and
    predicting ``score >= threshold`` reproduces the returned precision, recall and F1 exactly.
    When several thresholds reach the same best F1, the highest one is returned.

    If no label is positive, F1 is 0 at every threshold; the function then returns
    ``ThresholdChoice(0.5, 0.0, 0.0, 0.0)`` (``NO_POSITIVE_THRESHOLD``) rather than failing, so a
    caller can detect that case by ``f1 == 0.0``. With at least one positive the best F1 is > 0.

    Args:
        scores: ``(N,)`` image-level scores (probabilities), higher means more likely positive.
        labels: ``(N,)`` 0/1 (or bool) image labels.

    Returns:
        A :class:`ThresholdChoice` ``(threshold, f1, precision, recall)``.

    Raises:
        InputDataError: when the arrays are empty, differ in length, or hold NaN scores or
            labels other than 0/1.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels_raw = np.asarray(labels).ravel()
    if scores.size == 0:
        raise InputDataError("cannot choose a threshold: no scores given",
                             hint="the validation split holds no samples; check the split")
    if scores.shape != labels_raw.shape:
        raise InputDataError(
            f"scores and labels differ in length ({scores.size} vs {labels_raw.size})",
            hint="pass one label per score",
        )
    if not np.all(np.isfinite(scores)):
        raise InputDataError("scores contain NaN or infinite values",
                             hint="the model produced invalid outputs; check training")
    if not np.all(np.isin(labels_raw, (0, 1))):
        raise InputDataError("labels must be 0 or 1", hint="use binary image-level labels")
    labels = labels_raw.astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return ThresholdChoice(NO_POSITIVE_THRESHOLD, 0.0, 0.0, 0.0)

    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    tp = np.cumsum(labels[order])
    fp = np.cumsum(~labels[order])
    # Only the last index of each run of tied scores is reachable with `score >= threshold`.
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tp, fp, thr = tp[last], fp[last], s[last]
    f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
    best = int(np.argmax(f1))  # first maximum = highest threshold
    return ThresholdChoice(
        threshold=float(thr[best]),
        f1=float(f1[best]),
        precision=float(tp[best] / (tp[best] + fp[best])),
        recall=float(tp[best] / n_pos),
    )
