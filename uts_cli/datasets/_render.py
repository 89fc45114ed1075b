"""Renderer for synthetic H&E high-power fields (numpy + scipy only).

A field is built as two stain concentration maps, haematoxylin ``cH`` and eosin ``cE``, which
are turned into RGB by Beer-Lambert mixing: ``OD = cH * h + cE * e + residual`` and
``RGB = Io * exp(-OD)``. Tissue (stroma with fibres, epithelial nests, white lumina and fat,
sometimes a tissue edge with empty glass), normal nuclei, mitotic figures and their look-alikes
are painted into those maps, each object in a small window around it so a field costs a fraction
of a second.

What separates a mitosis from a look-alike here is what separates them under the microscope:
mitotic chromatin is very dark *and* irregular (hairy plates, spiky clumps, paired bars), while
apoptotic bodies, pyknotic nuclei and lymphocytes are dark but smooth and round.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PIXEL_SIZE_UM = 0.25

MITOSIS_PHASES = ("prophase", "prometaphase", "metaphase", "anaphase", "telophase")
PHASE_WEIGHTS = (0.15, 0.15, 0.35, 0.15, 0.20)
LOOKALIKE_TYPES = ("apoptotic", "pyknotic", "lymphocyte_cluster")
LOOKALIKE_WEIGHTS = (0.45, 0.30, 0.25)

# Ruifrok & Johnston optical-density vectors (unit length) for haematoxylin and eosin.
_H_REF = np.array([0.650, 0.704, 0.286])
_E_REF = np.array([0.072, 0.990, 0.105])
_GREY = np.full(3, 1 / np.sqrt(3))

_MIN_SPECIAL_DIST = 50.0  # px between mitoses / look-alikes (design centres)
_SPECIAL_BORDER = 24  # px kept free at the field border so a centroid is well inside
_SPECIAL_RADIUS = 30.0  # px kept free of normal nuclei around a special object
_NUCLEUS_SPACING = 26.0  # px between normal-nucleus candidates at nucleus_density 1
_MIN_GAIN = 0.05  # a wide stain spread never makes a stain vanish or turn negative
_GAMMA_RANGE = (0.7, 1.3)


@dataclass(frozen=True)
class Stain:
    """Beer-Lambert parameters of one case (or one field of it)."""

    h: np.ndarray  # (3,) haematoxylin OD vector, unit length
    e: np.ndarray  # (3,) eosin OD vector, unit length
    h_gain: float
    e_gain: float
    io: np.ndarray  # (3,) background intensity per channel
    gamma: float

    def to_dict(self) -> dict:
        return {
            "h": [round(float(v), 4) for v in self.h],
            "e": [round(float(v), 4) for v in self.e],
            "h_gain": round(self.h_gain, 4),
            "e_gain": round(self.e_gain, 4),
            "io": [round(float(v), 2) for v in self.io],
            "gamma": round(self.gamma, 4),
        }


@dataclass(frozen=True)
class RenderedObject:
    """A mitosis or look-alike painted into a field; (y, x) is its haematoxylin centroid."""

    y: float
    x: float
    is_mitosis: bool
    subtype: str


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 1e-3, None)
    return v / np.linalg.norm(v)


def _spread(low: float, high: float, spread: float) -> tuple[float, float]:
    """The range ``low..high`` widened (``spread`` > 1) or narrowed about its centre.

    Written so that ``spread`` 1 returns ``low`` and ``high`` exactly (the draws of the default
    look do not change by a rounding error) and ``spread`` 0 returns the centre twice.
    """
    shrink = (1.0 - spread) * (high - low) / 2
    return low + shrink, high - shrink


def case_stain(rng: np.random.Generator, spread: float = 1.0) -> Stain:
    """Stain of one case: hue and strength vary as between labs and scanners.

    Args:
        rng: the case's own generator.
        spread: multiplier on the case-to-case variation (the sd of the hue noise and the
            half-width of every range about its centre); 1 is the default look, 0 gives every
            case the reference stain. Draws are the same in number and order for any spread.
            Gains stay above 0.05, the background intensity within 225..255 and gamma within
            0.7..1.3 however wide the spread.
    """
    base_io = rng.uniform(*_spread(236, 252, spread))
    return Stain(
        h=_unit(_H_REF + rng.normal(0, 0.06 * spread, 3)),
        e=_unit(_E_REF + rng.normal(0, 0.07 * spread, 3)),
        h_gain=max(float(rng.uniform(*_spread(0.75, 1.25, spread))), _MIN_GAIN),
        e_gain=max(float(rng.uniform(*_spread(0.6, 1.35, spread))), _MIN_GAIN),
        io=np.clip(base_io + rng.normal(0, 3.0 * spread, 3), 225, 255),
        gamma=float(np.clip(rng.uniform(*_spread(0.9, 1.1, spread)), *_GAMMA_RANGE)),
    )


def field_stain(stain: Stain, rng: np.random.Generator) -> Stain:
    """A small per-field drift of the case stain (section thickness, focus, lamp)."""
    return Stain(
        h=_unit(stain.h + rng.normal(0, 0.015, 3)),
        e=_unit(stain.e + rng.normal(0, 0.015, 3)),
        h_gain=stain.h_gain * float(rng.uniform(0.93, 1.07)),
        e_gain=stain.e_gain * float(rng.uniform(0.9, 1.1)),
        io=np.clip(stain.io + rng.normal(0, 1.0, 3), 225, 255),
        gamma=stain.gamma,
    )


# ----------------------------------------------------------------------------- noise fields


def _upsample_taps(size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights (size, 5) that interpolate coarse samples ``scale`` px apart.

    Gaussian weights over the 5 nearest coarse samples. Done by gathering rather than as a
    matrix product: a threaded BLAS on a busy 2-core machine made the product 2x slower overall.
    """
    pos = np.arange(size, dtype=np.float32) / scale + 1
    idx = np.floor(pos).astype(np.int64)[:, None] + np.arange(-2, 3)[None, :]
    w = np.exp(-0.5 * ((pos[:, None] - idx) / 0.7) ** 2)
    return idx, (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with structures about ``scale`` px wide."""
    n = int(np.ceil(size / scale)) + 4
    coarse = rng.standard_normal((n, n)).astype(np.float32)
    idx, w = _upsample_taps(size, scale)
    rows = np.einsum("io,ion->in", w, coarse[idx])
    up = np.einsum("jo,ijo->ij", w, rows[:, idx])
    return (up - up.mean()) / (up.std() + 1e-6)


def _fine_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return noise / (noise.std() + 1e-6)


# ----------------------------------------------------------------------------- tissue


def _tissue_mask(rng: np.random.Generator, size: int, edge: bool) -> np.ndarray:
    """Hard tissue mask: False on glass (a tissue edge), lumina and fat vacuoles."""
    tissue = np.ones((size, size), bool)
    if edge:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        # Near axis-aligned edges leave whole patch-sized areas of bare glass.
        theta = rng.integers(4) * np.pi / 2 + rng.uniform(-0.35, 0.35)
        proj = (xx - size / 2) * np.cos(theta) + (yy - size / 2) * np.sin(theta)
        proj += 18 * _smooth_noise(rng, size, 64)
        glass = rng.uniform(0.4, 0.6)
        tissue &= proj < np.quantile(proj, 1 - glass)
    for _ in range(rng.poisson(2.5)):  # lumina and fat vacuoles
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(10, 42)
        sl, dy, dx = _window(cy, cx, r * 1.4, size)
        d = _blob_distance(dy, dx, r, r * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi),
                           _harmonics(rng, (2, 3, 5), (0, 0.12)))
        tissue[sl] &= d > 0
    return tissue


def _fibres(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """Wavy collagen streaks (anisotropic noise sampled along a warped, rotated frame), angle."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    across = -xx * np.sin(theta) + yy * np.cos(theta) + 14 * _smooth_noise(rng, size, 60)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    width, length = rng.uniform(2.5, 4.0), rng.uniform(25, 50)
    n = int(2 * size / width) + 8
    grid = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), (0.6, 0.8))
    grid /= grid.std()
    coords = np.stack([across / width + n / 2, along / length + n / 2])
    streaks = ndimage.map_coordinates(grid, coords, order=1, mode="wrap")
    return np.clip(streaks, 0, None) ** 1.5, float(theta)


def _background(rng: np.random.Generator, size: int, soft: np.ndarray, cell: np.ndarray):
    """Stain maps of tissue without nuclei (fibrous stroma, paler epithelial cytoplasm).

    Returns:
        (c_h, c_e, fibre angle in radians).
    """
    fibres, angle = _fibres(rng, size)
    coarse = _smooth_noise(rng, size, 40)
    stroma_e = rng.uniform(0.4, 0.65) * (0.55 + 0.35 * fibres) * (1 + 0.15 * coarse)
    epi_e = rng.uniform(0.22, 0.36) * (1 + 0.15 * _smooth_noise(rng, size, 12))
    c_e = soft * (cell * epi_e + (1 - cell) * stroma_e)
    c_h = soft * (0.03 + 0.06 * cell) * (1 + 0.3 * coarse)
    return np.clip(c_h, 0, None).astype(np.float32), np.clip(c_e, 0, None).astype(np.float32), angle


# ----------------------------------------------------------------------------- primitives


def _window(cy: float, cx: float, radius: float, size: int):
    """Slices of a square window around (cy, cx), clipped to the field, and local coords."""
    r = int(np.ceil(radius))
    y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 2, size)
    x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 2, size)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    return (slice(y0, y1), slice(x0, x1)), dy, dx


def _ramp(d: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-mask from a signed distance (negative inside), ``edge`` px wide."""
    return np.clip(0.5 - d / edge, 0.0, 1.0)


def _blob_distance(dy, dx, a, b, theta, harmonics):
    """Approximate signed distance (px) to an ellipse whose radius is modulated by harmonics.

    ``harmonics`` is a list of (k, amplitude, phase); high k with large amplitude gives spiky
    borders, none gives a smooth ellipse.
    """
    c, s = np.cos(theta), np.sin(theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    rn = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    if harmonics:
        phi = np.arctan2(v / b, u / a)
        mod = 1.0 + sum(amp * np.cos(k * phi + ph) for k, amp, ph in harmonics)
        rn = rn / np.maximum(mod, 0.2)
    return (rn - 1.0) * min(a, b)


def _harmonics(rng, ks, amp_range):
    return [(k, rng.uniform(*amp_range), rng.uniform(0, 2 * np.pi)) for k in ks]


def _rods(dy, dx, centres, dirs, half_len, half_w, edge=0.9):
    """Soft union of short rods (chromosome arms): max over rods of a capsule mask."""
    py = dy[None] - centres[:, 0, None, None]
    px = dx[None] - centres[:, 1, None, None]
    t = py * dirs[:, 0, None, None] + px * dirs[:, 1, None, None]
    t = np.clip(t, -half_len[:, None, None], half_len[:, None, None])
    dist = np.hypot(py - t * dirs[:, 0, None, None], px - t * dirs[:, 1, None, None])
    return _ramp(dist - half_w[:, None, None], edge).max(axis=0)


def _angles_to_dirs(angles):
    return np.stack([np.sin(angles), np.cos(angles)], axis=1)


def _disc(dy, dx, r, edge=1.2):
    return _ramp(np.hypot(dy, dx) - r, edge)


# ----------------------------------------------------------------------------- normal cells


def _paint_nucleus(c_h, c_e, tex, rng, cy, cx, kind, fibre_angle):
    """Add one ordinary nucleus (epithelial, fibroblast or lymphocyte) to the stain maps."""
    size = c_h.shape[0]
    if kind == "epithelial":
        a = rng.uniform(11, 19)
        b = a * rng.uniform(0.65, 0.95)
        theta = rng.uniform(0, np.pi)
        # A few hyperchromatic nuclei: dark, but large, granular and smooth-edged.
        dens = rng.uniform(0.9, 1.3) if rng.random() < 0.08 else rng.uniform(0.4, 0.85)
        harm = _harmonics(rng, (2, 3, 4), (0.0, 0.05))
        grain = 0.4
    elif kind == "fibroblast":
        a = rng.uniform(11, 20)
        b = rng.uniform(2.8, 4.5)
        theta = fibre_angle + rng.normal(0, 0.25)
        dens = rng.uniform(0.8, 1.2)
        harm = _harmonics(rng, (2, 3), (0.0, 0.04))
        grain = 0.2
    else:  # scattered lymphocyte
        a = rng.uniform(7, 9.5)
        b = a * rng.uniform(0.88, 1.0)
        theta = rng.uniform(0, np.pi)
        dens = rng.uniform(1.0, 1.35)
        harm = []
        grain = 0.2
    sl, dy, dx = _window(cy, cx, a + 3, size)
    d = _blob_distance(dy, dx, a, b, theta, harm)
    m = _ramp(d, 1.4)
    rim = np.exp(-((d + 0.8) / 1.3) ** 2)
    h = dens * m * (1 + grain * tex[sl]) + 0.3 * dens * rim * (kind == "epithelial")
    if kind == "epithelial" and rng.random() < 0.45:
        off = rng.uniform(-0.35, 0.35, 2) * b
        nucleolus = _disc(dy - off[0], dx - off[1], rng.uniform(1.8, 3.0), 1.0)
        h = h + 0.9 * nucleolus
        c_e[sl] += 0.25 * nucleolus
    c_h[sl] += np.clip(h, 0, None)
    c_e[sl] *= 1 - 0.55 * m


# ----------------------------------------------------------------------------- mitoses


def _plate(rng, centre, axis_angle, length, spread, n_rods, outward=None):
    """Rods forming a metaphase-like plate centred at ``centre`` (local coords).

    Rods lie roughly perpendicular to the plate; with ``outward`` (a unit vector) they trail
    from the plate towards it, as chromosome arms do in anaphase.
    """
    axis = np.array([np.sin(axis_angle), np.cos(axis_angle)])
    normal = np.array([axis[1], -axis[0]])
    s = rng.uniform(-length / 2, length / 2, n_rods)
    t = rng.normal(0, spread, n_rods)
    half_len = rng.uniform(2.0, 4.5, n_rods)
    centres = centre + s[:, None] * axis + t[:, None] * normal
    base = np.arctan2(normal[0], normal[1])
    dirs = _angles_to_dirs(base + rng.normal(0, 0.5, n_rods))
    if outward is not None:
        centres = centres + half_len[:, None] * outward
    half_w = rng.uniform(0.9, 1.5, n_rods)
    return centres, dirs, half_len, half_w


def _capsule(dy, dx, centre, axis_angle, half_len, half_w, edge=1.2):
    d = np.array([np.sin(axis_angle), np.cos(axis_angle)])
    return _rods(dy, dx, centre[None], d[None], np.array([half_len]), np.array([half_w]), edge)


def _mitosis_chromatin(rng, dy, dx, phase, tex):
    """Haematoxylin of one mitotic figure in local coords; returns (h, extent px)."""
    ang = rng.uniform(0, np.pi)
    axis = np.array([np.sin(ang), np.cos(ang)])
    normal = np.array([axis[1], -axis[0]])
    zero = np.zeros(2)
    dens = rng.uniform(2.0, 2.8)
    if phase == "prophase":
        r = rng.uniform(13, 18)
        body = _ramp(_blob_distance(dy, dx, r, r * rng.uniform(0.85, 1.0), ang,
                                    _harmonics(rng, (2, 3), (0, 0.05))), 1.5)
        n = int(rng.integers(28, 48))
        rr = r * 0.85 * np.sqrt(rng.uniform(0, 1, n))
        phi = rng.uniform(0, 2 * np.pi, n)
        centres = np.stack([rr * np.sin(phi), rr * np.cos(phi)], 1)
        threads = _rods(dy, dx, centres, _angles_to_dirs(rng.uniform(0, np.pi, n)),
                        rng.uniform(2.5, 5.0, n), rng.uniform(0.8, 1.2, n))
        h = body * rng.uniform(0.35, 0.55) + threads * dens * 0.8
        return h * (1 + 0.1 * tex), r
    if phase == "prometaphase":
        r = rng.uniform(8, 12)
        core = _ramp(_blob_distance(dy, dx, r, r * rng.uniform(0.7, 1.0), ang,
                                    _harmonics(rng, (3, 5, 7, 9, 12), (0.04, 0.12))), 1.0)
        n = int(rng.integers(24, 40))
        phi = rng.uniform(0, 2 * np.pi, n)
        half_len = rng.uniform(2.5, 5.0, n)
        rad = r * rng.uniform(0.6, 1.0, n) + half_len * 0.6
        centres = np.stack([rad * np.sin(phi), rad * np.cos(phi)], 1)
        arms = _rods(dy, dx, centres, _angles_to_dirs(phi + rng.normal(0, 0.4, n)), half_len,
                     rng.uniform(0.8, 1.3, n))
        return dens * np.maximum(core, arms) * (1 + 0.12 * tex), r + 8
    if phase == "metaphase":
        length = rng.uniform(26, 42)
        spread = rng.uniform(1.5, 2.8)
        core = _capsule(dy, dx, zero, ang, length / 2 - 3, spread * 1.2)
        rods = _rods(dy, dx, *_plate(rng, zero, ang, length, spread, int(length * 1.1)))
        return dens * np.maximum(core, rods) * (1 + 0.12 * tex), length / 2 + 4
    if phase == "anaphase":
        gap = rng.uniform(16, 28)
        length = rng.uniform(20, 34)
        h = np.zeros_like(dy * dx)
        for sign in (-1, 1):
            c = sign * gap / 2 * normal
            core = _capsule(dy, dx, c, ang, length / 2 - 3, rng.uniform(1.4, 2.4))
            rods = _rods(dy, dx, *_plate(rng, c, ang, length, 1.6, int(length), -sign * normal))
            h = np.maximum(h, np.maximum(core, rods))
        return dens * h * (1 + 0.12 * tex), max(length / 2, gap / 2) + 6
    # telophase: two irregular daughter clumps
    dist = rng.uniform(22, 34)
    h = np.zeros_like(dy * dx)
    for sign in (-1, 1):
        c = sign * dist / 2 * axis
        r = rng.uniform(6.5, 10)
        core = _ramp(_blob_distance(dy - c[0], dx - c[1], r * rng.uniform(0.8, 1.0), r * 0.8,
                                    ang + np.pi / 2, _harmonics(rng, (3, 5, 8, 11), (0.05, 0.13))),
                     1.0)
        n = int(rng.integers(10, 20))
        phi = rng.uniform(0, 2 * np.pi, n)
        half_len = rng.uniform(2.0, 3.5, n)
        rad = r * 0.8 + half_len * 0.5
        centres = c + np.stack([rad * np.sin(phi), rad * np.cos(phi)], 1)
        arms = _rods(dy, dx, centres, _angles_to_dirs(phi), half_len, rng.uniform(0.8, 1.2, n))
        h = np.maximum(h, np.maximum(core, arms))
    return dens * h * (1 + 0.12 * tex), dist / 2 + 10


def _paint_mitosis(c_h, c_e, tex, rng, cy, cx, phase):
    """Add one mitotic figure; returns (window slices, its haematoxylin) for the centroid."""
    size = c_h.shape[0]
    sl, dy, dx = _window(cy, cx, 40, size)
    h, extent = _mitosis_chromatin(rng, dy, dx, phase, tex[sl])
    # Mitotic cells round up with pale, clear cytoplasm around the chromosomes.
    if rng.random() < (0.7 if phase in ("metaphase", "anaphase") else 0.4):
        halo_r = extent + rng.uniform(4, 10)
        halo = _ramp(_blob_distance(dy, dx, halo_r, halo_r * rng.uniform(0.8, 1.0),
                                    rng.uniform(0, np.pi), _harmonics(rng, (2, 3), (0, 0.06))), 4.0)
        strength = rng.uniform(0.2, 0.5)
        c_e[sl] *= 1 - strength * halo
        c_h[sl] *= 1 - 0.6 * halo
    c_h[sl] += h
    c_e[sl] *= 1 - 0.5 * np.clip(h, 0, 1)
    return sl, h


# ----------------------------------------------------------------------------- look-alikes


def _paint_lookalike(c_h, c_e, tex, rng, cy, cx, kind):
    """Add one look-alike; returns (window slices, its haematoxylin) for the centroid."""
    size = c_h.shape[0]
    sl, dy, dx = _window(cy, cx, 34, size)
    t = tex[sl]
    if kind == "apoptotic":
        r = rng.uniform(5.5, 10)
        dens = rng.uniform(2.0, 2.9)
        if rng.random() < 0.4:  # karyorrhexis: round beads
            n = int(rng.integers(2, 6))
            phi = rng.uniform(0, 2 * np.pi, n)
            rad = rng.uniform(0.4, 1.1, n) * r
            h = np.zeros_like(dy * dx)
            for p, q in zip(phi, rad):
                h = np.maximum(h, _disc(dy - q * np.sin(p), dx - q * np.cos(p),
                                        rng.uniform(2.5, 4.5), 1.3))
        else:
            h = _ramp(_blob_distance(dy, dx, r, r * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi),
                                     _harmonics(rng, (2,), (0, 0.03))), 1.5)
        cyto_r = r * rng.uniform(1.6, 2.3)
        cyto = _disc(dy, dx, cyto_r, 1.5)
        if rng.random() < 0.45:  # retraction space around the shrunken cell
            ring = _disc(dy, dx, cyto_r + rng.uniform(2, 5), 1.5) - cyto
            c_e[sl] *= 1 - 0.5 * ring
            c_h[sl] *= 1 - 0.5 * ring
        c_e[sl] += rng.uniform(0.2, 0.7) * cyto  # hypereosinophilic cytoplasm
        h = dens * h * (1 + 0.05 * t)
    elif kind == "pyknotic":
        r = rng.uniform(5.5, 9)
        dens = rng.uniform(1.8, 2.6)
        h = dens * _ramp(_blob_distance(dy, dx, r, r * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi),
                                        _harmonics(rng, (2,), (0, 0.03))), 1.4) * (1 + 0.05 * t)
        if rng.random() < 0.5:
            c_e[sl] += 0.3 * (_disc(dy, dx, r * 1.5, 1.5))
    else:  # lymphocyte cluster: packed small round dark nuclei
        n = int(rng.integers(4, 10))
        radii = rng.uniform(6.5, 9.5, n)
        centres = [np.zeros(2)]
        reach = 12.0
        for _ in range(1000):  # bounded: a crowded draw just makes a smaller cluster
            if len(centres) == n:
                break
            cand = rng.uniform(-reach, reach, 2)
            k = len(centres)
            if all(np.hypot(*(cand - c)) > 0.9 * (radii[k] + radii[j]) for j, c in enumerate(centres)):
                centres.append(cand)
            reach = min(reach + 0.3, 26.0)  # grow outwards so the cluster stays packed
        h = np.zeros_like(dy * dx)
        for c, r in zip(centres, radii):
            h = np.maximum(h, rng.uniform(1.6, 2.2) * _disc(dy - c[0], dx - c[1], r, 1.4))
        h = h * (1 + 0.12 * t)
        c_e[sl] *= 1 - 0.4 * _disc(dy, dx, 26, 6)
    c_h[sl] += np.clip(h, 0, None)
    c_e[sl] *= 1 - 0.5 * np.clip(h, 0, 1)
    return sl, h


# ----------------------------------------------------------------------------- placement


def _place_specials(rng, size, tissue_dist, cell, kinds):
    """Dart-throw object centres inside tissue, apart from each other and from the border."""
    placed: list[tuple[float, float, bool, str]] = []
    for is_mitosis, subtype in kinds:
        for _ in range(300):
            y, x = rng.uniform(_SPECIAL_BORDER, size - _SPECIAL_BORDER, 2)
            iy, ix = int(y), int(x)
            if tissue_dist[iy, ix] < 22:
                continue
            # Mitoses sit in the cellular (tumour) areas; lymphocytes prefer stroma.
            if is_mitosis:
                pref = cell[iy, ix]
            else:
                pref = 1 - cell[iy, ix] if subtype == "lymphocyte_cluster" else 0.5
            if rng.random() > 0.2 + 0.8 * pref:
                continue
            if any(np.hypot(y - p[0], x - p[1]) < _MIN_SPECIAL_DIST for p in placed):
                continue
            placed.append((y, x, is_mitosis, subtype))
            break
    return placed


def _place_nuclei(rng, size, tissue_dist, cell, specials, density=1.0):
    """Jittered-grid candidates thinned by cellularity, then greedy non-overlap.

    ``density`` scales the number of candidates per area (the grid spacing shrinks by its
    square root, the jitter with it); 1 is the default look.
    """
    spacing = _NUCLEUS_SPACING / np.sqrt(density)
    jitter = 9 * spacing / _NUCLEUS_SPACING
    g = np.arange(spacing / 2, size, spacing)
    gy, gx = np.meshgrid(g, g, indexing="ij")
    pts = np.stack([gy.ravel(), gx.ravel()], 1) + rng.uniform(-jitter, jitter, (gy.size, 2))
    pts = np.clip(pts, 0, size - 1)
    iy, ix = pts[:, 0].astype(int), pts[:, 1].astype(int)
    c = cell[iy, ix]
    # Cellular areas: tumour nuclei; stroma: sparse fibroblasts and a few lymphocytes.
    u = rng.random(len(pts))
    p_epi, p_fib, p_lym = 0.97 * c, 0.22 * (1 - c), 0.08 * (1 - c)
    kinds = np.select([u < p_epi, u < p_epi + p_fib, u < p_epi + p_fib + p_lym], [0, 1, 2], -1)
    radius = np.select([kinds == 0, kinds == 1, kinds == 2], [15.0, 8.0, 8.5], 0.0)
    keep = (kinds >= 0) & (tissue_dist[iy, ix] > radius * 0.6)
    order = rng.permutation(np.flatnonzero(keep))
    sp = np.array([(s[0], s[1]) for s in specials], float).reshape(-1, 2)
    acc_pts = np.zeros((0, 2))
    acc_r = np.zeros(0)
    out = []
    names = ("epithelial", "fibroblast", "lymphocyte")
    for i in order:
        p, r = pts[i], radius[i]
        if len(sp) and np.min(np.hypot(*(sp - p).T)) < _SPECIAL_RADIUS + r * 0.7:
            continue
        if len(acc_r) and np.any(np.hypot(*(acc_pts - p).T) < 0.75 * (acc_r + r)):
            continue
        acc_pts = np.vstack([acc_pts, p])
        acc_r = np.append(acc_r, r)
        out.append((p[0], p[1], names[kinds[i]]))
    return out


# ----------------------------------------------------------------------------- compose


def _compose(c_h, c_e, tissue_soft, stain: Stain, rng, size) -> np.ndarray:
    """Beer-Lambert mixing, then scanner gamma, optical blur and sensor noise."""
    resid = np.clip(0.012 + 0.03 * tissue_soft * (1 + 0.5 * _smooth_noise(rng, size, 30)), 0, None)
    # (Io * exp(-OD) / 255) ** gamma == (Io / 255) ** gamma * exp(-gamma * OD): one exp, no pow.
    vectors = stain.gamma * np.stack([stain.h_gain * stain.h, stain.e_gain * stain.e, _GREY])
    vectors = vectors.astype(np.float32)
    od = c_h[..., None] * vectors[0] + c_e[..., None] * vectors[1] + resid[..., None] * vectors[2]
    rgb = np.exp(-od)
    rgb *= (255.0 * (stain.io / 255.0) ** stain.gamma).astype(np.float32)
    sigma = rng.uniform(0.5, 1.0)
    rgb = ndimage.gaussian_filter(rgb, (sigma, sigma, 0))
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(rng.uniform(1.5, 3.0))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render_field(rng: np.random.Generator, size: int, stain: Stain, n_mitoses: int,
                 n_lookalikes: int, edge: bool, nucleus_density: float = 1.0,
                 ) -> tuple[np.ndarray, list[RenderedObject]]:
    """Render one square high-power field.

    Args:
        rng: the field's own generator (so fields do not depend on each other).
        size: side in pixels.
        stain: the field's stain (see ``field_stain``).
        n_mitoses, n_lookalikes: how many to try to place; fewer fit when tissue is scarce.
        edge: whether the field shows a tissue edge with bare glass.
        nucleus_density: relative number of normal (non-mitotic) nuclei per area; 1 is the
            default look.

    Returns:
        (rgb uint8 (size, size, 3), objects with their haematoxylin centroids).
    """
    tissue = _tissue_mask(rng, size, edge)
    tissue_dist = ndimage.distance_transform_edt(tissue)
    cell = 1 / (1 + np.exp(-3.0 * (_smooth_noise(rng, size, 90) - rng.uniform(-0.6, 0.4))))
    cell = (cell * tissue).astype(np.float32)
    tissue_soft = ndimage.gaussian_filter(tissue.astype(np.float32), 1.5)
    c_h, c_e, fibre_angle = _background(rng, size, tissue_soft, cell)
    tex = _fine_noise(rng, size, 0.9)

    kinds = [(True, str(rng.choice(MITOSIS_PHASES, p=PHASE_WEIGHTS))) for _ in range(n_mitoses)]
    kinds += [(False, str(rng.choice(LOOKALIKE_TYPES, p=LOOKALIKE_WEIGHTS))) for _ in range(n_lookalikes)]
    # Shuffled so that, in a crowded field, mitoses and look-alikes are dropped alike.
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    specials = _place_specials(rng, size, tissue_dist, cell, kinds)
    for y, x, kind in _place_nuclei(rng, size, tissue_dist, cell, specials, nucleus_density):
        _paint_nucleus(c_h, c_e, tex, rng, y, x, kind, fibre_angle)

    objects = []
    for y, x, is_mitosis, subtype in specials:
        paint = _paint_mitosis if is_mitosis else _paint_lookalike
        sl, h = paint(c_h, c_e, tex, rng, y, x, subtype)
        w = np.clip(h, 0, None)
        ys = np.arange(sl[0].start, sl[0].stop)[:, None]
        xs = np.arange(sl[1].start, sl[1].stop)[None, :]
        total = w.sum()
        objects.append(RenderedObject(float((w * ys).sum() / total), float((w * xs).sum() / total),
                                      is_mitosis, subtype))
    # Nuclei near a lumen or the tissue edge are cut by it, as in a section.
    c_h *= tissue_soft
    c_e *= tissue_soft
    rgb = _compose(c_h, c_e, tissue_soft, stain, rng, size)
    return rgb, objects
