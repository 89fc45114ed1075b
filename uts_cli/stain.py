"""Stain normalization: per-channel histogram matching, then Macenko, batched on CPU or CUDA.

The original pipeline normalized one patch at a time with ``skimage.exposure.match_histograms`` and
torchstain's Macenko normalizer. This module reproduces both on a whole batch of uint8 patches at once
(``(B, H, W, 3)`` tensors on any device):

* histogram matching gives the same uint8 values as ``match_histograms(..., channel_axis=-1)``
  (which truncates its interpolated values into a uint8 array), through one 256-entry lookup table
  per patch and channel;
* Macenko follows torchstain's torch backend step by step (Io, alpha, beta, its nearest-rank
  percentile, ``OD < beta`` masking on any channel, eigh of the covariance of the masked optical
  densities, angle percentiles, least-squares concentrations, 99th percentile maxima, the H/E column
  order rule, clipping at 255 and truncation to integers), in float32 like torchstain.

Patches with too little tissue (torchstain raises on those, or returns noise) are returned unchanged
and flagged ``ok=False``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from uts_cli.errors import InputDataError

#: Fewest tissue pixels (OD >= beta on every channel) for a Macenko estimate. torchstain raises
#: below 1 (empty percentile) and its covariance is undefined below 2; 3-D covariance and 1st/99th
#: percentiles need far more to mean anything.
MIN_TISSUE_PIXELS = 64
#: Default smallest share of tissue pixels in a patch; below it the patch passes through unchanged.
DEFAULT_MIN_TISSUE_FRACTION = 0.02

_STATE_VERSION = 1
# Pixels per internal chunk: about 4 patches of 500 x 500 on CPU (cache-sized float temporaries),
# 64 on CUDA (about 1 GB of temporaries).
_CHUNK_PIXELS_CPU = 1 << 20
_CHUNK_PIXELS_CUDA = 1 << 24
# Keeps the int32 histogram index (patch * 768 + channel * 256 + value) far from overflow.
_MAX_CHUNK_PATCHES = 1 << 16


@dataclass
class StainState:
    """Everything later commands need to reproduce a normalization without the reference image.

    Attributes:
        hist_ref: (3, 256) float64 cumulative distribution of the reference per channel
            (``cdf[c, v]`` = share of reference pixels with value <= v), or None when histogram
            matching is off.
        he_ref: (3, 2) Macenko reference stain matrix (H column, then E), or None when Macenko is off.
        max_c_ref: (2,) reference 99th percentile stain concentrations, or None.
        io: transmitted light intensity.
        alpha: angle percentile (in percent) for the extreme stain vectors.
        beta: optical density threshold below which a pixel counts as background.
        min_tissue_fraction: smallest share of tissue pixels for a patch to be normalized.
    """

    hist_ref: np.ndarray | None
    he_ref: np.ndarray | None
    max_c_ref: np.ndarray | None
    io: float = 240.0
    alpha: float = 1.0
    beta: float = 0.15
    min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (nested lists and floats); ``from_dict`` restores it exactly."""

        def arr(a: np.ndarray | None):
            return None if a is None else np.asarray(a, dtype=np.float64).tolist()

        return {"version": _STATE_VERSION, "hist_ref": arr(self.hist_ref), "he_ref": arr(self.he_ref),
                "max_c_ref": arr(self.max_c_ref), "io": float(self.io), "alpha": float(self.alpha),
                "beta": float(self.beta), "min_tissue_fraction": float(self.min_tissue_fraction)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainState:
        """Rebuild a state written by ``to_dict``.

        Args:
            d: the dict (for example read back from JSON or HDF5 attributes).

        Returns:
            The restored StainState.

        Raises:
            InputDataError: when a field is missing or has the wrong shape.
        """
        hint = "re-run `uts normalize` to write a fresh stain state"
        if not isinstance(d, dict):
            raise InputDataError("stain state is not a mapping", hint=hint)

        def arr(key: str, shape: tuple[int, ...]) -> np.ndarray | None:
            value = d.get(key)
            if value is None:
                return None
            try:
                a = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise InputDataError(f"stain state field {key!r} is not numeric", hint=hint) from exc
            if a.shape != shape or not np.all(np.isfinite(a)):
                raise InputDataError(f"stain state field {key!r} has shape {a.shape}, expected {shape}"
                                     " with finite values", hint=hint)
            return a

        version = d.get("version", _STATE_VERSION)
        if not isinstance(version, int) or version > _STATE_VERSION:
            raise InputDataError(f"stain state version {version!r} is newer than this uts reads "
                                 f"({_STATE_VERSION})", hint="upgrade uts, or re-run `uts normalize`")
        hist_ref = arr("hist_ref", (3, 256))
        if hist_ref is not None and (np.any(np.diff(hist_ref, axis=1) < 0)
                                     or not np.allclose(hist_ref[:, -1], 1.0)):
            raise InputDataError("stain state field 'hist_ref' is not a cumulative distribution",
                                 hint=hint)
        he_ref, max_c_ref = arr("he_ref", (3, 2)), arr("max_c_ref", (2,))
        if (he_ref is None) != (max_c_ref is None):
            raise InputDataError("stain state has only one of 'he_ref' and 'max_c_ref'", hint=hint)
        try:
            scalars = {k: float(d.get(k, default)) for k, default in
                       (("io", 240.0), ("alpha", 1.0), ("beta", 0.15),
                        ("min_tissue_fraction", DEFAULT_MIN_TISSUE_FRACTION))}
        except (TypeError, ValueError) as exc:
            raise InputDataError("stain state holds a non-numeric parameter", hint=hint) from exc
        return cls(hist_ref=hist_ref, he_ref=he_ref, max_c_ref=max_c_ref, **scalars)


def fit_stain_state(reference_rgb: np.ndarray, *, hist_match: bool = True, macenko: bool = True,
                    io: float = 240.0, alpha: float = 1.0, beta: float = 0.15,
                    min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION) -> StainState:
    """Fit the normalization to a reference image (one representative H&E field).

    Args:
        reference_rgb: (H, W, 3) uint8 RGB reference image.
        hist_match: compute the reference histograms for histogram matching.
        macenko: fit Macenko (torchstain, torch backend) on the reference.
        io: transmitted light intensity.
        alpha: angle percentile for the stain vectors.
        beta: optical density threshold for background pixels.
        min_tissue_fraction: smallest tissue share for a patch (and the reference) to be normalized.

    Returns:
        The fitted StainState.

    Raises:
        InputDataError: when the reference is not an RGB uint8 image or holds too little tissue.
    """
    ref = np.asarray(reference_rgb)
    if ref.ndim != 3 or ref.shape[-1] != 3 or ref.dtype != np.uint8:
        raise InputDataError(f"stain reference must be an (H, W, 3) uint8 RGB image, got shape "
                             f"{ref.shape} dtype {ref.dtype}", hint="pass an 8-bit RGB image")
    hist_ref = _reference_cdf(ref) if hist_match else None
    he_ref = max_c_ref = None
    if macenko:
        he_ref, max_c_ref = _fit_macenko(ref, io=io, alpha=alpha, beta=beta,
                                         min_tissue_fraction=min_tissue_fraction)
    return StainState(hist_ref=hist_ref, he_ref=he_ref, max_c_ref=max_c_ref, io=float(io),
                      alpha=float(alpha), beta=float(beta),
                      min_tissue_fraction=float(min_tissue_fraction))


def _reference_cdf(ref: np.ndarray) -> np.ndarray:
    flat = ref.reshape(-1, 3)
    counts = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(3)])
    # Same expression as skimage (cumsum of counts / size) so the quantiles are bit-identical.
    return np.cumsum(counts, axis=1) / flat.shape[0]


def _fit_macenko(ref: np.ndarray, *, io: float, alpha: float, beta: float,
                 min_tissue_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    # torchstain exposes `normalizers` as a package attribute, not an importable submodule.
    import torchstain

    hint = "choose a reference field that is mostly tissue (not background, fat or pen marks)"
    chw = torch.from_numpy(np.ascontiguousarray(ref)).permute(2, 0, 1)
    n_tissue = int(tissue_mask(chw.permute(1, 2, 0)[None], io=io, beta=beta).sum())
    need = _min_tissue_pixels(ref.shape[0] * ref.shape[1], min_tissue_fraction)
    if n_tissue < need:
        raise InputDataError(f"stain reference holds {n_tissue} tissue pixels, fewer than the "
                             f"{need} Macenko needs", hint=hint)
    normalizer = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    try:
        normalizer.fit(chw.float(), Io=io, alpha=alpha, beta=beta)
    except (IndexError, RuntimeError) as exc:  # torch.linalg.LinAlgError is a RuntimeError
        raise InputDataError(f"Macenko fit failed on the stain reference: {exc}", hint=hint) from exc
    he_ref = normalizer.HERef.double().numpy()
    max_c_ref = normalizer.maxCRef.double().numpy()
    if not (np.all(np.isfinite(he_ref)) and np.all(np.isfinite(max_c_ref)) and np.all(max_c_ref > 0)):
        raise InputDataError("Macenko fit on the stain reference gave non-finite or non-positive "
                             "values", hint=hint)
    return he_ref, max_c_ref


def _min_tissue_pixels(n_pixels: int, min_tissue_fraction: float) -> int:
    return max(MIN_TISSUE_PIXELS, math.ceil(min_tissue_fraction * n_pixels))


def _check_batch(batch: torch.Tensor) -> None:
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[-1] != 3 \
            or batch.dtype != torch.uint8 or batch.shape[1] == 0 or batch.shape[2] == 0:
        got = (tuple(batch.shape), batch.dtype) if isinstance(batch, torch.Tensor) else type(batch)
        raise InputDataError(f"stain normalization needs a (B, H, W, 3) uint8 tensor, got {got}",
                             hint="pass RGB patches as uint8, channels last")


def tissue_mask(batch_uint8: torch.Tensor, *, io: float = 240.0, beta: float = 0.15) -> torch.Tensor:
    """Return Macenko's tissue mask: pixels whose optical density is >= beta on every channel.

    Args:
        batch_uint8: (B, H, W, 3) uint8 tensor.
        io: transmitted light intensity.
        beta: optical density threshold.

    Returns:
        (B, H, W) bool tensor on the input's device.
    """
    brightest = torch.maximum(torch.maximum(batch_uint8[..., 0], batch_uint8[..., 1]),
                              batch_uint8[..., 2])
    return brightest <= _tissue_max_level(io, beta)


def _tissue_max_level(io: float, beta: float) -> int:
    """Largest grey level whose OD, by torchstain's float32 expression, is still >= beta (-1: none).

    OD takes only 256 values per channel, so the tissue test becomes an integer comparison.
    """
    levels = torch.arange(256, dtype=torch.float32)
    tissue = torch.nonzero(-torch.log((levels + 1) / io) >= beta)
    return int(tissue.max()) if tissue.numel() else -1


def _planar(batch: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) -> contiguous (B, 3, H*W): per-channel rows for the products and histograms."""
    b, h, w, _ = batch.shape
    return batch.reshape(b, h * w, 3).permute(0, 2, 1).contiguous()


def _interleaved(planar: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 3, H*W) -> contiguous (B, H, W, 3) uint8 (truncating floats, like torchstain's .int())."""
    out = planar.permute(0, 2, 1).to(torch.uint8, memory_format=torch.contiguous_format)
    return out.reshape(planar.shape[0], h, w, 3)


def histogram_match(batch_uint8: torch.Tensor, state: StainState) -> torch.Tensor:
    """Match each patch's per-channel histogram to the reference.

    Gives the values of ``skimage.exposure.match_histograms(patch, reference, channel_axis=-1)`` for
    uint8 patches (skimage interpolates the reference quantiles and truncates into uint8).

    Args:
        batch_uint8: (B, H, W, 3) uint8 tensor on any device.
        state: fitted state; when ``state.hist_ref`` is None the batch is returned as is.

    Returns:
        (B, H, W, 3) uint8 tensor on the input's device.

    Raises:
        InputDataError: when the batch is not a (B, H, W, 3) uint8 tensor.
    """
    _check_batch(batch_uint8)
    if state.hist_ref is None or batch_uint8.shape[0] == 0:
        return batch_uint8
    cdf = torch.as_tensor(np.asarray(state.hist_ref), dtype=torch.float64, device=batch_uint8.device)
    h, w = batch_uint8.shape[1:3]
    out = torch.empty_like(batch_uint8)
    for sl in _chunks(batch_uint8):
        out[sl] = _interleaved(_histogram_match_planar(_planar(batch_uint8[sl]), cdf), h, w)
    return out


def _histogram_match_planar(planar: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
    """Histogram matching of (B, 3, N) uint8 planes to the reference CDFs (3, 256)."""
    b, _, n = planar.shape
    # One int32 index into B x 3 stacked 256-entry tables (int32 halves int64's memory traffic).
    offsets = torch.arange(b * 3, device=planar.device, dtype=torch.int32).reshape(b, 3, 1) * 256
    idx = planar.to(torch.int32).add_(offsets).reshape(-1)
    counts = torch.bincount(idx, minlength=b * 768).reshape(b, 3, 256)
    src_q = torch.cumsum(counts, dim=2).double() / n
    luts = torch.stack([_interp_lut(src_q[:, c].contiguous(), cdf[c]) for c in range(3)], dim=1)
    return torch.index_select(luts.reshape(-1), 0, idx).reshape(b, 3, n)


def _chunks(batch: torch.Tensor) -> list[slice]:
    """Split a batch into runs of about 2**20 pixels on CPU (the float temporaries stay in cache:
    4 patches of 500 px ran 25% faster than 16, and memory stays bounded) or 2**24 on CUDA."""
    b, h, w = batch.shape[:3]
    budget = _CHUNK_PIXELS_CUDA if batch.device.type == "cuda" else _CHUNK_PIXELS_CPU
    step = min(max(1, budget // (h * w)), _MAX_CHUNK_PATCHES)
    return [slice(i, min(b, i + step)) for i in range(0, b, step)]


def _interp_lut(src_q: torch.Tensor, ref_cdf: torch.Tensor) -> torch.Tensor:
    """np.interp(src_q, tmpl_quantiles, tmpl_values) as numpy computes it, truncated to uint8."""
    prev = torch.cat([ref_cdf.new_zeros(1), ref_cdf[:-1]])
    present = ref_cdf > prev  # grey levels that occur in the reference
    xp = ref_cdf[present]
    fp = torch.nonzero(present).flatten().double()
    if xp.numel() == 1:
        return fp.to(torch.uint8).expand_as(src_q).contiguous()
    j = (torch.searchsorted(xp, src_q, right=True) - 1).clamp(0, xp.numel() - 2)
    slope = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
    x0 = xp[j]
    val = slope[j] * (src_q - x0) + fp[j]
    val = torch.where(src_q == x0, fp[j], val)
    val = torch.where(src_q <= xp[0], fp[0], val)
    val = torch.where(src_q >= xp[-1], fp[-1], val)
    return val.to(torch.uint8)


def _percentile_index(n: torch.Tensor, q: float) -> torch.Tensor:
    """0-based rank torchstain's percentile picks among n values (nearest rank, half to even)."""
    return torch.round(0.01 * float(q) * (n.double() - 1)).long()


def macenko_normalize(batch_uint8: torch.Tensor, state: StainState
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Macenko-normalize a batch to the reference stain, as torchstain's torch backend does per patch.

    Args:
        batch_uint8: (B, H, W, 3) uint8 tensor on any device.
        state: fitted state with ``he_ref`` and ``max_c_ref``.

    Returns:
        ``(out, ok)``: (B, H, W, 3) uint8 normalized patches and a (B,) bool tensor. Where ``ok`` is
        False (fewer tissue pixels than ``max(MIN_TISSUE_PIXELS, min_tissue_fraction * H * W)``, or
        a non-finite or non-positive estimate) the patch is returned unchanged.

    Raises:
        InputDataError: when the batch is not a (B, H, W, 3) uint8 tensor or the state has no
            Macenko reference.
    """
    _check_batch(batch_uint8)
    if state.he_ref is None or state.max_c_ref is None:
        raise InputDataError("stain state has no Macenko reference",
                             hint="fit the stain state with Macenko enabled")
    dev = batch_uint8.device
    he_ref = torch.as_tensor(np.asarray(state.he_ref), dtype=torch.float32, device=dev)
    max_c_ref = torch.as_tensor(np.asarray(state.max_c_ref), dtype=torch.float32, device=dev)
    out = torch.empty_like(batch_uint8)
    ok = torch.zeros(batch_uint8.shape[0], dtype=torch.bool, device=dev)
    h, w = batch_uint8.shape[1:3]
    for sl in _chunks(batch_uint8):
        raw = batch_uint8[sl]
        res, chunk_ok = _macenko_planar(_planar(raw), state, he_ref, max_c_ref)
        out[sl] = _keep_failed(_interleaved(res, h, w), raw, chunk_ok)
        ok[sl] = chunk_ok
    return out, ok


def _keep_failed(out: torch.Tensor, raw: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    if not bool(ok.all()):
        out[~ok] = raw[~ok]
    return out


def _macenko_planar(planar: torch.Tensor, state: StainState, he_ref: torch.Tensor,
                    max_c_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Macenko on (B, 3, N) uint8 planes: float32 (B, 3, N) result clipped at 255, and ok (B,)."""
    b, _, n_pix = planar.shape
    od = planar.float().add_(1).div_(state.io).log_().neg_()  # torchstain's float32 optical density
    mask = torch.minimum(torch.minimum(od[:, 0], od[:, 1]), od[:, 2]) >= state.beta  # (B, N)
    n = mask.sum(dim=1)
    ok = n >= _min_tissue_pixels(n_pix, state.min_tissue_fraction)

    eigvecs = _masked_eigvecs(od, mask, n, ok)
    he = _stain_vectors(od, mask, n, eigvecs, state.alpha)
    pinv, good = _pinv(he)
    ok &= good
    conc = torch.bmm(pinv, od)  # (B, 2, N) least-squares stain concentrations
    del od
    # 99th percentile over all pixels, as torchstain does.
    from_top = n_pix - 1 - int(_percentile_index(torch.tensor(n_pix), 99))
    max_c = _order_stat(conc.reshape(b * 2, n_pix), torch.full((b * 2,), from_top, device=conc.device),
                        from_top=True).reshape(b, 2)
    scale = max_c_ref / max_c
    ok &= (max_c > 0).all(dim=1) & torch.isfinite(scale).all(dim=1)
    scale = torch.where(ok[:, None], scale, torch.ones_like(scale))

    # Inorm = Io * exp(-HERef @ (C * maxCRef / maxC)), clipped at 255 (truncated by the caller).
    neg_mix = -(he_ref[None] * scale[:, None, :])  # (B, 3, 2); the sign is exact, saves a pass
    out = torch.bmm(neg_mix, conc)
    del conc
    return out.exp_().mul_(state.io).clamp_(max=255.0), ok


def _pinv(he: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-inverse (HE^T HE)^-1 HE^T of (B, 3, 2) stain matrices, in float64, and which are
    usable (finite and of full rank); unusable ones get a zero inverse."""
    he64 = he.double()
    gram = he64.transpose(1, 2) @ he64
    good = torch.isfinite(gram).all(dim=(1, 2))
    gram = torch.where(good[:, None, None], gram, torch.eye(2, dtype=gram.dtype, device=gram.device))
    good &= torch.linalg.det(gram).abs() > 1e-12
    gram = torch.where(good[:, None, None], gram, torch.eye(2, dtype=gram.dtype, device=gram.device))
    he64 = torch.where(good[:, None, None], he64, 0.0)
    # contiguous: bmm with a column-major (LAPACK-ordered) small operand is ~25x slower on CPU.
    return torch.linalg.solve(gram, he64.transpose(1, 2)).float().contiguous(), good


def _masked_eigvecs(od: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, ok: torch.Tensor
                    ) -> torch.Tensor:
    """Eigenvectors of the two largest eigenvalues of each patch's tissue OD covariance, (B, 3, 2)."""
    m = mask.unsqueeze(1).to(od.dtype)  # (B, 1, N)
    nf = n.clamp(min=2).to(od.dtype)[:, None, None]
    mean = torch.bmm(od, m.transpose(1, 2)) / nf  # (B, 3, 1)
    centred = (od - mean).mul_(m)  # centred first: raw float32 moments would lose digits
    cov = torch.bmm(centred, centred.transpose(1, 2)) / (nf - 1)
    del centred
    # Empty or tiny patches would give NaN covariances that make LAPACK fail for the whole batch.
    usable = (ok & torch.isfinite(cov).all(dim=(1, 2)))[:, None, None]
    cov = torch.where(usable, cov, torch.eye(3, dtype=cov.dtype, device=cov.device))
    # float32 like torchstain: a float64 eigh changed no output pixel more (checked on 200 real crops).
    _, vecs = torch.linalg.eigh(cov)
    return vecs[:, :, 1:3].contiguous()


def _stain_vectors(od: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, eigvecs: torch.Tensor,
                   alpha: float) -> torch.Tensor:
    """torchstain's __find_HE on each patch's tissue pixels, (B, 3, 2) with H first."""
    proj = torch.bmm(eigvecs.transpose(1, 2).contiguous(), od)  # (B, 2, N)
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    del proj
    last = (n - 1).clamp(min=0)
    lo_rank = torch.minimum(_percentile_index(n, alpha).clamp(min=0), last)
    hi_rank = torch.minimum(_percentile_index(n, 100 - alpha).clamp(min=0), last)
    lo = _order_stat(phi, lo_rank, mask)
    hi = _order_stat(phi, last - hi_rank, mask, from_top=True)
    v_min = torch.bmm(eigvecs, torch.stack([torch.cos(lo), torch.sin(lo)], 1)[:, :, None])
    v_max = torch.bmm(eigvecs, torch.stack([torch.cos(hi), torch.sin(hi)], 1)[:, :, None])
    h_first = (v_min[:, 0, 0] > v_max[:, 0, 0])[:, None, None]
    return torch.where(h_first, torch.cat([v_min, v_max], 2), torch.cat([v_max, v_min], 2))


def _order_stat(values: torch.Tensor, rank: torch.Tensor, valid: torch.Tensor | None = None,
                *, from_top: bool = False) -> torch.Tensor:
    """Per row of ``values`` (R, N): the value of 0-based ``rank`` among the entries where ``valid``
    is True (all when None), counted from the smallest, or from the largest with ``from_top``.

    CPU: numpy's SIMD ``partition`` is several times faster than torch's topk/kthvalue (which carry an
    index per element) but takes one kth for all rows, so each row is padded with k - rank[r] values
    that sort before its valid entries (and the rest after) to move its wanted rank to a common k;
    invalid entries are sent to the far end. CUDA: topk of the k + 1 nearest and a gather, or
    kthvalue when every row wants the same rank.
    """
    r, n = values.shape
    k = int(rank.max())
    near, far = (float("inf"), float("-inf")) if from_top else (float("-inf"), float("inf"))
    same = not bool((rank != k).any())
    if values.device.type != "cpu":
        if valid is not None:
            values = torch.where(valid, values, far)
        if same and not from_top:
            return torch.kthvalue(values, k + 1, dim=-1).values
        if same:
            return torch.kthvalue(values, n - k, dim=-1).values
        ends = torch.topk(values, k + 1, dim=-1, largest=from_top, sorted=True).values
        return ends.gather(-1, rank.unsqueeze(-1)).squeeze(-1)
    if from_top and not same:
        # Selecting near the top of a padded row ran ~4x slower in numpy than near the bottom;
        # negation is exact, so select from the bottom of -values.
        return -_order_stat(-values, rank, valid)
    width = n if same else n + k
    if valid is not None:
        values = torch.where(valid, values, far)
    buf = torch.empty((r, width), dtype=values.dtype)
    buf[:, :n].copy_(values)  # copy_: item assignment or where(out=) into this view are far slower
    if not same:
        cols = torch.arange(k)[None, :]
        buf[:, n:] = torch.where(cols < (k - rank)[:, None], near, far)
    # Ascending position of the wanted value in every padded row.
    pos = (width - 1 - k if same else n - 1) if from_top else k
    arr = buf.numpy()
    arr.partition(pos, axis=-1)  # in place: buf is our own copy
    return torch.from_numpy(arr[:, pos].copy())


def normalize_batch(batch_uint8: torch.Tensor, state: StainState
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram matching then Macenko, each only where the state has it enabled.

    Background is judged on the raw patch, because histogram matching stretches a near-white patch
    into something that looks like tissue.

    Args:
        batch_uint8: (B, H, W, 3) uint8 tensor on any device.
        state: fitted StainState.

    Returns:
        ``(out, ok)``: (B, H, W, 3) uint8 patches and a (B,) bool tensor; patches with ``ok`` False
        (too little tissue, or Macenko failed) are the raw input, unchanged.

    Raises:
        InputDataError: when the batch is not a (B, H, W, 3) uint8 tensor.
    """
    _check_batch(batch_uint8)
    dev = batch_uint8.device
    out = torch.empty_like(batch_uint8)
    ok = torch.zeros(batch_uint8.shape[0], dtype=torch.bool, device=dev)
    cdf = None if state.hist_ref is None else \
        torch.as_tensor(np.asarray(state.hist_ref), dtype=torch.float64, device=dev)
    refs = None if state.he_ref is None or state.max_c_ref is None else \
        (torch.as_tensor(np.asarray(state.he_ref), dtype=torch.float32, device=dev),
         torch.as_tensor(np.asarray(state.max_c_ref), dtype=torch.float32, device=dev))
    h, w = batch_uint8.shape[1:3]
    need = _min_tissue_pixels(h * w, state.min_tissue_fraction)
    vmax = _tissue_max_level(state.io, state.beta)
    for sl in _chunks(batch_uint8):  # both steps per chunk, while it is in cache
        raw = batch_uint8[sl]
        planar = _planar(raw)
        brightest = torch.maximum(torch.maximum(planar[:, 0], planar[:, 1]), planar[:, 2])
        chunk_ok = (brightest <= vmax).sum(dim=1) >= need
        if cdf is not None:
            planar = _histogram_match_planar(planar, cdf)
        if refs is not None:
            planar, mac_ok = _macenko_planar(planar, state, *refs)
            chunk_ok &= mac_ok
        out[sl] = _keep_failed(_interleaved(planar, h, w), raw, chunk_ok)
        ok[sl] = chunk_ok
    return out, ok
