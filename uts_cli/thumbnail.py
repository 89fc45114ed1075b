"""Slide thumbnails for review: tissue outline, detections, hotspot square and a heatmap overlay.

Drawn on a low-resolution copy of the slide (numpy + scikit-image; PNG through imageio). Input
positions are in full-resolution input pixels with pixel centres at integers; ``scale`` is
low-resolution pixels per input pixel. Since pixel *edges* scale linearly, a position ``c`` maps
to ``(c + 0.5) * scale - 0.5`` in the thumbnail.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from uts_cli.errors import InputDataError
from uts_cli.io.atomic import atomic_write_bytes

#: Drawing colours (RGB). Detections use the export's "Mitotic figure" colour.
DETECTION_COLOR = (220, 20, 60)
HOTSPOT_COLOR = (0, 90, 255)
TISSUE_COLOR = (0, 170, 0)

# Heatmap colour ramp: value -> RGB, linearly interpolated (dark blue, cyan, yellow, red).
_RAMP_POS = np.array([0.0, 0.35, 0.7, 1.0])
_RAMP_RGB = np.array([[30, 30, 160], [0, 200, 220], [255, 230, 0], [220, 0, 0]], dtype=np.float64)


def to_lowres(coord: Any, scale: float) -> np.ndarray:
    """Map input-pixel coordinates (centres at integers) to thumbnail pixel coordinates."""
    return (np.asarray(coord, dtype=np.float64) + 0.5) * float(scale) - 0.5


def heat_colors(values: np.ndarray) -> np.ndarray:
    """RGB (float 0-255) of heatmap values in [0, 1] on the blue-cyan-yellow-red ramp."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    return np.stack([np.interp(v, _RAMP_POS, _RAMP_RGB[:, c]) for c in range(3)], axis=-1)


def _rgb_image(rgb: Any) -> np.ndarray:
    img = np.asarray(rgb)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.shape[0] == 0 or img.shape[1] == 0:
        raise InputDataError(f"thumbnail image has shape {img.shape}, expected (h, w, 3) RGB",
                             hint="pass the low-resolution RGB read of the slide")
    img = img[..., :3]
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.size and float(np.nanmax(img)) <= 1.0:
            img = img * 255.0
        img = np.clip(np.nan_to_num(img.astype(np.float64)), 0, 255).round().astype(np.uint8)
    return img.copy()


def _fit(layer: Any, hw: tuple[int, int], order: int, name: str) -> np.ndarray:
    """Resize a 2-D layer to the thumbnail size when a caller computed it at another scale."""
    arr = np.asarray(layer)
    if arr.ndim != 2:
        raise InputDataError(f"thumbnail {name} has shape {arr.shape}, expected a 2-D (h, w) array",
                             hint=f"pass the {name} at the thumbnail's resolution")
    if arr.shape == hw:
        return arr
    from skimage.transform import resize

    out = resize(arr.astype(np.float64), hw, order=order, mode="edge", anti_aliasing=order > 0,
                 preserve_range=True)
    return out > 0.5 if arr.dtype == bool else out


def _blend_heatmap(img: np.ndarray, heatmap: Any, alpha: float) -> None:
    # NaN (no prediction, e.g. skipped background) counts as no heat; clean it before resizing.
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    heat = np.clip(_fit(heat, img.shape[:2], 1, "heatmap"), 0.0, 1.0)
    # Opacity grows with the value, so cold background keeps the slide visible underneath.
    weight = (float(alpha) * heat)[..., None]
    out = img.astype(np.float64) * (1.0 - weight) + heat_colors(heat) * weight
    img[...] = np.clip(out.round(), 0, 255).astype(np.uint8)


def _draw_outline(img: np.ndarray, mask: Any) -> None:
    from skimage.segmentation import find_boundaries

    mask = _fit(mask, img.shape[:2], 0, "tissue mask").astype(bool)
    # Pad with background so tissue running off the image edge is outlined along that edge too.
    edge = find_boundaries(np.pad(mask, 1), mode="inner")[1:-1, 1:-1]
    img[edge] = TISSUE_COLOR


def _draw_hotspot(img: np.ndarray, hotspot: Any, scale: float, thickness: int) -> None:
    h, w = img.shape[:2]
    height = getattr(hotspot, "height_px", math.nan)
    width = getattr(hotspot, "width_px", math.nan)
    height = hotspot.side_px if not math.isfinite(height) else height
    width = hotspot.side_px if not math.isfinite(width) else width
    # Window edges (continuous) -> thumbnail pixel rows/cols holding the border.
    top = int(round(to_lowres(hotspot.y0, scale) + 0.5))
    left = int(round(to_lowres(hotspot.x0, scale) + 0.5))
    bottom = int(round(to_lowres(hotspot.y0 + height, scale) + 0.5)) - 1
    right = int(round(to_lowres(hotspot.x0 + width, scale) + 0.5)) - 1
    top, left = max(top, 0), max(left, 0)
    bottom, right = min(max(bottom, top), h - 1), min(max(right, left), w - 1)
    if top > h - 1 or left > w - 1:
        return
    t = max(1, int(thickness))
    img[top:min(top + t, bottom + 1), left:right + 1] = HOTSPOT_COLOR
    img[max(bottom - t + 1, top):bottom + 1, left:right + 1] = HOTSPOT_COLOR
    img[top:bottom + 1, left:min(left + t, right + 1)] = HOTSPOT_COLOR
    img[top:bottom + 1, max(right - t + 1, left):right + 1] = HOTSPOT_COLOR


def _draw_markers(img: np.ndarray, yx: Any, scale: float, radius: int) -> None:
    from skimage.draw import circle_perimeter

    pts = np.asarray(yx, dtype=np.float64)
    if pts.size == 0:
        return
    pts = pts.reshape(-1, 2)
    pts = pts[np.isfinite(pts).all(axis=1)]
    centres = np.round(to_lowres(pts, scale)).astype(np.int64)
    h, w = img.shape[:2]
    r = max(1, int(radius))
    # Two concentric rings (one-pixel rings vanish when the PNG is viewed scaled down); the ring
    # offsets are computed once and added to every centre, as a slide can have many thousands.
    rings = [circle_perimeter(0, 0, rr) for rr in (r, r + 1)]
    dr = np.concatenate([rows for rows, _ in rings])
    dc = np.concatenate([cols for _, cols in rings])
    rows = (centres[:, :1] + dr[None]).ravel()
    cols = (centres[:, 1:] + dc[None]).ravel()
    keep = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    img[rows[keep], cols[keep]] = DETECTION_COLOR


def render_thumbnail(rgb_lowres: Any, scale: float, *, yx: Any = None, tissue_mask: Any = None,
                     hotspot: Any = None, heatmap: Any = None, heatmap_alpha: float = 0.45,
                     marker_radius: int = 4, line_width: int = 2) -> np.ndarray:
    """Draw the review layers on a low-resolution slide image.

    Layers, bottom to top: the heatmap blend, the tissue outline, the hotspot square, the
    detection circles.

    Args:
        rgb_lowres: (h, w, 3) uint8 low-resolution slide (grey or RGBA and float in [0, 1] are
            converted).
        scale: thumbnail pixels per input pixel (e.g. 1/32).
        yx: (K, 2) detections (row, col) in input pixels, drawn as circles.
        tissue_mask: bool (h, w) tissue mask, drawn as its outline (resized when its shape differs).
        hotspot: a :class:`uts_cli.clinical.Hotspot` (input pixels), drawn as a square.
        heatmap: float (h, w) in [0, 1], blended with opacity ``heatmap_alpha * value``.
        heatmap_alpha: opacity of the heatmap at value 1.
        marker_radius: detection circle radius in thumbnail pixels.
        line_width: hotspot border width in thumbnail pixels.

    Returns:
        A new uint8 (h, w, 3) array; the input is left unchanged.

    Raises:
        InputDataError: when the image or a layer has the wrong shape, or the scale is not positive.
    """
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise InputDataError(f"thumbnail scale must be positive, got {scale}",
                             hint="pass thumbnail pixels per input pixel, e.g. 1/32")
    img = _rgb_image(rgb_lowres)
    if heatmap is not None:
        _blend_heatmap(img, heatmap, heatmap_alpha)
    if tissue_mask is not None:
        _draw_outline(img, tissue_mask)
    if hotspot is not None:
        _draw_hotspot(img, hotspot, scale, line_width)
    if yx is not None:
        _draw_markers(img, yx, scale, marker_radius)
    return img


def write_png(path: str | os.PathLike, rgb: Any) -> Path:
    """Encode an RGB image as PNG and write it atomically (temporary file + rename).

    Args:
        path: destination ``.png``; parent folders are created.
        rgb: uint8 (h, w, 3) image.

    Returns:
        The written path.
    """
    import imageio.v3 as iio

    data = iio.imwrite("<bytes>", _rgb_image(rgb), extension=".png")
    atomic_write_bytes(path, data)
    return Path(path)
