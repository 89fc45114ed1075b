"""Grid of non-overlapping tiles over a field, and which tile each point belongs to (numpy only).

Why padding rather than shifting the last tile: a shifted last tile overlaps its neighbour, so a
mitosis in the overlap would appear in two patches and be counted twice in training and in
patch-level evaluation. Padding keeps every pixel, and every annotated point, in exactly one patch.
The padded margin is filled with white (255), the colour of empty glass.
"""
from __future__ import annotations

import numpy as np

PAD_VALUE = 255


def tile_starts(length: int, patch_size: int) -> np.ndarray:
    """Start offsets of tiles covering ``[0, length)`` with no gap and no overlap.

    The last tile may extend past ``length`` (it is padded when extracted). A 2000 px side with
    500 px tiles gives 4 tiles (0, 500, 1000, 1500); 2001 px gives 5.

    Args:
        length: size of the field along one axis, in pixels (>= 1).
        patch_size: tile side in pixels (>= 1).

    Returns:
        int64 array of start offsets.
    """
    if length < 1 or patch_size < 1:
        raise ValueError(f"length and patch_size must be >= 1 (got {length}, {patch_size})")
    return np.arange(0, length, patch_size, dtype=np.int64)


def tile_grid(height: int, width: int, patch_size: int) -> np.ndarray:
    """(N, 2) array of tile origins ``(y, x)`` in row-major order covering the whole field."""
    ys = tile_starts(height, patch_size)
    xs = tile_starts(width, patch_size)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def assign_points(points_yx: np.ndarray, height: int, width: int, patch_size: int) -> np.ndarray:
    """Index of the tile (in ``tile_grid`` order) that holds each point.

    A point belongs to the tile whose pixel contains it: pixel centres are at integer coordinates,
    so pixel ``i`` spans ``[i - 0.5, i + 0.5)`` and the point goes to ``round(coord) // patch_size``.
    Points are expected inside the field (callers validate bounds first).

    Returns:
        int64 array (K,) of tile indices.
    """
    pts = np.asarray(points_yx, dtype=np.float64).reshape(-1, 2)
    n_cols = len(tile_starts(width, patch_size))
    rows = np.clip(np.floor(pts[:, 0] + 0.5), 0, height - 1).astype(np.int64) // patch_size
    cols = np.clip(np.floor(pts[:, 1] + 0.5), 0, width - 1).astype(np.int64) // patch_size
    return rows * n_cols + cols


def extract_tile(image: np.ndarray, y0: int, x0: int, patch_size: int) -> np.ndarray:
    """Copy of the ``patch_size`` square at ``(y0, x0)``, padded with white past the border."""
    tile = image[y0 : y0 + patch_size, x0 : x0 + patch_size]
    if tile.shape[0] == patch_size and tile.shape[1] == patch_size:
        return np.ascontiguousarray(tile)
    out = np.full((patch_size, patch_size) + image.shape[2:], PAD_VALUE, dtype=image.dtype)
    out[: tile.shape[0], : tile.shape[1]] = tile
    return out
