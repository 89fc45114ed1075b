"""Losses of the CAM training: the image-level loss (BCE or GCE), the location constraint, and trimming suspect positives."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from uts_cli.model.cam import upsample_cam


def extended_log_barrier(z: torch.Tensor, t: float) -> torch.Tensor:
    """Kervadec et al.'s extended log-barrier of the constraint ``z <= 0``.

    ``-log(-z)/t`` for ``z <= -1/t^2``, else the linear extension ``t z - log(1/t^2)/t + 1/t``
    (continuous with a continuous derivative at the switch).
    """
    switch = -1.0 / (t * t)
    inside = -torch.log((-z).clamp_min(1.0 / (t * t))) / t
    outside = t * z - math.log(1.0 / (t * t)) / t + 1.0 / t
    return torch.where(z <= switch, inside, outside)


def soft_centroid(cam_logits: torch.Tensor, size: tuple[int, int], temperature: float,
                  stride: int | None = None) -> torch.Tensor:
    """Centroid ``(n, 2)`` yx (input pixels) of ``sigmoid(T * upsampled CAM)``.

    The CAM is upsampled to the input size first, as the method does; that costs ``H*W`` per
    sample, negligible beside the backbone, and keeps the centroid exact in input pixels.
    """
    prob = torch.sigmoid(temperature * upsample_cam(cam_logits.float(), size, stride))[:, 0]
    height, width = size
    ys = torch.arange(height, device=prob.device, dtype=prob.dtype)
    xs = torch.arange(width, device=prob.device, dtype=prob.dtype)
    total = prob.sum(dim=(1, 2)).clamp_min(1e-6)
    cy = (prob.sum(dim=2) * ys).sum(dim=1) / total
    cx = (prob.sum(dim=1) * xs).sum(dim=1) / total
    return torch.stack([cy, cx], dim=1)


def location_loss(cam_logits: torch.Tensor, points: torch.Tensor, mask: torch.Tensor,
                  labels: torch.Tensor, size: tuple[int, int], kind: str, temperature: float = 10.0,
                  margin: float = 40.0, tlb: float = 50.0,
                  stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Location constraint on positive patches with exactly one (valid) annotated point.

    Computed on every sample and masked, rather than on a selected subset: selecting would need
    the subset's size on the host, which stalls a GPU every step.

    Args:
        cam_logits: ``(B, 1, h, w)`` CAM logits.
        points: ``(B, K, 2)`` yx after augmentation; mask ``(B, K)`` their validity.
        labels: ``(B,)`` labels after augmentation.
        size: input ``(H, W)``.
        kind: ``"l2"`` (mean distance) or ``"lb"`` (mean extended log-barrier of distance - margin).
        temperature, margin, tlb: see :class:`uts_cli.config.TeachConfig`.
        stride: the CAM's stride for the exact cell-to-pixel mapping (None: the original's
            ``align_corners=True`` upsampling; see :func:`uts_cli.model.cam.upsample_cam`).

    Returns:
        ``(loss, count)``: the mean over the covered samples (0, still differentiable, when there
        are none) and a 0-d tensor with their number.
    """
    eligible = ((labels > 0.5) & (mask.sum(dim=1) == 1)).float()
    count = eligible.sum()
    centroid = soft_centroid(cam_logits, size, temperature, stride)
    target = (points * mask.unsqueeze(-1).to(points.dtype)).sum(dim=1)
    dist = torch.sqrt(((centroid - target) ** 2).sum(dim=1) + 1e-8)
    per_sample = dist if kind == "l2" else extended_log_barrier(dist - margin, tlb)
    return (per_sample * eligible).sum() / count.clamp_min(1.0), count


def trim_positives_mask(per_sample_loss: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """1.0 for the samples a loss keeps, 0.0 for the ``fraction`` of positives with the highest loss.

    A positive whose label the network keeps contradicting late in training is more likely a
    noisy label than a hard example (the small-loss idea of co-teaching). ``floor(fraction * n)``
    of the ``n`` positives are dropped; negatives are always kept. Everything stays on the device
    (no count is read back), so a GPU step does not stall.
    """
    positive = labels > 0.5
    score = torch.where(positive, per_sample_loss.detach(), torch.full_like(per_sample_loss, -math.inf))
    order = torch.argsort(score, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    n_trim = torch.floor(fraction * positive.sum())
    return (~(positive & (rank < n_trim))).to(per_sample_loss.dtype)


def image_loss_each(logits: torch.Tensor, labels: torch.Tensor, kind: str, q: float) -> torch.Tensor:
    """Per-sample image-level loss: ``bce``, or ``gce``, the generalized cross-entropy (1 - p^q) / q.

    ``p`` is the probability given to the sample's label. GCE weighs each sample's BCE gradient by
    ``p^q``, so the samples the network contradicts most (likely noisy labels) pull least; q -> 0
    is BCE, q = 1 the mean absolute error (Zhang & Sabuncu, 2018).
    """
    logits, labels = logits.float(), labels.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    log_p = F.logsigmoid(torch.where(labels > 0.5, logits, -logits))
    return -torch.expm1(q * log_p) / q  # expm1: exact as q -> 0, where 1 - exp() would cancel
