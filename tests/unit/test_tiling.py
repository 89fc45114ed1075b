import numpy as np
import pytest

from uts_cli.tiling import PAD_VALUE, assign_points, extract_tile, tile_grid, tile_starts


def test_2000px_side_gives_four_tiles_of_500():
    # The original loop `while x + P < W` gave 3 here and dropped a quarter of each side.
    assert tile_starts(2000, 500).tolist() == [0, 500, 1000, 1500]
    assert len(tile_grid(2000, 2000, 500)) == 16


def test_partial_last_tile_is_kept_and_padded():
    assert tile_starts(1050, 500).tolist() == [0, 500, 1000]
    img = np.zeros((1050, 1050, 3), np.uint8)
    tile = extract_tile(img, 1000, 1000, 500)
    assert tile.shape == (500, 500, 3)
    assert (tile[:50, :50] == 0).all() and (tile[50:] == PAD_VALUE).all() and (tile[:, 50:] == PAD_VALUE).all()


def test_grid_covers_every_pixel_exactly_once():
    h, w, p = 130, 257, 64
    cover = np.zeros((h, w), int)
    for y, x in tile_grid(h, w, p):
        cover[y:y + p, x:x + p] += 1
    assert (cover == 1).all()


def test_each_point_assigned_to_the_tile_holding_its_pixel():
    h, w, p = 1000, 1000, 500
    pts = np.array([[0, 0], [499.4, 499.4], [499.6, 10], [999, 999], [250, 750]], np.float32)
    owner = assign_points(pts, h, w, p)
    assert owner.tolist() == [0, 0, 2, 3, 1]
    grid = tile_grid(h, w, p)
    local = pts - grid[owner]
    assert (local >= -0.5).all() and (local < p - 0.5).all()


def test_bad_arguments():
    with pytest.raises(ValueError):
        tile_starts(0, 500)
