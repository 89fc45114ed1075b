"""Hard-sample distillation: which training samples the teacher disagrees with (numpy only).

METHOD.md section 5: a sample whose thresholded image-level prediction differs from its label is
removed; among the remaining positives the ``--filter`` criterion looks at localization:

* ``TP``    drop a positive without any true-positive detection (the original's default),
* ``FP``    drop any patch with a false-positive detection,
* ``FP_TP`` keep only perfect positives (at least one TP, no FP, no FN),
* ``PEAK``  like ``TP``, but a positive is also kept when the peak of the teacher's CAM lies within
  the matching radius of an annotated mitosis, even when that peak is below the pixel threshold
  (so no detection, hence no TP, was made there). ``TP`` depends on the pixel threshold landing
  just right; the peak's position does not.

With ``pseudolabel`` nothing is removed: the labels are replaced by the teacher's decision.
With ``keep_negatives`` the patches without an annotated mitosis are never removed or relabelled:
the filter judges the positives only (most negatives the teacher calls positive hold a look-alike
or dense tissue, the hard negatives a student most needs; docs/science.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uts_cli.choices import FILTERS
from uts_cli.errors import UsageError

KEEP = ""
REASONS = {
    "image_fp": "teacher calls a patch without annotated mitosis positive",
    "image_fn": "teacher calls a patch with an annotated mitosis negative",
    "no_tp": "no teacher detection on the annotated mitosis",
    "has_fp": "teacher detection away from every annotated mitosis",
    "not_perfect": "teacher localization not perfect (TP, FP and FN checked)",
    "no_tp_peak_away": "no teacher detection on the annotated mitosis, and the CAM peak is away from it",
}


@dataclass
class Decision:
    """Per-sample outcome of the filter.

    Attributes:
        keep: (N,) bool, the sample stays in the student's training set.
        reason: (N,) str, a key of ``REASONS`` for removed samples, "" for kept ones.
        label: (N,) uint8, the label the student trains with (changed only by pseudo-labelling).
    """

    keep: np.ndarray
    reason: np.ndarray
    label: np.ndarray


def decide(labels: np.ndarray, probs: np.ndarray, threshold: float, tp: np.ndarray, fp: np.ndarray,
           fn: np.ndarray, criterion: str = "TP", pseudolabel: bool = False,
           peak_near: np.ndarray | None = None, keep_negatives: bool = False) -> Decision:
    """Apply the disagreement filter to teacher predictions.

    Args:
        labels: (N,) annotated weak labels (0/1).
        probs: (N,) teacher image-level probabilities.
        threshold: the teacher's image-level threshold (``prob >= threshold`` is positive).
        tp, fp, fn: (N,) per-patch localization counts of the teacher against the annotations
            (only read for samples that are positive in both label and prediction).
        criterion: one of ``FILTERS``.
        pseudolabel: relabel instead of removing.
        peak_near: (N,) bool, the teacher's CAM peak lies within the matching radius of an
            annotated mitosis (needed by ``PEAK``).
        keep_negatives: never remove (or relabel) a sample labelled negative.

    Returns:
        The decision per sample.

    Raises:
        UsageError: unknown criterion, or ``PEAK`` without ``peak_near``.
    """
    if criterion not in FILTERS:
        raise UsageError(f"unknown filter {criterion!r}", hint=f"use one of {', '.join(FILTERS)}")
    if criterion == "PEAK" and peak_near is None:
        raise UsageError("the PEAK filter needs the teacher's CAM peak positions",
                         hint="pass peak_near (score the teacher with uts distill)")
    labels = np.asarray(labels).astype(np.uint8)
    pred = (np.asarray(probs) >= threshold).astype(np.uint8)
    tp, fp, fn = (np.asarray(a) for a in (tp, fp, fn))
    reason = np.full(len(labels), KEEP, dtype=object)
    if not keep_negatives:
        reason[(pred == 1) & (labels == 0)] = "image_fp"
    reason[(pred == 0) & (labels == 1)] = "image_fn"
    both = (pred == 1) & (labels == 1)
    if criterion == "TP":
        reason[both & (tp == 0)] = "no_tp"
    elif criterion == "PEAK":
        reason[both & (tp == 0) & ~np.asarray(peak_near, bool)] = "no_tp_peak_away"
    elif criterion == "FP":
        reason[both & (fp > 0)] = "has_fp"
    else:
        reason[both & ~((tp > 0) & (fp == 0) & (fn == 0))] = "not_perfect"
    if pseudolabel:
        # Keep every sample; trust the teacher's image-level decision over the annotation.
        new_label = np.where(labels == 0, 0, pred).astype(np.uint8) if keep_negatives else pred
        return Decision(keep=np.ones(len(labels), bool), reason=reason.astype(str), label=new_label)
    return Decision(keep=reason == KEEP, reason=reason.astype(str), label=labels)
