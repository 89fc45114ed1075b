"""Joint image + point augmentation, batched on the device that trains.

Each sample gets one linear map ``A`` about the patch centre, composed of (in this order) a
horizontal flip, a vertical flip, a transpose and a rotation, each drawn with its own
probability. Pixels and points go through the very same ``A``:

* samples without rotation or elastic warp are flipped/transposed by index (exact, no
  interpolation, the cheap path);
* the others are resampled once with ``F.affine_grid`` + ``F.grid_sample`` (bilinear), the
  elastic displacement, when drawn, being added to the same sampling grid. Areas that come from
  outside the patch are white, like the padding of border tiles.

On CPU each path runs on its own subset of the batch. On a GPU both run on the whole batch and a
per-sample select keeps the right one: selecting a subset needs its size on the host, and such a
read waits for the GPU queue to drain, so host work and GPU work stop overlapping.

Coordinates: points are ``(y, x)`` pixels with pixel centres at integer coordinates. With
``align_corners=False`` the normalised grid coordinate of pixel ``x`` is ``(2x + 1)/W - 1``, so the
patch centre ``((W-1)/2, (H-1)/2)`` is the origin of both the pixel and the normalised frames.

Elastic warp: the output pixel ``p`` shows the (affine-transformed) patch at ``p + d(p)``, with ``d``
a smooth random field (gaussian-smoothed white noise, scaled to a given RMS displacement). A point
``r`` therefore moves to the ``p`` solving ``p + d(p) = r``; that inverse is approximated by three
fixed-point steps ``p <- r - d(p)``, which converge because ``d`` is smooth (its gradient is far
below 1), giving sub-pixel accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

WHITE = 255.0


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the spatial augmentation (defaults: the method's).

    Attributes:
        p_hflip, p_vflip, p_transpose, p_rotate: per-sample probabilities of each operation.
        angle_range: rotation angle range in degrees (uniform).
        elastic: add the elastic warp (``--strong-augmentation``).
        p_elastic: probability of the elastic warp when ``elastic`` is on.
        elastic_alpha: RMS displacement of the warp, as a fraction of the patch side.
        elastic_sigma: smoothness (gaussian sigma) of the warp, as a fraction of the patch side.
    """

    p_hflip: float = 0.5
    p_vflip: float = 0.5
    p_transpose: float = 0.5
    p_rotate: float = 0.5
    angle_range: tuple[float, float] = (-90.0, 90.0)
    elastic: bool = False
    p_elastic: float = 0.5
    elastic_alpha: float = 0.02
    elastic_sigma: float = 0.08


class AugmentedBatch(NamedTuple):
    """Output of :func:`augment_batch`."""

    images: torch.Tensor   # float32 (B, 3, H, W): 0..255, or scaled like the float input
    points: torch.Tensor   # float32 (B, K, 2) yx
    mask: torch.Tensor     # bool (B, K): point valid and inside the frame
    labels: torch.Tensor   # (B,) same dtype as the input labels, recomputed


def _linear_maps(u: torch.Tensor, cfg: AugmentConfig) -> tuple[torch.Tensor, ...]:
    """Per-sample flags and the 2x2 maps ``A`` acting on centred ``(x, y)`` coordinates."""
    hflip = u[:, 0] < cfg.p_hflip
    vflip = u[:, 1] < cfg.p_vflip
    transpose = u[:, 2] < cfg.p_transpose
    rotate = u[:, 3] < cfg.p_rotate
    elastic = (u[:, 4] < cfg.p_elastic) & cfg.elastic
    lo, hi = cfg.angle_range
    angle = torch.where(rotate, lo + (hi - lo) * u[:, 5], torch.zeros_like(u[:, 5])) * (math.pi / 180)
    one = torch.ones_like(angle)
    flip = torch.diag_embed(torch.stack([torch.where(hflip, -one, one), torch.where(vflip, -one, one)], 1))
    # Constants are built on the device (a host-to-device copy would synchronise a GPU).
    eye = torch.eye(2, device=u.device)
    trans = torch.where(transpose.view(-1, 1, 1), eye.flip(0), eye)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1)
    return hflip, vflip, transpose, rotate, elastic, rot @ trans @ flip


def _gaussian_kernel(sigma: float, device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def smooth_field(n: int, height: int, width: int, alpha_px: float, sigma_px: float,
                 generator: torch.Generator, device) -> torch.Tensor:
    """Random smooth displacement fields ``(n, 2, H, W)`` (dx, dy) in pixels with RMS ``alpha_px``.

    White noise is drawn on a grid 4x coarser than the patch, smoothed with a separable gaussian,
    scaled, then upsampled bilinearly (smoothing at full resolution would cost 16x more for the
    same field).
    """
    factor = 4
    h, w = max(2, math.ceil(height / factor)), max(2, math.ceil(width / factor))
    noise = torch.randn(n, 2, h, w, generator=generator, device=device)
    k = _gaussian_kernel(max(sigma_px / factor, 0.5), device)
    r = (len(k) - 1) // 2
    field = F.pad(noise.reshape(n * 2, 1, h, w), (r, r, r, r), mode="replicate")
    field = F.conv2d(field, k.view(1, 1, 1, -1))
    field = F.conv2d(field, k.view(1, 1, -1, 1)).reshape(n, 2, h, w)
    rms = field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-8)
    field = field * (alpha_px / rms)
    return F.interpolate(field, size=(height, width), mode="bilinear", align_corners=True)


def _invert_elastic(r_xy: torch.Tensor, disp: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Solve ``p + d(p) = r`` for points ``r (n, K, 2)`` given fields ``disp (n, 2, S, S)``."""
    side = disp.shape[-1]
    p = r_xy
    for _ in range(steps):
        g = ((p + 0.5) * (2.0 / side) - 1.0).unsqueeze(2)          # grid_sample coords (n, K, 1, 2)
        d = F.grid_sample(disp, g, mode="bilinear", padding_mode="border", align_corners=False)
        p = r_xy - d[..., 0].transpose(1, 2)                       # (n, K, 2)
    return p


def _dihedral_subset(x: torch.Tensor, hflip, vflip, transpose) -> None:
    """Flip/transpose samples of ``x (B, C, S, S)`` in place, by index (exact, no interpolation).

    Samples are grouped by their combination of the three flags, so each group costs one read,
    one flip and one write. Used on CPU, where the data-dependent indexing costs nothing extra.
    """
    code = hflip.long() + 2 * vflip.long() + 4 * transpose.long()
    for c in torch.unique(code).tolist():
        if c == 0:
            continue
        idx = torch.nonzero(code == c).flatten()
        dims = [d for d, on in ((-1, c & 1), (-2, c & 2)) if on]
        part = x.index_select(0, idx)
        if dims:
            part = part.flip(dims)
        if c & 4:
            part = part.transpose(-1, -2)
        x.index_copy_(0, idx, part)


def _dihedral_all(x: torch.Tensor, hflip, vflip, transpose) -> torch.Tensor:
    """Same as :func:`_dihedral_subset` with per-sample selects: no GPU synchronisation."""
    x = torch.where(hflip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where(vflip.view(-1, 1, 1, 1), x.flip(-2), x)
    return torch.where(transpose.view(-1, 1, 1, 1), x.transpose(-1, -2), x)


def _resample(x: torch.Tensor, a: torch.Tensor, elastic: torch.Tensor | None, r_xy: torch.Tensor,
              generator: torch.Generator, cfg: AugmentConfig, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_sample path: affine (+ elastic) resampling of ``x (n, 3, S, S)`` float (consumed).

    ``elastic`` None warps every sample; a bool mask warps those samples only (the others get a
    zero field, which keeps the call free of data-dependent shapes).
    """
    n, _, side, _ = x.shape
    # affine_grid maps output to input coordinates: the inverse of A, which is orthogonal, so its
    # transpose. On a square patch the pixel->normalised scaling is the same on both axes and
    # cancels out of the conjugation.
    theta2 = a.transpose(1, 2)
    theta = torch.cat([theta2, torch.zeros_like(theta2[:, :, :1])], dim=2)
    grid = F.affine_grid(theta, [n, 3, side, side], align_corners=False)
    if cfg.elastic:
        disp = smooth_field(n, side, side, cfg.elastic_alpha * side, cfg.elastic_sigma * side,
                            generator, x.device)
        if elastic is not None:
            disp = disp * elastic.view(-1, 1, 1, 1)
        grid = grid + torch.einsum("bij,bjhw->bhwi", theta2, disp * (2.0 / side))
        r_xy = _invert_elastic(r_xy, disp)
    # Sample (image - fill) with zero padding, then add fill back: outside becomes the fill colour.
    warped = F.grid_sample(x.sub_(fill), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.add_(fill), r_xy


def augment_batch(images: torch.Tensor, points: torch.Tensor, mask: torch.Tensor,
                  labels: torch.Tensor, generator: torch.Generator,
                  config: AugmentConfig = AugmentConfig(), fill=WHITE,
                  sync_free: bool | None = None) -> AugmentedBatch:
    """Augment a batch of square patches and their points with the same random transforms.

    Args:
        images: uint8 ``(B, S, S, 3)`` pixels, or a float ``(B, 3, S, S)`` batch already scaled for
            the network (``CamNet.prepare_input``; then pass its ``fill_value()``), on the target
            device. A float batch may be modified in place.
        points: float ``(B, K, 2)`` yx, patch-local pixels (padding rows arbitrary).
        mask: bool ``(B, K)``, True for real points.
        labels: ``(B,)`` weak labels (0/1, any numeric or bool dtype).
        generator: a ``torch.Generator`` on the same device (reproducibility).
        config: probabilities and ranges.
        fill: value of areas brought in from outside the patch: white (255) for uint8 input, the
            scaled white (a scalar or ``(1, C, 1, 1)`` tensor) for a scaled float batch.
        sync_free: how to split the batch between the exact and the resampling path. True: run
            both paths on every sample and select per sample (no data-dependent shapes, so a GPU
            never waits for the host); False: run each path on its own subset only (cheapest on
            CPU). None picks True on CUDA. The pixels and points are the same either way; the
            random draws of the elastic field differ.

    Returns:
        An :class:`AugmentedBatch` with float ``(B, 3, S, S)`` images (0..255 for uint8 input). A
        point stays valid only if it lands inside the frame (``-0.5 <= coord < S - 0.5``). A
        positive label becomes 0 when the sample had points and none is left; samples without
        points keep their label (e.g. pseudo-labels).

    Raises:
        ValueError: non-square patches or mismatched shapes (a programming error).
    """
    if images.dtype == torch.uint8:
        b, height, width, ch = images.shape
        x = torch.empty((b, ch, height, width), dtype=torch.float32, device=images.device)
        x.copy_(images.permute(0, 3, 1, 2))  # dtype and layout change in one pass
    else:
        x = images
        b, ch, height, width = x.shape
    if height != width or ch != 3:
        raise ValueError(f"augment_batch needs square RGB patches, got {tuple(images.shape)}")
    if points.shape[:2] != mask.shape or points.shape[0] != b:
        raise ValueError("points (B, K, 2) and mask (B, K) do not match the batch")
    if sync_free is None:
        sync_free = x.device.type == "cuda"
    u = torch.rand(b, 6, generator=generator, device=x.device)
    hflip, vflip, transpose, rotate, elastic, a = _linear_maps(u, config)
    centre = (width - 1) / 2.0
    new_xy = (points.flip(-1).float() - centre) @ a.transpose(1, 2) + centre   # A q + c, batched
    resample = rotate | elastic
    if sync_free:
        warped, warped_xy = _resample(x.clone(), a, elastic, new_xy, generator, config, fill)
        keep = ~resample
        x = torch.where(resample.view(-1, 1, 1, 1), warped,
                        _dihedral_all(x, hflip & keep, vflip & keep, transpose & keep))
        new_xy = torch.where(resample.view(-1, 1, 1), warped_xy, new_xy)
    else:
        heavy = torch.nonzero(resample).flatten()
        if len(heavy):
            el = elastic[heavy] if config.elastic else None
            warped, warped_xy = _resample(x.index_select(0, heavy), a[heavy], el, new_xy[heavy],
                                          generator, config, fill)
        keep = ~resample
        _dihedral_subset(x, hflip & keep, vflip & keep, transpose & keep)
        if len(heavy):
            x.index_copy_(0, heavy, warped)
            new_xy[heavy] = warped_xy

    new_points = new_xy.flip(-1)
    inside = ((new_points >= -0.5) & (new_points < width - 0.5)).all(dim=-1)
    new_mask = mask & inside
    had = mask.any(dim=1)
    kept = ~had | new_mask.any(dim=1)
    new_labels = (labels.bool() & kept).to(labels.dtype)
    return AugmentedBatch(x, new_points, new_mask, new_labels)
