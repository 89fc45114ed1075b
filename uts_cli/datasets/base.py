"""What every dataset reader hands to ``prepare``: a list of source images with their points.

Coordinate convention (the one used everywhere in uts): points are ``(y, x)`` = (row, column)
in pixels, 0-based, with pixel centres at integer coordinates, as float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class SourceImage:
    """One high-power field (or whole-slide image) and its annotations.

    Attributes:
        image_id: stable id, ``"<case>/<file stem>"``; unique within a dataset.
        case_id: patient/slide id; splits are made per case, never per patch.
        path: absolute path of the image file.
        points_yx: (K, 2) float32 annotated points, image coordinates (see module docstring).
        kinds: (K,) uint8, ``KIND_MITOSIS`` or ``KIND_HARD_NEGATIVE`` (``uts_cli.choices``) per point.
        split: "train", "val" or "test" (the dataset's default rule; overridable later).
        pixel_size_um: physical pixel size in micrometres (None when unknown).
        truth_yx / truth_kinds: clean ground truth where the dataset has one apart from the
            annotations (the synthetic dataset); None otherwise.
        whole_slide: True for pyramidal WSIs read region by region with a tissue filter.
        labelled: False for images the dataset ships without labels (e.g. MIDOG21 151-200).
    """

    image_id: str
    case_id: str
    path: Path
    points_yx: np.ndarray
    kinds: np.ndarray
    split: str
    pixel_size_um: float | None = None
    truth_yx: np.ndarray | None = None
    truth_kinds: np.ndarray | None = None
    whole_slide: bool = False
    labelled: bool = True


@dataclass
class DatasetListing:
    """Result of scanning a raw dataset folder.

    ``warnings`` holds one line per oddity the user should know about but that does not stop
    preparation (an image without annotations, annotations without an image, junk files).
    """

    name: str
    root: Path
    images: list[SourceImage]
    warnings: list[str] = field(default_factory=list)


def empty_points() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 2), np.float32), np.zeros((0,), np.uint8)
