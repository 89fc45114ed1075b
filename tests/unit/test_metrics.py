"""Tests for uts_cli.metrics: one-to-one and legacy matching, counts, threshold selection."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from uts_cli import metrics
from uts_cli.errors import InputDataError, UsageError
from uts_cli.metrics import (
    Counts,
    best_f1_threshold,
    match,
    match_points,
    match_points_legacy,
)

R = 30.0


def _realdata() -> Path:
    env = os.environ.get("UTS_REALDATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata"


# --- golden case ------------------------------------------------------------------------------

# Two predictions 10 px from mitosis M1, one prediction far from everything, mitosis M2 missed.
GOLDEN_TRUE = np.array([[100.0, 100.0], [300.0, 300.0]], dtype=np.float32)
GOLDEN_PRED = np.array([[100.0, 110.0], [110.0, 100.0], [500.0, 500.0]], dtype=np.float32)


def test_golden_one_to_one():
    res = match_points(GOLDEN_PRED, GOLDEN_TRUE, R)
    assert (res.tp, res.fp, res.fn) == (1, 2, 1)
    assert res.pairs.shape == (1, 2)
    assert res.pairs[0, 1] == 0  # matched to M1
    assert res.pairs[0, 0] in (0, 1)
    np.testing.assert_allclose(res.distances, [10.0])
    assert res.true_matched.tolist() == [True, False]
    assert res.pred_matched.sum() == 1 and not res.pred_matched[2]


def test_golden_legacy_double_counts():
    res = match_points_legacy(GOLDEN_PRED, GOLDEN_TRUE, R)
    assert (res.tp, res.fp, res.fn) == (2, 1, 1)
    assert res.pred_matched.tolist() == [True, True, False]
    assert res.true_matched.tolist() == [True, False]
    assert res.pairs.tolist() == [[0, 0], [1, 0]]


def test_golden_counts_ratios():
    c = match_points(GOLDEN_PRED, GOLDEN_TRUE, R).counts
    assert c.precision == pytest.approx(1 / 3)
    assert c.recall == pytest.approx(1 / 2)
    assert c.f1 == pytest.approx(2 / (2 + 2 + 1))
    legacy = match_points_legacy(GOLDEN_PRED, GOLDEN_TRUE, R).counts
    assert legacy.precision == pytest.approx(2 / 3)
    assert legacy.recall == pytest.approx(2 / 3)  # 2 / (2 + 1): not a proper recall


# --- edge cases -------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [match_points, match_points_legacy])
def test_no_predictions(fn):
    res = fn(np.zeros((0, 2)), GOLDEN_TRUE, R)
    assert (res.tp, res.fp, res.fn) == (0, 0, 2)
    assert res.pairs.shape == (0, 2)
    assert res.pred_matched.shape == (0,) and res.true_matched.tolist() == [False, False]


@pytest.mark.parametrize("fn", [match_points, match_points_legacy])
def test_no_truths(fn):
    res = fn(GOLDEN_PRED, [], R)
    assert (res.tp, res.fp, res.fn) == (0, 3, 0)
    assert res.true_matched.shape == (0,)


@pytest.mark.parametrize("fn", [match_points, match_points_legacy])
def test_both_empty(fn):
    res = fn([], np.empty((0, 2)), R)
    assert (res.tp, res.fp, res.fn) == (0, 0, 0)
    assert res.counts.f1 == 0.0


def test_distance_exactly_radius():
    pred = np.array([[0.0, 0.0]])
    true = np.array([[18.0, 24.0]])  # 3-4-5 triangle: distance exactly 30
    assert (match_points(pred, true, 30).tp, match_points(pred, true, 30).fn) == (1, 0)
    legacy = match_points_legacy(pred, true, 30)
    # TP needs `< r`, FN needs `> r`: the prediction is an FP, the mitosis is not an FN.
    assert (legacy.tp, legacy.fp, legacy.fn) == (0, 1, 0)
    just_out = match_points(pred, true, np.nextafter(30.0, 0))
    assert (just_out.tp, just_out.fp, just_out.fn) == (0, 1, 1)


def test_maximises_number_of_matches():
    # On a line: t2=0, p1=9, t1=10, p2=19.5. Greedy p1-t1 (d=1) leaves p2 unmatched;
    # the optimum p1-t2 (9) + p2-t1 (9.5) matches both.
    pred = np.array([[0.0, 9.0], [0.0, 19.5]])
    true = np.array([[0.0, 10.0], [0.0, 0.0]])
    res = match_points(pred, true, 10.0)
    assert (res.tp, res.fp, res.fn) == (2, 0, 0)
    assert sorted(map(tuple, res.pairs.tolist())) == [(0, 1), (1, 0)]
    np.testing.assert_allclose(sorted(res.distances), [9.0, 9.5])


def test_ties_broken_by_total_distance():
    pred = np.array([[0.0, 9.0], [0.0, 1.0]])
    true = np.array([[0.0, 0.0], [0.0, 10.0]])
    res = match_points(pred, true, 20.0)
    assert sorted(map(tuple, res.pairs.tolist())) == [(0, 1), (1, 0)]
    assert res.distances.sum() == pytest.approx(2.0)


def test_coincident_points_match():
    # distance 0 must survive the sparse path too (sparse matrices may drop explicit zeros)
    pts = np.array([[5.0, 5.0], [50.0, 50.0]])
    for solver in (metrics._match_dense, metrics._match_sparse):
        pairs, dists = solver(pts, pts, 3.0)
        assert pairs.tolist() == [[0, 0], [1, 1]]
        assert dists.tolist() == [0.0, 0.0]


def test_input_validation():
    with pytest.raises(InputDataError, match="predicted points"):
        match_points(np.zeros((3, 3)), GOLDEN_TRUE, R)
    with pytest.raises(InputDataError, match="NaN"):
        match_points(GOLDEN_PRED, [[np.nan, 1.0]], R)
    with pytest.raises(UsageError, match="radius"):
        match_points(GOLDEN_PRED, GOLDEN_TRUE, -1)
    with pytest.raises(UsageError, match="unknown matching mode"):
        match(GOLDEN_PRED, GOLDEN_TRUE, R, mode="greedy")
    assert match(GOLDEN_PRED, GOLDEN_TRUE, R, mode="legacy").tp == 2
    assert match(GOLDEN_PRED, GOLDEN_TRUE, R).tp == 1


# --- KD-tree path vs dense Hungarian --------------------------------------------------------

def _check_consistent(res, n_pred, n_true, radius):
    assert res.tp + res.fp == n_pred and res.tp + res.fn == n_true
    assert len(np.unique(res.pairs[:, 0])) == res.tp == len(np.unique(res.pairs[:, 1]))
    assert np.all(res.distances <= radius)
    assert res.pred_matched.sum() == res.tp == res.true_matched.sum()


@pytest.mark.parametrize("seed", range(6))
def test_sparse_equals_dense_random(seed):
    rng = np.random.default_rng(seed)
    n_true = int(rng.integers(50, 400))
    true = rng.uniform(0, 1500, size=(n_true, 2))
    # predictions: jittered copies of most truths, clustered duplicates, and random false alarms
    hit = true[rng.random(n_true) < 0.7]
    near = hit + rng.normal(0, 15, size=hit.shape)
    dup = hit[: len(hit) // 3] + rng.normal(0, 10, size=(len(hit) // 3, 2))
    noise = rng.uniform(0, 1500, size=(int(rng.integers(0, 200)), 2))
    pred = np.concatenate([near, dup, noise])
    dense_pairs, dense_d = metrics._match_dense(pred, true, R)
    sparse_pairs, sparse_d = metrics._match_sparse(pred, true, R)
    assert len(dense_pairs) == len(sparse_pairs)
    assert dense_d.sum() == pytest.approx(sparse_d.sum(), rel=1e-9, abs=1e-6)
    for pairs, d in ((dense_pairs, dense_d), (sparse_pairs, sparse_d)):
        res = metrics._result(pairs, d, len(pred), len(true))
        _check_consistent(res, len(pred), len(true), R)


def test_sparse_dense_dense_cluster():
    # One big connected component: many points inside one radius.
    rng = np.random.default_rng(7)
    pred = rng.uniform(0, 60, size=(40, 2))
    true = rng.uniform(0, 60, size=(25, 2))
    d_pairs, d_d = metrics._match_dense(pred, true, R)
    s_pairs, s_d = metrics._match_sparse(pred, true, R)
    assert len(d_pairs) == len(s_pairs) == 25
    assert d_d.sum() == pytest.approx(s_d.sum())


def test_large_sets_match_consistently():
    # Its speed is measured by benchmarks/bench_matching.py, not asserted here (wall clock
    # depends on the machine and its load).
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 100_000, size=(10_000, 2))
    pred = np.concatenate([true[:8000] + rng.normal(0, 10, size=(8000, 2)),
                           rng.uniform(0, 100_000, size=(2000, 2))])
    res = match_points(pred, true, R)
    _check_consistent(res, 10_000, 10_000, R)
    assert res.tp >= 7800


def test_real_midog_points_sparse_equals_dense():
    path = _realdata() / "midog21-annotations" / "databases" / "MIDOG.json"
    if not path.is_file():
        pytest.skip("real data not available")
    data = json.loads(path.read_text())
    by_image: dict[int, dict[int, list]] = {}
    for ann in data["annotations"]:
        x1, y1, x2, y2 = ann["bbox"]
        by_image.setdefault(ann["image_id"], {1: [], 2: []})[ann["category_id"]].append(
            [(y1 + y2) / 2, (x1 + x2) / 2])
    total = Counts()
    for image_id in sorted(by_image)[:60]:
        mit = np.array(by_image[image_id][1]).reshape(-1, 2)
        neg = np.array(by_image[image_id][2]).reshape(-1, 2)
        # Hard negatives as "predictions" against mitoses: look-alikes often sit near mitoses.
        d = metrics._match_dense(neg, mit, 100.0)
        s = metrics._match_sparse(neg, mit, 100.0)
        assert len(d[0]) == len(s[0])
        assert d[1].sum() == pytest.approx(s[1].sum())
        total += match_points(mit, mit, R).counts
    assert total.fp == 0 and total.fn == 0 and total.tp > 100


# --- Counts ------------------------------------------------------------------------------------

def test_counts_arithmetic_and_conventions():
    a, b = Counts(3, 1, 2), Counts(1, 0, 0)
    assert a + b == Counts(4, 1, 2)
    assert sum([a, b]) == Counts(4, 1, 2)
    assert sum([a, b], Counts()) == Counts(4, 1, 2)
    assert a.precision == 0.75 and a.recall == 0.6
    assert a.f1 == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    empty = Counts()
    assert (empty.precision, empty.recall, empty.f1) == (0.0, 0.0, 0.0)
    assert Counts(0, 5, 0).precision == 0.0 and Counts(0, 0, 5).recall == 0.0
    d = Counts(2, 2, 0).to_dict()
    assert d == {"tp": 2, "fp": 2, "fn": 0, "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3)}
    json.dumps(d)


# --- threshold selection -------------------------------------------------------------------------

def _brute_force(scores, labels):
    best = None
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        c = Counts(int((pred & labels).sum()), int((pred & ~labels).sum()), int((~pred & labels).sum()))
        if best is None or c.f1 > best[1]:
            best = (t, c.f1, c.precision, c.recall)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_best_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    if not labels.any():
        labels[0] = True
    scores = np.clip(labels * rng.uniform(0, 0.5) + rng.random(n) * 0.7, 0, 1)
    if seed % 2:
        scores = np.round(scores, 1)  # many ties
    got = best_f1_threshold(scores, labels.astype(int))
    exp = _brute_force(scores, labels)
    assert got.threshold == exp[0]
    assert got.f1 == pytest.approx(exp[1])
    assert (got.precision, got.recall) == pytest.approx(exp[2:])
    # `score >= threshold` reproduces the reported F1
    pred = scores >= got.threshold
    c = Counts(int((pred & labels).sum()), int((pred & ~labels).sum()), int((~pred & labels).sum()))
    assert c.f1 == pytest.approx(got.f1)


def test_best_threshold_ties_pick_highest():
    # F1 = 2/3 at threshold 0.9 (tp1 fp0 fn1) and at 0.6 (tp2 fp2 fn0).
    thr, f1, p, r = best_f1_threshold([0.9, 0.8, 0.7, 0.6], [1, 0, 0, 1])
    assert thr == 0.9 and f1 == pytest.approx(2 / 3) and p == 1.0 and r == 0.5


def test_best_threshold_perfect_separation():
    thr, f1, p, r = best_f1_threshold([0.1, 0.95, 0.3, 0.8], [0, 1, 0, 1])
    assert (thr, f1, p, r) == (0.8, 1.0, 1.0, 1.0)


def test_best_threshold_degenerate_cases():
    assert tuple(best_f1_threshold([0.2, 0.7], [0, 0])) == (0.5, 0.0, 0.0, 0.0)
    assert tuple(best_f1_threshold([0.3], [1])) == (0.3, 1.0, 1.0, 1.0)
    assert tuple(best_f1_threshold([0.3], [0])) == (0.5, 0.0, 0.0, 0.0)
    # all positive: lowest score keeps everything
    assert best_f1_threshold([0.2, 0.9], [True, True]).threshold == 0.2


def test_best_threshold_errors():
    with pytest.raises(InputDataError, match="no scores"):
        best_f1_threshold([], [])
    with pytest.raises(InputDataError, match="differ in length"):
        best_f1_threshold([0.1, 0.2], [1])
    with pytest.raises(InputDataError, match="NaN"):
        best_f1_threshold([0.1, np.nan], [1, 0])
    with pytest.raises(InputDataError, match="0 or 1"):
        best_f1_threshold([0.1, 0.2], [1, 2])
