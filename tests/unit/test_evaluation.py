import numpy as np

from uts_cli.evaluation import RegionStitcher, match_rows, score_detections, score_map


def blob_map(shape, centres, r=4, value=0.9):
    m = np.zeros(shape, np.float32)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    for y, x in centres:
        m[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = value
    return m


def test_score_map_counts_and_rows():
    prob = blob_map((100, 100), [(20, 20), (70, 70)])
    s = score_map(prob, 0.5, np.array([[21, 19], [40, 90]]), radius=10)
    assert (s.counts.tp, s.counts.fp, s.counts.fn) == (1, 1, 1)
    rows = match_rows("img", s, offset=(100, 0))
    assert sorted(r["status"] for r in rows) == ["FN", "FP", "TP"]
    tp = [r for r in rows if r["status"] == "TP"][0]
    assert abs(tp["y"] - 120) < 0.5 and abs(tp["x"] - 20) < 0.5


def test_blob_cut_by_tile_border_is_one_detection_at_region_level():
    # A blob centred on the border between two 64 px tiles: two detections per patch, one per field.
    field = blob_map((64, 128), [(32, 64)], r=6)
    origin = np.array([[0, 0], [0, 64]])
    st = RegionStitcher(np.array([0, 0]), origin, np.array([[64, 128, 3]]), 64, np.array([0, 1]), 0.5)
    out = list(st.add(np.array([0]), field[None, :, :64]))
    assert out == [] and st.pending == 1
    (img, dets), = st.add(np.array([1]), field[None, :, 64:])
    assert img == 0 and st.pending == 0
    region = score_detections(dets, np.array([[32, 64]]), radius=30)
    assert (region.counts.tp, region.counts.fp) == (1, 0)
    whole = score_map(field, 0.5, np.array([[32, 64]]), radius=30)
    assert np.allclose(whole.detections.yx, dets.yx) and np.array_equal(whole.detections.area, dets.area)
    left = score_map(field[:, :64], 0.5, np.zeros((0, 2)), radius=30)
    right = score_map(field[:, 64:], 0.5, np.zeros((0, 2)), radius=30)
    assert len(left.detections) == 1 and len(right.detections) == 1
