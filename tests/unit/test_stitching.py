"""Banded stitching: detections equal those of the whole stitched map, across bands and overlaps."""
import numpy as np
import pytest

from uts_cli.localize import detections_from_prob
from uts_cli.stitching import BandStitcher, LowresMax, stitch_owned
from uts_cli.tileplan import plan_tiles


def _feed(plan, tiles, threshold=0.5, order=None):
    st = BandStitcher(plan, threshold)
    items = list(tiles.items())
    for i in (order if order is not None else range(len(items))):
        (r, c), m = items[i]
        st.add(r, c, m)
    return st


def _same(a, b):
    assert len(a) == len(b)
    assert np.allclose(a.yx, b.yx, atol=1e-4)
    assert np.array_equal(a.score, b.score) and np.array_equal(a.area, b.area)


def test_blob_spanning_three_bands_is_one_detection():
    plan = plan_tiles(90, 60, 30, 0)
    full = np.zeros((90, 60), np.float32)
    full[10:80, 28:33] = 0.9            # a tall bar through every band and two tile columns
    full[85, 5] = 0.7                   # a single pixel at the bottom
    full[29, 40:45] = 0.8               # touches the first band's last row only
    tiles = {(r, c): np.pad(full, ((0, 30), (0, 30)))[y:y + 30, x:x + 30]
             for r, c, _ in plan.origins() for y, x in [plan.tile_origin(r, c)]}
    dets = _feed(plan, tiles).detections()
    _same(dets, detections_from_prob(full, 0.5))
    assert len(dets) == 3
    assert dets.area.tolist() == [70 * 5, 5, 1]


def test_u_shape_joined_only_in_a_later_band_is_one_blob():
    # Two arms in band 0 that meet at the bottom in band 2: open until then, one blob at the end.
    plan = plan_tiles(60, 40, 20, 0)
    full = np.zeros((60, 40), np.float32)
    full[0:55, 5] = 0.9
    full[0:55, 30] = 0.9
    full[54, 5:31] = 0.9
    full[3, 15] = 0.6   # a finished blob inside the carried rows must not come back twice
    tiles = {(r, c): full[y:y + 20, x:x + 20] for r, c, _ in plan.origins() for y, x in [plan.tile_origin(r, c)]}
    _same(_feed(plan, tiles).detections(), detections_from_prob(full, 0.5))


@pytest.mark.parametrize("seed", range(12))
def test_random_maps_overlaps_skips_and_orders_match_the_whole_map(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(20, 160, 2))
    p = int(rng.integers(8, 48))
    plan = plan_tiles(h, w, p, int(rng.integers(0, p // 2 + 1)))
    if seed % 3 == 0:
        plan = plan.with_keep(rng.random(plan.keep.shape) > 0.3)
    tiles = {(r, c): (rng.random((p, p)) ** 3).astype(np.float32) for r, c, _ in plan.origins()}
    order = rng.permutation(len(tiles)) if seed % 2 else None
    st = _feed(plan, tiles, 0.6, order)
    _same(st.detections(), detections_from_prob(stitch_owned(plan, tiles), 0.6))
    # In row-major order only one band is ever allocated.
    if order is None and plan.n_rows > 1:
        band_rows = int(np.diff(plan.own_y, axis=1).max())
        assert st.peak_band_bytes <= band_rows * w * 4


def test_one_field_or_tile_by_tile_gives_identical_detections():
    """A map computed from overlapping tiles is the same whatever the band or batch boundaries."""
    rng = np.random.default_rng(3)
    plan = plan_tiles(150, 170, 50, 12)
    tiles = {(r, c): (rng.random((50, 50)) ** 4).astype(np.float32) for r, c, _ in plan.origins()}
    ref = detections_from_prob(stitch_owned(plan, tiles), 0.5)
    _same(_feed(plan, tiles).detections(), ref)
    _same(_feed(plan, tiles, order=list(range(len(tiles)))[::-1]).detections(), ref)


def test_min_area_and_missing_tiles():
    plan = plan_tiles(40, 40, 20, 0)
    full = np.zeros((40, 40), np.float32)
    full[5, 5] = 0.9
    full[25:30, 25:30] = 0.9
    st = BandStitcher(plan, 0.5, min_area=2)
    st.add(0, 0, full[:20, :20])
    with pytest.raises(RuntimeError, match="never added"):
        st.detections()
    st.add(0, 1, full[:20, 20:])
    st.add(1, 0, full[20:, :20])
    st.add(1, 1, full[20:, 20:])
    dets = st.detections()
    assert dets.area.tolist() == [25]
    with pytest.raises(ValueError):
        BandStitcher(plan.with_keep(np.zeros((2, 2), bool)), 0.5).add(0, 0, full[:20, :20])


def test_lowres_max_keeps_small_peaks():
    lm = LowresMax((10, 10), 0.1)
    band = np.zeros((50, 100), np.float32)
    band[47, 33] = 0.8
    lm.add(0, band)
    lm.add(50, np.full((50, 100), 0.1, np.float32))
    assert lm.map[4, 3] == pytest.approx(0.8)
    assert lm.map[7].max() == pytest.approx(0.1) and lm.map[:5].sum() == pytest.approx(0.8)


def test_predict_modules_keep_the_layering():
    """Tile plan, stitching, eval scoring and the predict CLI/API modules load without torch."""
    import subprocess
    import sys
    from pathlib import Path

    mods = ["uts_cli.tileplan", "uts_cli.stitching", "uts_cli.evaluation", "uts_cli.api.predict",
            "uts_cli.cli.predict"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in mods) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"
