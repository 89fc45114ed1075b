"""Tests for uts_cli.thumbnail: review thumbnails and atomic PNG writes."""
from __future__ import annotations

import numpy as np
import pytest

from uts_cli.clinical import Hotspot
from uts_cli.errors import InputDataError
from uts_cli.thumbnail import (
    DETECTION_COLOR,
    HOTSPOT_COLOR,
    TISSUE_COLOR,
    heat_colors,
    render_thumbnail,
    to_lowres,
    write_png,
)

GREY = (200, 200, 200)
SCALE = 1 / 32


def _slide(h: int = 64, w: int = 96) -> np.ndarray:
    return np.full((h, w, 3), GREY, dtype=np.uint8)


def _is(img: np.ndarray, rc: tuple[int, int], color) -> bool:
    return tuple(int(v) for v in img[rc]) == tuple(color)


def test_lowres_mapping_keeps_pixel_edges_aligned():
    # Input pixel edges -0.5 and 31.5 (32 input pixels) map to thumbnail edges -0.5 and 0.5.
    assert to_lowres(-0.5, SCALE) == -0.5
    assert to_lowres(31.5, SCALE) == 0.5
    assert to_lowres(15.5, SCALE) == 0.0  # the centre of the first 32 x 32 block


def test_plain_render_returns_a_copy():
    base = _slide()
    out = render_thumbnail(base, SCALE)
    assert out.dtype == np.uint8 and out.shape == base.shape
    assert np.array_equal(out, base) and out is not base


def test_detection_markers_are_circles_at_scaled_positions():
    base = _slide()
    # Input (335.5, 655.5) -> thumbnail (10, 20).
    yx = np.array([[335.5, 655.5]])
    out = render_thumbnail(base, SCALE, yx=yx, marker_radius=4)
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    for rc in [(10, 24), (10, 16), (6, 20), (14, 20), (10, 25)]:  # radius 4 and 5 rings
        assert _is(out, rc, DETECTION_COLOR), rc
    assert _is(out, (10, 20), GREY)  # the centre stays visible
    assert _is(out, (10, 28), GREY)
    assert np.array_equal(base, _slide())  # input untouched
    # Every detection gets its circle.
    many = render_thumbnail(base, SCALE, yx=np.array([[335.5, 655.5], [1615.5, 2575.5]]), marker_radius=4)
    assert _is(many, (10, 24), DETECTION_COLOR) and _is(many, (50, 84), DETECTION_COLOR)
    # Markers at the border are clipped, not wrapped.
    edge = render_thumbnail(base, SCALE, yx=np.array([[0.0, 0.0]]))
    assert _is(edge, (0, 4), DETECTION_COLOR) and _is(edge, (63, 95), GREY)


def test_hotspot_square_border():
    # A 640 px window at input (319.5, 639.5) covers thumbnail pixels rows 10..29, cols 20..39.
    hs = Hotspot(y0=319.5, x0=639.5, side_px=640.0, count=3, area_mm2=0.0256,
                 height_px=640.0, width_px=640.0)
    out = render_thumbnail(_slide(), SCALE, hotspot=hs, line_width=2)
    for rc in [(10, 20), (11, 25), (29, 39), (28, 30), (20, 20), (20, 21), (20, 39), (20, 38)]:
        assert _is(out, rc, HOTSPOT_COLOR), rc
    for rc in [(9, 20), (10, 19), (30, 30), (20, 40), (20, 25), (12, 22)]:
        assert _is(out, rc, GREY), rc
    # A window clipped to a small image uses its actual height and width.
    small = Hotspot(y0=-0.5, x0=-0.5, side_px=6000.0, count=1, area_mm2=0.01, height_px=320.0, width_px=3072.0)
    out = render_thumbnail(_slide(), SCALE, hotspot=small, line_width=1)
    assert _is(out, (9, 50), HOTSPOT_COLOR) and _is(out, (10, 50), GREY) and _is(out, (5, 95), HOTSPOT_COLOR)


def test_tissue_outline():
    mask = np.zeros((64, 96), bool)
    mask[10:30, 20:50] = True
    out = render_thumbnail(_slide(), SCALE, tissue_mask=mask)
    assert _is(out, (10, 30), TISSUE_COLOR) and _is(out, (29, 49), TISSUE_COLOR)
    assert _is(out, (20, 35), GREY) and _is(out, (5, 5), GREY)
    # A mask at another resolution is resized onto the thumbnail.
    out2 = render_thumbnail(_slide(), SCALE, tissue_mask=mask[::2, ::2])
    assert _is(out2, (20, 20), TISSUE_COLOR) and _is(out2, (20, 35), GREY)


def test_heatmap_blend():
    heat = np.zeros((64, 96))
    heat[:, 48:] = 1.0
    out = render_thumbnail(_slide(), SCALE, heatmap=heat, heatmap_alpha=1.0)
    assert _is(out, (5, 5), GREY)                       # zero heat leaves the slide as is
    assert _is(out, (5, 60), tuple(heat_colors(1.0).round().astype(int)))
    half = render_thumbnail(_slide(), SCALE, heatmap=heat, heatmap_alpha=0.5)
    expected = np.round(np.array(GREY) * 0.5 + heat_colors(1.0) * 0.5)
    assert np.array_equal(half[5, 60], expected)
    # A heatmap computed at another size is resized; NaN counts as no heat.
    odd = np.full((16, 24), np.nan)
    assert np.array_equal(render_thumbnail(_slide(), SCALE, heatmap=odd), _slide())


def test_layer_order_markers_on_top():
    yx = np.array([[335.5, 655.5]])
    mask = np.ones((64, 96), bool)
    out = render_thumbnail(_slide(), SCALE, yx=yx, tissue_mask=mask, heatmap=np.ones((64, 96)))
    assert _is(out, (10, 24), DETECTION_COLOR)
    assert _is(out, (0, 50), TISSUE_COLOR)


def test_heat_colors_ramp():
    ramp = heat_colors(np.array([0.0, 0.5, 1.0, 2.0, -1.0]))
    assert ramp.shape == (5, 3)
    assert np.array_equal(ramp[3], ramp[2]) and np.array_equal(ramp[4], ramp[0])  # clipped
    assert ramp[2][0] > ramp[2][2] and ramp[0][2] > ramp[0][0]  # hot is red, cold is blue


def test_input_conversions_and_errors():
    grey = np.full((8, 8), 100, np.uint8)
    assert render_thumbnail(grey, 1.0).shape == (8, 8, 3)
    rgba = np.zeros((8, 8, 4), np.uint8)
    assert render_thumbnail(rgba, 1.0).shape == (8, 8, 3)
    unit = np.full((8, 8, 3), 0.5)
    assert render_thumbnail(unit, 1.0)[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(InputDataError, match="shape"):
        render_thumbnail(np.zeros((8, 8, 2), np.uint8), 1.0)
    with pytest.raises(InputDataError, match="scale"):
        render_thumbnail(grey, 0.0)
    with pytest.raises(InputDataError, match="2-D"):
        render_thumbnail(grey, 1.0, tissue_mask=np.zeros((8, 8, 3), bool))


def test_write_png_round_trip_and_atomic(tmp_path, monkeypatch):
    import os

    import imageio.v3 as iio

    img = render_thumbnail(_slide(), SCALE, yx=np.array([[335.5, 655.5]]))
    path = tmp_path / "slide" / "thumbnail.png"
    assert write_png(path, img) == path
    assert np.array_equal(iio.imread(path), img)
    assert [p.name for p in path.parent.iterdir()] == ["thumbnail.png"]

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_png(path, _slide())
    assert np.array_equal(iio.imread(path), img)  # the complete old file survives
    assert [p.name for p in path.parent.iterdir()] == ["thumbnail.png"]


def test_leaf_modules_stay_light():
    import subprocess
    import sys

    code = ("import sys, uts_cli.clinical, uts_cli.io.export, uts_cli.thumbnail\n"
            "print(sorted(m for m in ('torch', 'h5py', 'typer', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
