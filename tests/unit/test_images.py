"""Tests for uts_cli.io.images: TIFF/PNG/JPEG reads, region padding, errors, tissue mask."""
from __future__ import annotations

import sys
import types

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from uts_cli.errors import InputDataError, ResourceError
from uts_cli.io import images
from uts_cli.io.images import (
    is_junk,
    list_image_files,
    open_image,
    read_header,
    tissue_fraction,
    tissue_mask,
)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def plain_tiff(tmp_path):
    data = _rgb(50, 70)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data, photometric="rgb")
    return path, data


@pytest.fixture
def pyramid_tiff(tmp_path):
    """Tiled, zlib-compressed, 3-level pyramid in SubIFDs, 300 x 400 px."""
    data = _rgb(300, 400, seed=1)
    path = tmp_path / "pyramid.tiff"
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, tile=(64, 64), compression="zlib", subifds=2, photometric="rgb",
                 resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
        tw.write(data[::2, ::2], tile=(64, 64), compression="zlib", subfiletype=1, photometric="rgb")
        tw.write(data[::4, ::4], tile=(64, 64), compression="zlib", subfiletype=1, photometric="rgb")
    return path, data


def test_plain_tiff_whole_and_region(plain_tiff):
    path, data = plain_tiff
    with open_image(path) as reader:
        assert reader.shape == (50, 70, 3)
        assert reader.level_shapes == [(50, 70)]
        assert reader.pixel_size_um is None  # tifffile writes unit NONE by default
        region = reader.read_region(10, 20, 15, 25)  # decodes and caches the small image
        whole = reader.read()
        whole[:] = 0  # the caller owns its copy; the reader's cached pixels are untouched
        assert np.array_equal(reader.read(), data)
    assert region.dtype == np.uint8 and np.array_equal(region, data[10:25, 20:45])


def test_region_crossing_borders_is_padded_white(plain_tiff):
    path, data = plain_tiff
    with open_image(path) as reader:
        top_left = reader.read_region(-5, -3, 10, 10)
        bottom_right = reader.read_region(45, 65, 10, 10)
        outside = reader.read_region(100, 100, 4, 4)
    assert top_left.shape == (10, 10, 3)
    assert np.all(top_left[:5] == 255) and np.all(top_left[:, :3] == 255)
    assert np.array_equal(top_left[5:, 3:], data[0:5, 0:7])
    assert np.array_equal(bottom_right[:5, :5], data[45:50, 65:70])
    assert np.all(bottom_right[5:] == 255) and np.all(bottom_right[:, 5:] == 255)
    assert np.all(outside == 255)


@pytest.mark.parametrize("max_cached", [0, 10**9], ids=["zarr", "cached"])
def test_pyramid_levels_and_regions(pyramid_tiff, max_cached):
    path, data = pyramid_tiff
    with open_image(path, max_cached_pixels=max_cached) as reader:
        assert reader.shape == (300, 400, 3)
        assert reader.level_shapes == [(300, 400), (150, 200), (75, 100)]
        assert reader.pixel_size_um == pytest.approx(0.5)
        assert np.array_equal(reader.read_region(70, 130, 100, 90), data[70:170, 130:220])
        assert np.array_equal(reader.read_region(250, 380, 64, 64)[:50, :20], data[250:, 380:])
        low, scale = reader.read_lowres(max_side=100)
        assert low.shape == (75, 100, 3) and scale == pytest.approx(0.25)
        assert np.array_equal(low, data[::4, ::4])
        mid, scale = reader.read_lowres(max_side=250)
        assert mid.shape == (150, 200, 3) and scale == pytest.approx(0.5)
        strided, scale = reader.read_lowres(max_side=40)
        assert max(strided.shape[:2]) <= 40
        assert np.array_equal(strided, data[::4, ::4][::3, ::3])
        assert scale == pytest.approx(0.5 * (25 / 300 + 34 / 400))


def test_zarr_path_never_caches_the_level(pyramid_tiff):
    path, _ = pyramid_tiff
    with open_image(path, max_cached_pixels=0) as reader:
        reader.read_region(0, 0, 10, 10)
        assert reader._cache == {} and 0 in reader._zarr


def test_planar_separate_tiff(tmp_path):
    data = _rgb(40, 30, seed=3)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(data, -1, 0), photometric="rgb", planarconfig="separate")
    for cached in (0, 10**9):
        with open_image(path, max_cached_pixels=cached) as reader:
            assert reader.shape == (40, 30, 3)
            assert np.array_equal(reader.read(), data)
            assert np.array_equal(reader.read_region(5, 6, 7, 8), data[5:12, 6:14])


def test_pixel_size_from_inch_resolution_and_svs_description(tmp_path):
    data = _rgb(8, 8)
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, data, photometric="rgb", resolution=(101600.0, 101600.0),
                     resolutionunit="INCH")
    svs = tmp_path / "slide.svs"
    tifffile.imwrite(svs, data, photometric="rgb",
                     description="Aperio Image Library v12\n8x8 -> 8x8 |AppMag = 40|MPP = 0.2499")
    dpi72 = tmp_path / "dpi72.tif"
    tifffile.imwrite(dpi72, data, photometric="rgb", resolution=(72.0, 72.0), resolutionunit="INCH")
    assert read_header(inch) == ((8, 8, 3), pytest.approx(0.25))
    assert read_header(svs)[1] == pytest.approx(0.2499)
    assert read_header(dpi72)[1] is None  # a 72 dpi placeholder is not a microscope pixel size


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("gray.tif", np.zeros((20, 20), np.uint8), "grayscale"),
        ("rgba.tif", np.zeros((20, 20, 4), np.uint8), "RGBA"),
        ("deep.tif", np.zeros((20, 20, 3), np.uint16), "16-bit"),
        ("float.tif", np.zeros((20, 20, 3), np.float32), "32-bit"),
    ],
)
def test_non_rgb8_tiff_is_refused(tmp_path, name, data, words):
    path = tmp_path / name
    kwargs = {"photometric": "rgb"} if data.ndim == 3 and data.shape[2] == 3 else {}
    if data.ndim == 3 and data.shape[2] == 4:
        kwargs = {"photometric": "rgb", "extrasamples": ["unassalpha"]}
    tifffile.imwrite(path, data, **kwargs)
    with pytest.raises(InputDataError) as info:
        open_image(path)
    assert str(path) in info.value.message
    assert words in info.value.message and "8-bit RGB" in info.value.message
    assert "convert" in info.value.hint


def test_truncated_tiff_is_refused(tmp_path, plain_tiff):
    source, _ = plain_tiff
    raw = source.read_bytes()
    path = tmp_path / "truncated.tif"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputDataError) as info:
        with open_image(path) as reader:
            reader.read()
    assert str(path) in info.value.message and "truncated" in info.value.message


def test_corrupt_tile_is_refused_on_read(tmp_path):
    path = tmp_path / "corrupt.tif"
    tifffile.imwrite(path, _rgb(128, 128), tile=(64, 64), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(raw))
    with open_image(path) as reader:  # the header is intact
        with pytest.raises(InputDataError) as info:
            reader.read_region(0, 0, 64, 128)
    assert str(path) in info.value.message and "corrupt" in info.value.message


def test_garbage_with_tif_suffix_is_refused(tmp_path):
    path = tmp_path / "garbage.tif"
    path.write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(InputDataError) as info:
        open_image(path)
    assert str(path) in info.value.message and info.value.hint


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(InputDataError, match="not found") as info:
        open_image(tmp_path / "nope.tif")
    assert "nope.tif" in info.value.message
    bmp = tmp_path / "x.bmp"
    bmp.write_bytes(b"BM")
    with pytest.raises(InputDataError, match="unsupported image type .bmp"):
        open_image(bmp)


def test_codec_without_imagecodecs_gives_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, _rgb(32, 32), photometric="rgb", compression="jpeg")
    # Simulate an environment without imagecodecs: tifffile looks codecs up lazily.
    monkeypatch.setattr(tifffile.tifffile, "imagecodecs", types.SimpleNamespace())
    monkeypatch.setattr(tifffile.TIFF.DECOMPRESSORS, "_codecs", {})
    with pytest.raises(InputDataError) as info:
        with open_image(path) as reader:
            reader.read()
    assert str(path) in info.value.message and "imagecodecs" in info.value.message
    assert info.value.hint == "pip install imagecodecs"


def test_missing_zarr_for_lazy_reads(pyramid_tiff, monkeypatch):
    path, _ = pyramid_tiff
    monkeypatch.setitem(sys.modules, "zarr", None)
    with open_image(path, max_cached_pixels=0) as reader:
        with pytest.raises(InputDataError) as info:
            reader.read_region(0, 0, 10, 10)
    assert str(path) in info.value.message and "zarr" in info.value.hint


def test_whole_read_of_huge_image_is_refused(plain_tiff, monkeypatch):
    path, _ = plain_tiff
    monkeypatch.setattr(images, "MAX_WHOLE_READ_PIXELS", 100)
    with open_image(path) as reader:
        with pytest.raises(ResourceError, match="region by region|too big"):
            reader.read()


def test_png_and_jpeg(tmp_path):
    data = _rgb(30, 40, seed=4)
    png = tmp_path / "a.png"
    jpg = tmp_path / "b.jpg"
    iio.imwrite(png, data)
    iio.imwrite(jpg, data)
    with open_image(png) as reader:
        assert reader.shape == (30, 40, 3) and reader.level_shapes == [(30, 40)]
        assert np.array_equal(reader.read(), data)
        padded = reader.read_region(25, 35, 10, 10)
        assert np.array_equal(padded[:5, :5], data[25:, 35:]) and np.all(padded[5:] == 255)
        low, scale = reader.read_lowres(max_side=20)
        assert low.shape == (15, 20, 3) and scale == pytest.approx(0.5)
    with open_image(jpg) as reader:
        assert reader.read().shape == (30, 40, 3)


@pytest.mark.parametrize(
    "data, words",
    [
        (np.zeros((10, 10), np.uint8), "grayscale"),
        (np.zeros((10, 10, 4), np.uint8), "RGBA"),
        (np.zeros((10, 10), np.uint16), "grayscale"),
    ],
)
def test_non_rgb8_png_is_refused(tmp_path, data, words):
    path = tmp_path / "bad.png"
    iio.imwrite(path, data)
    with pytest.raises(InputDataError) as info:
        open_image(path)
    assert str(path) in info.value.message and words in info.value.message


def test_truncated_png_is_refused(tmp_path):
    good = tmp_path / "good.png"
    iio.imwrite(good, _rgb(64, 64))
    bad = tmp_path / "cut.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputDataError) as info:
        with open_image(bad) as reader:
            reader.read()
    assert str(bad) in info.value.message


def test_junk_and_listing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("a.tif", "b.TIFF", "sub/c.png", ".hidden/d.tif", "Thumbs.db", ".DS_Store",
                 "._a.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)]
    assert found == ["a.tif", "b.TIFF", "sub/c.png"]
    assert is_junk("Thumbs.db") and is_junk("x/.DS_Store") and not is_junk("01.tif")


def test_tissue_mask_background_and_tissue():
    white = np.full((40, 60, 3), 245, np.uint8)
    assert not tissue_mask(white).any()
    assert not tissue_mask(np.zeros((10, 10, 3), np.uint8)).any()  # black scan border
    pink = np.empty((40, 60, 3), np.uint8)
    pink[:] = (230, 150, 190)
    assert tissue_mask(pink).all()
    half = white.copy()
    half[:, 30:] = (200, 110, 170)
    half[:, 30:, 1] += np.random.default_rng(0).integers(0, 30, (40, 30)).astype(np.uint8)
    mask = tissue_mask(half)
    assert not mask[:, :30].any() and mask[:, 30:].all()


def test_tissue_fraction_windows():
    mask = np.zeros((10, 20), bool)
    mask[:, 10:] = True
    scale = 0.1  # mask pixel = 10 x 10 full-resolution pixels
    assert tissue_fraction(mask, 0, 0, 100, 100, scale) == 0.0
    assert tissue_fraction(mask, 0, 100, 100, 100, scale) == 1.0
    assert tissue_fraction(mask, 0, 50, 100, 100, scale) == pytest.approx(0.5)
    # a quarter of this window lies inside the image, all of it tissue
    assert tissue_fraction(mask, 50, 150, 100, 100, scale) == pytest.approx(0.25)
    assert tissue_fraction(mask, 0, 0, 0, 10, scale) == 0.0
