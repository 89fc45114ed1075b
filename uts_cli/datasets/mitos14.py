"""MITOS-ATYPIA-14: x40 frames of breast cancer slides scanned by Aperio (A) and Hamamatsu (H).

Layout (``discover(root)``)::

    <root>/A03/frames/x40/A03_00Aa.tiff
    <root>/A03/mitosis/A03_00Aa_mitosis.csv        x,y,confidence per mitosis
    <root>/A03/mitosis/A03_00Aa_not_mitosis.csv    same format: hard negatives

``case_id`` is the slide folder (``A03``), ``image_id`` ``"<slide>/<frame>"``; pixel size
0.2455 um. Coordinates are read as 0-based pixels (x = column, y = row).

Confidence: every annotated point is kept by default. With ``min_confidence`` > 0, mitoses
below it are not dropped but become hard negatives: an uncertain figure should neither teach
"mitosis" nor make its patch a clean negative. Points of ``*_not_mitosis.csv`` are hard
negatives whatever their confidence. The original project never read this dataset; the split
follows its constants: val A03, H03; test A04, H04; all other slides train.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from uts_cli.choices import KIND_HARD_NEGATIVE, KIND_MITOSIS
from uts_cli.datasets.base import DatasetListing
from uts_cli.datasets.folder import make_image, require_root, summarise
from uts_cli.datasets.splits import apply_root_splits
from uts_cli.errors import InputDataError, UsageError
from uts_cli.io.annotations import check_points_in_image, read_mitos14_csv
from uts_cli.io.images import is_junk, list_image_files, read_header

NAME = "MITOS14"
PIXEL_SIZE_UM = 0.2455
VAL_SLIDES = frozenset({"A03", "H03"})
TEST_SLIDES = frozenset({"A04", "H04"})
_EXPECTED = "<root>/A03/frames/x40/A03_00Aa.tiff and <root>/A03/mitosis/A03_00Aa_mitosis.csv"
_MITOSIS_SUFFIX = "_mitosis.csv"
_NOT_MITOSIS_SUFFIX = "_not_mitosis.csv"


def default_split(slide: str) -> str:
    """The split of a MITOS14 slide (val A03, H03; test A04, H04; else train)."""
    key = slide.upper()
    if key in VAL_SLIDES:
        return "val"
    if key in TEST_SLIDES:
        return "test"
    return "train"


def _annotation_files(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Frame -> ``*_mitosis.csv`` and frame -> ``*_not_mitosis.csv`` in ``folder``."""
    mitoses: dict[str, Path] = {}
    negatives: dict[str, Path] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            name = path.name
            if is_junk(path) or not path.is_file():
                continue
            if name.endswith(_NOT_MITOSIS_SUFFIX):
                negatives[name[: -len(_NOT_MITOSIS_SUFFIX)]] = path
            elif name.endswith(_MITOSIS_SUFFIX):
                mitoses[name[: -len(_MITOSIS_SUFFIX)]] = path
    return mitoses, negatives


def _frame_points(frame_id: str, shape: tuple[int, ...], mitosis_csv: Path | None,
                  not_mitosis_csv: Path | None, min_confidence: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    yx_parts = [np.zeros((0, 2), np.float32)]
    kind_parts = [np.zeros((0,), np.uint8)]
    if mitosis_csv is not None:
        yx, confidence = read_mitos14_csv(mitosis_csv)
        where = f"frame {frame_id} ({mitosis_csv})"
        yx_parts.append(check_points_in_image(yx, shape[0], shape[1], where))
        kind_parts.append(np.where(confidence >= min_confidence, KIND_MITOSIS,
                                   KIND_HARD_NEGATIVE).astype(np.uint8))
    if not_mitosis_csv is not None:
        yx, _ = read_mitos14_csv(not_mitosis_csv)
        where = f"frame {frame_id} ({not_mitosis_csv})"
        yx_parts.append(check_points_in_image(yx, shape[0], shape[1], where))
        kind_parts.append(np.full(len(yx), KIND_HARD_NEGATIVE, np.uint8))
    return np.concatenate(yx_parts), np.concatenate(kind_parts)


def discover(root: str | Path, min_confidence: float = 0.0) -> DatasetListing:
    """List the MITOS-ATYPIA-14 x40 frames with mitoses and hard negatives.

    Args:
        root: the MITOS14 folder (see the module docstring).
        min_confidence: mitoses with a lower confidence become hard negatives (0 keeps all).

    Returns:
        The dataset listing, images sorted by id.

    Raises:
        InputDataError: missing/empty root, no slide folders with frames, a malformed CSV
            line, or a point outside its frame.
        UsageError: ``min_confidence`` outside [0, 1].
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise UsageError(f"min_confidence must be in [0, 1], got {min_confidence}",
                         hint="MITOS14 confidences are between 0 and 1")
    root = Path(root)
    require_root(root, NAME, _EXPECTED)
    slides = [d for d in sorted(root.iterdir())
              if d.is_dir() and not is_junk(d) and (d / "frames" / "x40").is_dir()]
    if not slides:
        raise InputDataError(f"no MITOS14 slide folders with frames/x40 in {root}",
                             hint=f"expected {_EXPECTED}; pass --root")
    listing = DatasetListing(NAME, root, [])
    without: list[str] = []
    orphans: list[str] = []
    for slide in slides:
        frames = {p.stem: p for p in list_image_files(slide / "frames" / "x40", recursive=False)
                  if p.suffix.lower() in (".tif", ".tiff")}
        mitoses, negatives = _annotation_files(slide / "mitosis")
        orphans += [f"{slide.name}/{f}" for f in sorted((set(mitoses) | set(negatives)) - set(frames))]
        for frame in sorted(frames):
            frame_id = f"{slide.name}/{frame}"
            if frame not in mitoses:
                without.append(frame_id)
            shape, _ = read_header(frames[frame])
            points = _frame_points(frame_id, shape, mitoses.get(frame), negatives.get(frame),
                                   min_confidence)
            listing.images.append(make_image(
                frame_id, slide.name, frames[frame], points, default_split(slide.name),
                PIXEL_SIZE_UM, shape,
            ))
    if without:
        listing.warnings.append(f"{len(without)} frame(s) have no *_mitosis.csv and are taken to "
                                f"hold no mitosis: {summarise(without)}")
    if orphans:
        listing.warnings.append(f"{len(orphans)} annotation file(s) have no frame: {summarise(orphans)}")
    if not listing.images:
        raise InputDataError(f"no MITOS14 frames (.tiff) found under {root}/*/frames/x40",
                             hint=f"expected {_EXPECTED}; pass --root")
    return apply_root_splits(listing)
