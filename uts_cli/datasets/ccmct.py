"""MITOS_WSI_CCMCT: 32 whole-slide images of canine cutaneous mast cell tumours.

Layout (``discover(root)``)::

    <root>/WSI/<slide id>.svs
    <root>/MITOS_WSI_CCMCT_MEL.json     (COCO-like export of the SlideRunner database;
                                         the HEAEL/ODAEL variants work the same way)

Categories: the CCMCT databases number their classes 1 granulocyte, 2 mitotic figure,
3 tumour cell, 4 other/ambiguous, 7 mitotic-figure look-alike. The original project keeps
category 2 as mitoses. ``uts`` maps classes by their names in the file's ``categories`` list:
"mitotic figure" -> mitosis, "... look-alike" / "hard negative" / "not mitotic figure" -> hard
negative, all other cell classes are ignored (counted in a warning). Without usable names it
falls back to the ids (2 -> mitosis, 7 -> hard negative). Category 1 is *not* a look-alike.

Each slide is its own case; ``image_id`` and ``case_id`` are the slide id (file stem); images
are ``whole_slide=True`` (read region by region, with a tissue filter in ``prepare``).
Default split: the original project's constants, 11 test and 3 val slides by id; all others
train (a ``<root>/splits.csv`` overrides it). Pixel size: the SVS ``MPP`` when recorded,
else 0.25 um.
"""
from __future__ import annotations

import re
from pathlib import Path

from uts_cli.choices import KIND_HARD_NEGATIVE, KIND_MITOSIS
from uts_cli.datasets.base import DatasetListing
from uts_cli.datasets.folder import make_image, require_root, summarise
from uts_cli.datasets.splits import apply_root_splits
from uts_cli.errors import InputDataError
from uts_cli.io.annotations import read_coco_points
from uts_cli.io.images import list_image_files, read_header

NAME = "CCMCT"
PIXEL_SIZE_UM = 0.25
DEFAULT_JSON = "MITOS_WSI_CCMCT_MEL.json"
FALLBACK_CATEGORY_KINDS = {2: KIND_MITOSIS, 7: KIND_HARD_NEGATIVE}
# Slide ids of the original project's constants (Fernandez-Martin et al., Apache-2.0).
TEST_SLIDES = frozenset({
    "be10fa37ad6e88e1f406", "f3741e764d39ccc4d114", "c86cd41f96331adf3856",
    "552c51bfb88fd3e65ffe", "8c9f9618fcaca747b7c3", "c91a842257ed2add5134",
    "dd4246ab756f6479c841", "f26e9fcef24609b988be", "96274538c93980aad8d6",
    "add0a9bbc53d1d9bac4c", "1018715d369dd0df2fc0",
})
VAL_SLIDES = frozenset({"3f2e034c75840cb901e6", "2efb541724b5c017c503", "70ed18cd5f806cf396f0"})
_EXPECTED = f"<root>/WSI/<slide id>.svs and <root>/{DEFAULT_JSON}"


def default_split(slide_id: str) -> str:
    """The original project's split of a CCMCT slide."""
    if slide_id in TEST_SLIDES:
        return "test"
    if slide_id in VAL_SLIDES:
        return "val"
    return "train"


def category_kinds(categories: dict[int, str]) -> dict[int, int]:
    """Map CCMCT category ids to point kinds by their names (see the module docstring).

    Args:
        categories: category id -> name from the JSON.

    Returns:
        category id -> ``KIND_MITOSIS`` / ``KIND_HARD_NEGATIVE``; ids of other cell classes
        are absent. Falls back to ``{2: mitosis, 7: hard negative}`` when no name matches.
    """
    kinds: dict[int, int] = {}
    for category_id, name in categories.items():
        key = re.sub(r"[^a-z]", "", name.lower())
        if key in ("mitoticfigure", "mitosis", "mitose"):
            kinds[category_id] = KIND_MITOSIS
        elif ("lookalike" in key or key in ("hardnegative", "notmitoticfigure",
                                             "nonmitoticfigure", "nonmitosis")):
            kinds[category_id] = KIND_HARD_NEGATIVE
    if KIND_MITOSIS not in kinds.values():
        return dict(FALLBACK_CATEGORY_KINDS)
    return kinds


def _find_json(root: Path, annotations: str | Path | None) -> Path:
    if annotations is not None:
        path = Path(annotations)
    elif (root / DEFAULT_JSON).is_file():
        path = root / DEFAULT_JSON
    else:
        candidates = sorted(root.glob("MITOS_WSI_CCMCT_*.json"))
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise InputDataError(
                f"CCMCT annotation file not found in {root} (MITOS_WSI_CCMCT_*.json: {found})",
                hint=f"expected {_EXPECTED}; pass --annotations to choose the variant",
            )
        path = candidates[0]
    if not path.is_file():
        raise InputDataError(f"CCMCT annotation file not found: {path}",
                             hint=f"expected {_EXPECTED}; pass --annotations")
    return path


def discover(root: str | Path, annotations: str | Path | None = None) -> DatasetListing:
    """List the CCMCT whole-slide images with mitoses and look-alikes.

    Args:
        root: the CCMCT folder (see the module docstring).
        annotations: the COCO-like JSON; default ``<root>/MITOS_WSI_CCMCT_MEL.json`` (or the
            single ``MITOS_WSI_CCMCT_*.json`` present).

    Returns:
        The dataset listing, slides sorted by id.

    Raises:
        InputDataError: missing/empty root, no WSI folder or JSON, a malformed JSON, or a
            point outside its slide.
    """
    root = Path(root)
    require_root(root, NAME, _EXPECTED)
    json_path = _find_json(root, annotations)
    wsi_dir = root / "WSI"
    if not wsi_dir.is_dir():
        raise InputDataError(f"CCMCT slide folder not found: {wsi_dir}",
                             hint=f"expected {_EXPECTED}; pass --root")
    coco = read_coco_points(json_path, category_kinds, ignore_other_categories=True)
    files = {p.stem: p for p in list_image_files(wsi_dir, recursive=False)
             if p.suffix.lower() in (".svs", ".tif", ".tiff")}
    listing = DatasetListing(NAME, root, [])
    if coco.ignored:
        parts = [f"{coco.categories.get(c, f'category {c}')}: {n}" for c, n in sorted(coco.ignored.items())]
        listing.warnings.append(f"ignored annotations of other cell classes ({', '.join(parts)})")
    missing: list[str] = []
    for entry in coco.images:
        slide = Path(entry.file_name).stem
        if slide not in files:
            missing.append(entry.file_name)
            continue
        shape, recorded = read_header(files[slide])
        listing.images.append(make_image(
            slide, slide, files[slide], coco.points[entry.id], default_split(slide),
            recorded or PIXEL_SIZE_UM, shape, where=f"slide {slide} ({json_path.name})",
            whole_slide=True,
        ))
    if missing:
        listing.warnings.append(f"{len(missing)} slide(s) in {json_path.name} are not in {wsi_dir}: "
                                f"{summarise(missing)}")
    extra = sorted(set(files) - {Path(e.file_name).stem for e in coco.images})
    if extra:
        listing.warnings.append(f"{len(extra)} slide file(s) are not in {json_path.name} and were "
                                f"skipped: {summarise(extra)}")
    if not listing.images:
        raise InputDataError(f"none of the slides in {json_path.name} is in {wsi_dir}",
                             hint=f"expected {_EXPECTED}; pass --root")
    listing.images.sort(key=lambda image: image.image_id)
    return apply_root_splits(listing)
