"""Tests for uts_cli.clinical: mitotic count, density and the exact hotspot window."""
from __future__ import annotations

import math

import numpy as np
import pytest

from uts_cli.clinical import (
    DEFAULT_HOTSPOT_AREA_MM2,
    ClinicalSummary,
    Hotspot,
    clinical_summary,
    count_in_window,
    find_hotspot,
)
from uts_cli.errors import InputDataError, UsageError

# 0.25 mm^2 at 0.5 um/px gives a side of exactly 1000 px (sqrt(0.25) = 0.5 is exact in binary).
AREA_1000PX = 0.25
PX_HALF_UM = 0.5


def _brute_force(yx: np.ndarray, hw: tuple[int, int], side: float) -> int:
    """Best count over every distinct window position, found without the sweep's argument.

    The count is constant between consecutive breakpoints of each axis (a point enters when the
    far edge passes it and leaves when the near edge passes it), so evaluating at every
    breakpoint and every midpoint between them, clipped to the allowed range, visits them all.
    """
    h, w = hw
    sy, sx = min(side, h), min(side, w)

    def starts(coords: np.ndarray, extent: float, lo: float, hi: float) -> np.ndarray:
        cuts = np.concatenate([coords, coords - extent, [lo, hi]])
        cuts = np.unique(np.clip(cuts, lo, hi))
        return np.unique(np.concatenate([cuts, (cuts[1:] + cuts[:-1]) / 2]))

    y0s = starts(yx[:, 0], sy, -0.5, h - 0.5 - sy)
    x0s = starts(yx[:, 1], sx, -0.5, w - 0.5 - sx)
    y, x = yx[:, 0], yx[:, 1]
    iny = (y0s[:, None] <= y[None]) & (y[None] < y0s[:, None] + sy)   # (Y, K)
    inx = (x0s[:, None] <= x[None]) & (x[None] < x0s[:, None] + sx)   # (X, K)
    counts = iny.astype(np.int32) @ inx.T.astype(np.int32)             # (Y, X)
    return int(counts.max())


def _check_window(hs: Hotspot, yx: np.ndarray, hw: tuple[int, int]) -> None:
    h, w = hw
    assert -0.5 <= hs.y0 and hs.y0 + hs.height_px <= h - 0.5 + 1e-9
    assert -0.5 <= hs.x0 and hs.x0 + hs.width_px <= w - 0.5 + 1e-9
    assert count_in_window(yx, hs.y0, hs.x0, hs.height_px, hs.width_px) == hs.count


@pytest.mark.parametrize("seed", range(6))
def test_hotspot_matches_brute_force_on_random_floats(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(20, 400, size=2))
        k = int(rng.integers(1, 14))
        yx = np.c_[rng.uniform(-0.5, h - 0.5, k), rng.uniform(-0.5, w - 0.5, k)]
        side_px = float(rng.uniform(5, 450))
        px_um = 0.25
        area = (side_px * px_um / 1000) ** 2
        hs = find_hotspot(yx, (h, w), px_um, area)
        assert hs.count == _brute_force(yx, (h, w), hs.side_px)
        assert hs.side_px == pytest.approx(side_px)
        _check_window(hs, yx, (h, w))


@pytest.mark.parametrize("seed", range(4))
def test_hotspot_matches_brute_force_on_integer_grids_with_ties_and_edges(seed):
    # Integer points and an integer side put many points exactly on window edges.
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 30, size=2))
        k = int(rng.integers(1, 16))
        yx = np.c_[rng.integers(0, h, k), rng.integers(0, w, k)].astype(float)
        side_px = float(rng.integers(1, 12))
        area = (side_px * PX_HALF_UM / 1000) ** 2
        hs = find_hotspot(yx, (h, w), PX_HALF_UM, area)
        assert hs.count == _brute_force(yx, (h, w), hs.side_px)
        _check_window(hs, yx, (h, w))


def test_two_clusters_picks_the_denser_one():
    rng = np.random.default_rng(0)
    sparse = rng.uniform(100, 400, size=(4, 2))
    dense = rng.uniform(3000, 3300, size=(7, 2))
    yx = np.concatenate([sparse, dense])
    hs = find_hotspot(yx, (5000, 6000), PX_HALF_UM, AREA_1000PX)
    assert hs.side_px == 1000.0
    assert hs.count == 7
    assert hs.area_mm2 == pytest.approx(AREA_1000PX)
    assert hs.density_per_mm2 == pytest.approx(7 / AREA_1000PX)
    # The window is slid until its top-left edges meet points: the smallest dense coordinates.
    assert hs.y0 == dense[:, 0].min() and hs.x0 == dense[:, 1].min()
    _check_window(hs, yx, (5000, 6000))


def test_window_edges_are_half_open():
    # Side 1000 px: points exactly 1000 px apart never share a window, 999.999 px apart do.
    apart = np.array([[10.0, 0.0], [10.0, 1000.0]])
    assert find_hotspot(apart, (5000, 5000), PX_HALF_UM, AREA_1000PX).count == 1
    close = np.array([[10.0, 0.0], [10.0, 999.999]])
    hs = find_hotspot(close, (5000, 5000), PX_HALF_UM, AREA_1000PX)
    assert hs.count == 2 and hs.x0 == 0.0
    # Same along y, and the top/left edge itself is inside the window.
    assert count_in_window([[5.0, 5.0]], 5.0, 5.0, 1.0, 1.0) == 1
    assert count_in_window([[6.0, 5.0]], 5.0, 5.0, 1.0, 1.0) == 0
    assert count_in_window([[5.0, 6.0]], 5.0, 5.0, 1.0, 1.0) == 0


def test_window_is_clamped_into_the_image():
    # A dense cluster in the bottom-right corner: the window cannot start at the points, it is
    # pushed back so that it ends at the image's border.
    yx = np.array([[4990.0, 4995.0], [4999.0, 4999.0], [4500.0, 4600.0], [10.0, 10.0]])
    hs = find_hotspot(yx, (5000, 5000), PX_HALF_UM, AREA_1000PX)
    assert hs.count == 3
    assert hs.y0 + hs.height_px == 4999.5 and hs.x0 + hs.width_px == 4999.5
    _check_window(hs, yx, (5000, 5000))


def test_image_smaller_than_window_clips_and_reports_the_used_area():
    yx = np.array([[0.0, 0.0], [99.0, 79.0], [50.0, 40.0]])
    hs = find_hotspot(yx, (100, 80), 0.25)  # default 2.37 mm^2 = 6158 px side at 0.25 um/px
    assert hs.side_px == pytest.approx(math.sqrt(DEFAULT_HOTSPOT_AREA_MM2) * 4000)
    assert (hs.height_px, hs.width_px) == (100.0, 80.0)
    assert (hs.y0, hs.x0) == (-0.5, -0.5)
    assert hs.count == 3
    assert hs.area_mm2 == pytest.approx(100 * 80 * 0.25**2 / 1e6)
    # Clipped on one side only: full side along the long axis.
    hs = find_hotspot(yx, (100, 20000), 0.25)
    assert hs.height_px == 100.0 and hs.width_px == pytest.approx(hs.side_px)
    assert hs.area_mm2 == pytest.approx(100 * hs.side_px * 0.25**2 / 1e6)


def test_no_points_and_points_outside_the_image():
    assert find_hotspot(np.zeros((0, 2)), (100, 100), 0.25) is None
    assert find_hotspot([], (100, 100), 0.25) is None
    assert find_hotspot([[-3.0, 5.0], [5.0, 100.0]], (100, 100), 0.25) is None


def test_hotspot_on_20000_points_is_the_densest_window():
    # Speed is measured by benchmarks, not asserted here; this checks the large case is right.
    rng = np.random.default_rng(7)
    side = math.sqrt(DEFAULT_HOTSPOT_AREA_MM2) * 4000
    # Worst shape for the sweep: every point spans most candidate rows and each step adds one.
    yx = np.c_[rng.uniform(0, side, 20000), rng.uniform(0, 2 * side, 20000)]
    hs = find_hotspot(yx, (40000, 40000), 0.25)
    assert hs.count == count_in_window(yx, hs.y0, hs.x0, hs.height_px, hs.width_px) > 9000


def test_bad_arguments_raise_uts_errors():
    with pytest.raises(UsageError, match="hotspot-area"):
        find_hotspot([[1.0, 1.0]], (10, 10), 0.25, area_mm2=0)
    with pytest.raises(InputDataError, match="pixel size"):
        find_hotspot([[1.0, 1.0]], (10, 10), -1.0)
    with pytest.raises(InputDataError, match="image size"):
        find_hotspot([[1.0, 1.0]], (0, 10), 0.25)
    with pytest.raises(InputDataError, match="shape"):
        find_hotspot(np.zeros((3, 3)), (10, 10), 0.25)
    with pytest.raises(InputDataError):
        clinical_summary([[np.nan, 1.0]], (10, 10), 0.25, None)


def test_clinical_summary_count_density_and_hotspot():
    yx = np.array([[10.0, 10.0], [20.0, 20.0], [4000.0, 4000.0]])
    # 8e6 px of tissue at 0.5 um/px = 2 mm^2.
    s = clinical_summary(yx, (5000, 5000), PX_HALF_UM, tissue_area_px=8e6, hotspot_area_mm2=AREA_1000PX)
    assert isinstance(s, ClinicalSummary)
    assert s.count == 3
    assert s.tissue_area_mm2 == pytest.approx(2.0)
    assert s.density_per_mm2 == pytest.approx(1.5)
    assert s.hotspot.count == 2 and (s.hotspot.y0, s.hotspot.x0) == (10.0, 10.0)
    d = s.to_dict()
    assert d["count"] == 3 and d["density_per_mm2"] == 1.5
    assert d["hotspot"]["count"] == 2 and d["hotspot"]["area_mm2"] == 0.25
    assert set(d["hotspot"]) >= {"y0", "x0", "side_px", "count", "area_mm2", "density_per_mm2"}


def test_clinical_summary_unknowns():
    yx = np.array([[10.0, 10.0]])
    no_px = clinical_summary(yx, (100, 100), None, tissue_area_px=5000.0)
    assert (no_px.count, no_px.tissue_area_mm2, no_px.density_per_mm2, no_px.hotspot) == (1, None, None, None)
    no_area = clinical_summary(yx, (100, 100), 0.25, tissue_area_px=None)
    assert no_area.tissue_area_mm2 is None and no_area.density_per_mm2 is None
    assert no_area.hotspot.count == 1
    no_tissue = clinical_summary(yx, (100, 100), 0.25, tissue_area_px=0.0)
    assert no_tissue.tissue_area_mm2 == 0.0 and no_tissue.density_per_mm2 is None
    empty = clinical_summary(np.zeros((0, 2)), (100, 100), 0.25, tissue_area_px=1.6e7)
    assert empty.count == 0 and empty.density_per_mm2 == 0.0 and empty.hotspot is None
    assert empty.to_dict() == {"count": 0, "tissue_area_mm2": 1.0, "density_per_mm2": 0.0, "hotspot": None}


def test_hotspot_built_by_hand_defaults_to_the_full_square():
    hs = Hotspot(y0=1.0, x0=2.0, side_px=10.0, count=3, area_mm2=0.5)
    assert (hs.height_px, hs.width_px) == (10.0, 10.0)
    assert hs.to_dict()["density_per_mm2"] == 6.0
