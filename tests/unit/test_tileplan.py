"""Tile plan: store-grid equivalence, coverage, most-central ownership, tissue skipping."""
import numpy as np
import pytest

from uts_cli.errors import UsageError
from uts_cli.tileplan import axis_ownership, axis_starts, keep_tissue, plan_tiles
from uts_cli.tiling import tile_starts


@pytest.mark.parametrize("length", [1, 63, 64, 65, 128, 2000, 2001])
def test_overlap_zero_is_the_store_grid(length):
    assert np.array_equal(axis_starts(length, 64, 0), tile_starts(length, 64))
    own = axis_ownership(axis_starts(length, 64, 0), 64, length)
    # Without overlap a tile owns itself (cropped at the border).
    assert np.array_equal(own[:, 0], tile_starts(length, 64))
    assert own[-1, 1] == length


@pytest.mark.parametrize("length,tile,overlap", [(1000, 100, 20), (101, 100, 30), (100, 100, 10),
                                                 (7215, 500, 64), (50, 100, 10), (333, 64, 16)])
def test_overlapping_tiles_cover_without_padding_and_ownership_partitions(length, tile, overlap):
    starts = axis_starts(length, tile, overlap)
    assert starts[0] == 0
    if length >= tile:
        assert starts[-1] + tile == length  # last tile shifted back, never padded
        assert np.all(np.diff(starts) <= tile - overlap)
    own = axis_ownership(starts, tile, length)
    assert own[0, 0] == 0 and own[-1, 1] == length
    assert np.array_equal(own[1:, 0], own[:-1, 1])
    assert np.all(own[:, 1] > own[:, 0])
    # Each owned pixel lies inside its tile, and in the tile whose centre is nearest.
    centres = starts + tile / 2
    for i, (lo, hi) in enumerate(own):
        px = np.arange(lo, hi)
        assert px.min() >= starts[i] and px.max() < starts[i] + tile
        nearest = np.abs((px[:, None] + 0.5) - centres[None, :]).min(axis=1)
        assert np.all(np.abs(px + 0.5 - centres[i]) <= nearest + 0.5)


def test_owned_pixels_keep_half_the_overlap_from_inner_tile_borders():
    length, tile, overlap = 1000, 100, 40
    starts = axis_starts(length, tile, overlap)
    own = axis_ownership(starts, tile, length)
    for i, (lo, hi) in enumerate(own):
        if i > 0:
            assert lo - starts[i] >= overlap // 2 - 1
        if i < len(starts) - 1:
            assert starts[i] + tile - hi >= overlap // 2 - 1


def test_bad_overlap_is_a_usage_error():
    with pytest.raises(UsageError, match="--overlap"):
        axis_starts(100, 64, 64)
    with pytest.raises(UsageError):
        axis_starts(0, 64, 0)


def test_keep_tissue_skips_background_tiles_and_reports_the_share():
    plan = plan_tiles(400, 400, 100, 0)
    mask = np.zeros((40, 40), bool)     # 1/10 scale
    mask[2:5, 2:5] = True               # tissue inside tile (0, 0) only
    kept = keep_tissue(plan, mask, 0.1, dilate=0)
    assert kept.n_kept == 1 and kept.keep[0, 0]
    assert kept.skipped_area_fraction() == pytest.approx(15 / 16)
    # Dilation reaches into the neighbours of a fragment at a tile edge.
    mask2 = np.zeros((40, 40), bool)
    mask2[5:8, 9] = True
    assert keep_tissue(plan, mask2, 0.1, dilate=0).n_kept == 1
    assert keep_tissue(plan, mask2, 0.1, dilate=1).n_kept == 2
    assert keep_tissue(plan, np.zeros((40, 40), bool), 0.1).n_kept == 0
    origins = kept.origins()
    assert origins.tolist() == [[0, 0, 0]]
