"""Tests for uts_cli.localize: CAM blobs and peaks to points, NMS, stitching patch maps."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.feature import peak_local_max
from skimage.measure import regionprops, label

from uts_cli.errors import InputDataError, UsageError
from uts_cli.localize import (
    Detections,
    concat_detections,
    detections_from_prob,
    nms_points,
    peaks_from_prob,
    stitch_region,
)


def _disk(shape, centre, radius, value):
    rr, cc = np.indices(shape)
    mask = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius ** 2
    return np.where(mask, value, 0.0)


def _two_blob_cam():
    shape = (64, 80)
    prob = np.full(shape, 0.05, dtype=np.float32)
    prob = np.maximum(prob, _disk(shape, (20, 15), 4, 0.9))
    prob = np.maximum(prob, _disk(shape, (45, 60), 5, 0.7))
    prob[45, 60] = 0.8  # the blob's maximum
    return prob.astype(np.float32)


def test_two_blobs_two_detections_at_centroids():
    det = detections_from_prob(_two_blob_cam(), threshold=0.5)
    assert len(det) == 2
    assert det.yx.dtype == np.float32 and det.yx.shape == (2, 2)
    np.testing.assert_allclose(det.yx, [[20.0, 15.0], [45.0, 60.0]], atol=1e-5)
    np.testing.assert_allclose(det.score, [0.9, 0.8], rtol=1e-6)
    assert det.area.tolist() == [int((_disk((64, 80), (20, 15), 4, 1) > 0).sum()),
                                 int((_disk((64, 80), (45, 60), 5, 1) > 0).sum())]


def test_centroids_match_regionprops_on_irregular_blobs():
    rng = np.random.default_rng(3)
    prob = rng.random((60, 70)).astype(np.float32)
    det = detections_from_prob(prob, threshold=0.8)
    props = regionprops(label(prob >= 0.8, connectivity=2), intensity_image=prob)
    assert len(det) == len(props) > 10
    np.testing.assert_allclose(det.yx, [p.centroid for p in props], atol=1e-4)
    np.testing.assert_allclose(det.score, [p.intensity_max for p in props])
    assert det.area.tolist() == [int(p.area) for p in props]


def test_threshold_inclusive_and_eight_connected():
    prob = np.zeros((10, 10), dtype=np.float32)
    prob[2, 2] = 0.5
    prob[3, 3] = 0.6  # diagonal neighbour: same blob with 8-connectivity
    prob[8, 8] = 0.5
    det = detections_from_prob(prob, threshold=0.5)
    assert len(det) == 2
    np.testing.assert_allclose(det.yx, [[2.5, 2.5], [8.0, 8.0]])
    assert det.area.tolist() == [2, 1]
    assert len(detections_from_prob(prob, threshold=0.5, min_area=2)) == 1


def test_no_detection_and_bad_input():
    det = detections_from_prob(np.zeros((8, 8)), threshold=0.5)
    assert len(det) == 0 and det.yx.shape == (0, 2) and det.yx.dtype == np.float32
    with pytest.raises(InputDataError, match="2-D"):
        detections_from_prob(np.zeros((2, 8, 8)), 0.5)
    with pytest.raises(UsageError, match="min_area"):
        detections_from_prob(np.zeros((8, 8)), 0.5, min_area=0)


def _gauss(shape, centre, sigma, amp):
    rr, cc = np.indices(shape)
    return amp * np.exp(-((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (2 * sigma ** 2))


def test_border_peak_is_found():
    shape = (40, 50)
    prob = _gauss(shape, (0, 30), 3, 0.9) + _gauss(shape, (25, 12), 3, 0.7)
    det = peaks_from_prob(prob, threshold=0.5, min_distance=3)
    assert det.yx.tolist() == [[0.0, 30.0], [25.0, 12.0]]
    np.testing.assert_allclose(det.score, [0.9, 0.7], rtol=1e-6)
    assert det.area.tolist() == [0, 0]
    # the library default would have dropped the border peak
    assert [0, 30] not in peak_local_max(prob, min_distance=3, threshold_abs=0.5).tolist()


def test_peak_threshold_inclusive():
    prob = _gauss((21, 21), (10, 10), 2, 0.5).astype(np.float32)
    assert len(peaks_from_prob(prob, threshold=0.5, min_distance=2)) == 1
    assert len(peaks_from_prob(prob, threshold=0.5000001, min_distance=2)) == 0
    with pytest.raises(UsageError):
        peaks_from_prob(prob, 0.5, min_distance=0)


def test_nms_keeps_best_and_is_greedy():
    yx = np.array([[0, 0], [0, 8], [0, 16], [100, 100], [100, 105]], dtype=np.float32)
    scores = np.array([0.9, 0.95, 0.7, 0.5, 0.6])
    # 1 (0.95) suppresses 0 and 2 (both within 8); 4 suppresses 3
    assert nms_points(yx, scores, 8.0).tolist() == [1, 4]
    # radius 7.9: nobody on the first line is within range any more
    assert nms_points(yx, scores, 7.9).tolist() == [0, 1, 2, 4]
    # greedy, not transitive: 0 kept first removes 1 only, 2 (16 px away) survives
    scores2 = np.array([0.9, 0.8, 0.7, 0.5, 0.5])
    assert nms_points(yx, scores2, 10.0).tolist() == [0, 2, 3]
    assert nms_points(np.zeros((0, 2)), [], 5.0).tolist() == []
    with pytest.raises(InputDataError):
        nms_points(yx, scores[:2], 5.0)


def test_stitch_2x2_grid_with_padded_last_tile():
    rng = np.random.default_rng(0)
    field = rng.random((50, 45)).astype(np.float32)
    p = 32
    padded = np.zeros((64, 64), dtype=np.float32)
    padded[:50, :45] = field
    # padding beyond the border holds values that must not leak in
    padded[50:, :] = 9.0
    padded[:, 45:] = 9.0
    tiles = [((y, x), padded[y:y + p, x:x + p]) for y in (0, 32) for x in (0, 32)]
    out = stitch_region(tiles, field.shape)
    assert out.shape == field.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, field)


def test_stitch_overlap_max_fill_and_errors():
    a = np.full((4, 4), 0.2)
    b = np.full((4, 4), 0.6)
    out = stitch_region([((0, 0), a), ((2, 2), b), ((2, 2), a)], (8, 8), fill=-1.0)
    assert out[1, 1] == pytest.approx(0.2)
    assert out[3, 3] == pytest.approx(0.6)  # overlap takes the max
    assert out[7, 0] == -1.0  # uncovered
    neg = stitch_region([((0, 0), np.full((2, 2), -5.0))], (3, 3))
    assert neg[0, 0] == -5.0 and neg[2, 2] == 0.0  # negative logits are not lost to the fill
    with pytest.raises(InputDataError, match="outside"):
        stitch_region([((10, 0), a)], (8, 8))


def test_detections_helpers():
    a = Detections(np.array([[1, 2]], np.float32), np.array([0.5], np.float32), np.array([3]))
    b = a.shifted((10, 20))
    assert b.yx.tolist() == [[11.0, 22.0]]
    both = concat_detections([a, b])
    assert len(both) == 2 and both.take(np.array([1])).yx.tolist() == [[11.0, 22.0]]
    assert len(concat_detections([])) == 0


@pytest.mark.parametrize("seed", range(40))
def test_detections_at_thresholds_equal_one_labelling_per_threshold(seed):
    """The one-pass sweep gives, bit for bit, what detections_from_prob gives at each threshold:
    rough and smooth maps, NaN pixels, values exactly on a threshold, min_area, any order."""
    from uts_cli.localize import detections_at_thresholds
    from uts_cli.model.validate import SWEEP

    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 70, 2))
    prob = (rng.random((h, w)) ** rng.uniform(0.3, 4)).astype(np.float32)
    if seed % 4 == 0:
        prob[rng.random((h, w)) < 0.1] = np.nan
    if seed % 3 == 0:
        prob = np.round(prob, 1)      # many pixels exactly on 0.1, 0.2, ...
    thresholds = rng.permutation(np.r_[SWEEP, 0.0, 1.0, 0.3])[:int(rng.integers(0, 12))]
    min_area = int(rng.integers(1, 4))
    got = detections_at_thresholds(prob, thresholds, min_area=min_area)
    assert len(got) == len(thresholds)
    for dets, t in zip(got, thresholds):
        ref = detections_from_prob(prob, float(t), min_area=min_area)
        assert np.array_equal(dets.yx, ref.yx) and np.array_equal(dets.score, ref.score)
        assert np.array_equal(dets.area, ref.area) and dets.area.dtype == ref.area.dtype


@pytest.mark.parametrize("seed", range(20))
def test_detections_at_thresholds_on_sparse_maps(seed):
    """CAM-like maps (a few bumps on an empty background, blobs one empty row or column apart or
    touching at a corner), where the sweep labels the map with its empty runs squeezed out."""
    from uts_cli.localize import detections_at_thresholds
    from uts_cli.model.validate import SWEEP

    rng = np.random.default_rng(1000 + seed)
    h, w = (int(v) for v in rng.integers(20, 120, 2))
    yy, xx = np.mgrid[:h, :w]
    prob = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(0, 8))):
        cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.8, 4)
        prob = np.maximum(prob, rng.uniform(0.2, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)))
    r, c = int(rng.integers(0, h - 3)), int(rng.integers(0, w - 3))
    prob[r, c] = prob[r + 2, c] = prob[r, c + 2] = 0.9     # one empty row / column between
    prob[r + 3, c + 3] = 0.8                                # a corner neighbour of the block below
    prob[r + 2, c + 2] = 0.7
    got = detections_at_thresholds(prob, SWEEP)
    for dets, t in zip(got, SWEEP):
        ref = detections_from_prob(prob, float(t))
        assert np.array_equal(dets.yx, ref.yx) and np.array_equal(dets.score, ref.score)
        assert np.array_equal(dets.area, ref.area)
