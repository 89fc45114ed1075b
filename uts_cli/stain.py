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

        he_ref, max_c_ref = arr("he_ref", (3, 2)), arr("max_c_ref", (2,))
        if (he_ref is None) != (max_c_ref is None):
            raise InputDataError("stain state has only one of 'he_ref' and 'max_c_ref'", hint=hint)
        try:
            scalars = {k: float(d.get(k, default)) for k, default in
                       (("io", 240.0), ("alpha", 1.0), ("beta", 0.15),
                        ("min_tissue_fraction", DEFAULT_MIN_TISSUE_FRACTION))}
        except (TypeError, ValueError) as exc:
            raise InputDataError("stain state holds a non-numeric parameter", hint=hint) from exc
        return cls(hist_ref=arr("hist_ref", (3, 256)), he_ref=he_ref, max_c_ref=max_c_ref, **scalars)


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
            or batch.dtype != torch.uint8:
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
    # OD takes 256 values per channel: find the largest grey level that still counts as tissue with
    # torchstain's own float32 expression, then compare integers.
    levels = torch.arange(256, dtype=torch.float32)
    od = -torch.log((levels + 1) / io)
    below = torch.nonzero(od >= beta)
    vmax = int(below.max()) if below.numel() else -1
    return (batch_uint8 <= vmax).all(dim=-1) if vmax >= 0 else \
        torch.zeros(batch_uint8.shape[:-1], dtype=torch.bool, device=batch_uint8.device)


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
    dev = batch_uint8.device
    b, h, w, _ = batch_uint8.shape
    flat = batch_uint8.reshape(b, h * w, 3)
    cdf = torch.as_tensor(np.asarray(state.hist_ref), dtype=torch.float64, device=dev)
    offsets = (torch.arange(b, device=dev) * 256)[:, None]
    out = torch.empty_like(flat)
    for c in range(3):  # three channels; keeps the int64 index at (B, H*W)
        idx = flat[:, :, c].long()
        counts = torch.bincount((idx + offsets).reshape(-1), minlength=b * 256).reshape(b, 256)
        src_q = torch.cumsum(counts, dim=1).double() / (h * w)
        lut = _interp_lut(src_q, cdf[c])
        out[:, :, c] = torch.gather(lut, 1, idx)
    return out.reshape(b, h, w, 3)


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
    b, h, w, _ = batch_uint8.shape
    dev = batch_uint8.device
    if b == 0:
        return batch_uint8, torch.zeros(0, dtype=torch.bool, device=dev)
    n_pix = h * w
    x = batch_uint8.reshape(b, n_pix, 3)
    io = state.io

    # Optical density with torchstain's float32 expression.
    od = x.float().add_(1).div_(io).log_().neg_()
    mask = (od >= state.beta).all(dim=-1)
    n = mask.sum(dim=1)
    ok = n >= _min_tissue_pixels(n_pix, state.min_tissue_fraction)

    eigvecs = _masked_eigvecs(od, mask, n, ok)
    he = _stain_vectors(od, mask, n, eigvecs, state.alpha)

    # Least squares concentrations C = pinv(HE) OD (HE is 3x2 with full rank where ok).
    he64 = he.double()
    gram = he64.transpose(1, 2) @ he64
    good_gram = torch.linalg.det(gram).abs() > 1e-12
    ok &= good_gram
    gram = torch.where(good_gram[:, None, None], gram, torch.eye(2, dtype=gram.dtype, device=dev))
    pinv = torch.linalg.solve(gram, he64.transpose(1, 2)).float()  # (B, 2, 3)
    conc = torch.bmm(od, pinv.transpose(1, 2))  # (B, N, 2)
    del od
    k99 = int(_percentile_index(torch.tensor(n_pix), 99)) + 1
    max_c = torch.kthvalue(conc, k99, dim=1).values  # (B, 2)

    max_c_ref = torch.as_tensor(np.asarray(state.max_c_ref), dtype=torch.float32, device=dev)
    he_ref = torch.as_tensor(np.asarray(state.he_ref), dtype=torch.float32, device=dev)
    scale = max_c_ref / max_c
    ok &= torch.isfinite(he).all(dim=(1, 2)) & (max_c > 0).all(dim=1) & torch.isfinite(scale).all(dim=1)
    scale = torch.where(ok[:, None], scale, torch.ones_like(scale))

    # Inorm = Io * exp(-HERef @ (C * maxCRef / maxC)), clipped at 255 and truncated like .int().
    mix = (he_ref[None] * scale[:, None, :]).transpose(1, 2)  # (B, 2, 3)
    out = torch.bmm(conc, mix)
    del conc
    out = out.neg_().exp_().mul_(io).clamp_(max=255.0)
    out = out.to(torch.uint8).reshape(b, h, w, 3)
    out = torch.where(ok[:, None, None, None], out, batch_uint8)
    return out, ok


def _masked_eigvecs(od: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, ok: torch.Tensor
                    ) -> torch.Tensor:
    """Eigenvectors of the two largest eigenvalues of each patch's tissue OD covariance, (B, 3, 2)."""
    m = mask.unsqueeze(-1).float()
    nf = n.clamp(min=2).float()[:, None]
    mean = (od * m).sum(dim=1) / nf  # (B, 3)
    centred = (od - mean[:, None, :]).mul_(m)
    cov = torch.bmm(centred.transpose(1, 2), centred) / (nf[:, :, None] - 1)
    del centred
    # Empty or tiny patches would give NaN covariances that make LAPACK fail for the whole batch.
    eye = torch.eye(3, dtype=cov.dtype, device=cov.device)
    cov = torch.where((ok & torch.isfinite(cov).all(dim=(1, 2)))[:, None, None], cov, eye)
    _, vecs = torch.linalg.eigh(cov)
    return vecs[:, :, 1:3]


def _stain_vectors(od: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, eigvecs: torch.Tensor,
                   alpha: float) -> torch.Tensor:
    """torchstain's __find_HE on each patch's tissue pixels, (B, 3, 2) with H first."""
    proj = torch.bmm(od, eigvecs)  # (B, N, 2)
    phi = torch.atan2(proj[..., 1], proj[..., 0])
    del proj
    phi = phi.masked_fill_(~mask, float("inf"))
    phi, _ = torch.sort(phi, dim=1)  # background (inf) sorts last
    last = (n - 1).clamp(min=0)[:, None]
    lo = torch.minimum(_percentile_index(n, alpha)[:, None], last)
    hi = torch.minimum(_percentile_index(n, 100 - alpha)[:, None], last)
    min_phi = phi.gather(1, lo.clamp(min=0)).squeeze(1)
    max_phi = phi.gather(1, hi.clamp(min=0)).squeeze(1)
    v_min = torch.bmm(eigvecs, torch.stack([torch.cos(min_phi), torch.sin(min_phi)], 1)[:, :, None])
    v_max = torch.bmm(eigvecs, torch.stack([torch.cos(max_phi), torch.sin(max_phi)], 1)[:, :, None])
    h_first = (v_min[:, 0, 0] > v_max[:, 0, 0])[:, None, None]
    return torch.where(h_first, torch.cat([v_min, v_max], 2), torch.cat([v_max, v_min], 2))


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
    b, h, w, _ = batch_uint8.shape
    n_tissue = tissue_mask(batch_uint8, io=state.io, beta=state.beta).sum(dim=(1, 2))
    ok = n_tissue >= _min_tissue_pixels(h * w, state.min_tissue_fraction)
    out = histogram_match(batch_uint8, state)
    if state.he_ref is not None:
        out, ok_mac = macenko_normalize(out, state)
        ok &= ok_mac
    out = torch.where(ok[:, None, None, None], out, batch_uint8)
    return out, ok
