"""``prepare``: tile a raw dataset into an HDF5 patch store (resumable, atomic)."""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uts_cli.config import PrepareConfig, to_dict, to_json
from uts_cli.choices import KIND_HARD_NEGATIVE, KIND_MITOSIS
from uts_cli.datasets.base import SourceImage
from uts_cli.errors import InputDataError, UsageError, library_errors, resource_error
from uts_cli.io import store
from uts_cli.reporting import NullReporter, Reporter
from uts_cli.tiling import assign_points, extract_tile, tile_grid

# Whole-slide tiles are read and appended in blocks of this many patches to bound memory.
WSI_BLOCK = 32
WSI_DEFAULT_MIN_TISSUE = 0.2
FIELD_MASK_STEP = 4
# Annotations may sit up to half a pixel outside the image (a centre on the last pixel's edge).
POINT_SLACK = 0.5


@dataclass
class PrepareResult:
    store: Path
    dataset: str
    n_images: int
    n_patches: int
    n_positive: int
    n_points: int
    n_hard_negatives: int
    n_skipped_background: int
    splits: dict[str, int]
    resumed_images: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _disk_full_names(path: Path):
    """Turn a write that fails for lack of space into a ResourceError naming ``path``."""
    try:
        yield
    except OSError as exc:
        mapped = resource_error(exc, path)
        if mapped is None:
            raise
        raise mapped from None


def default_output(dataset: str, patch_size: int) -> Path:
    return Path("local_data") / "stores" / f"{dataset.lower()}-p{patch_size}.h5"


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _points_in_tiles(points_yx: np.ndarray, kinds: np.ndarray, grid: np.ndarray, keep: np.ndarray,
                     shape: tuple[int, int], patch_size: int):
    """Split image points over the kept tiles: (local tile idx, patch-local yx, kind) + counts."""
    owner = assign_points(points_yx, shape[0], shape[1], patch_size)
    new_index = np.full(len(grid), -1, np.int64)
    new_index[keep] = np.arange(len(keep))
    local = new_index[owner]
    sel = local >= 0
    yx = points_yx[sel] - grid[owner[sel]].astype(np.float32)
    order = np.argsort(local[sel], kind="stable")
    return local[sel][order], yx[order].astype(np.float32), kinds[sel][order].astype(np.uint8)


def _check_points(image: SourceImage, height: int, width: int) -> None:
    for name, pts in (("annotation", image.points_yx), ("truth", image.truth_yx)):
        if pts is None or len(pts) == 0:
            continue
        bad = ((pts[:, 0] < -POINT_SLACK) | (pts[:, 0] > height - 1 + POINT_SLACK)
               | (pts[:, 1] < -POINT_SLACK) | (pts[:, 1] > width - 1 + POINT_SLACK))
        if bad.any():
            y, x = pts[np.argmax(bad)]
            raise InputDataError(
                f"{name} point (x={x:.1f}, y={y:.1f}) lies outside image {image.image_id} "
                f"({width} x {height} px): {image.path}",
                hint="check the annotation file's coordinate order (x = column, y = row) and image size")


def _tile_rows(image: SourceImage, rgb_reader, grid: np.ndarray, keep: np.ndarray, tissue: np.ndarray,
               shape: tuple[int, int], patch_size: int) -> store.PatchRows:
    """Build the store rows for tiles ``keep`` of one image; ``rgb_reader(y0, x0)`` gives a tile."""
    pidx, yx, kind = _points_in_tiles(image.points_yx, image.kinds, grid, keep, shape, patch_size)
    n = len(keep)
    n_points = np.bincount(pidx[kind == KIND_MITOSIS], minlength=n).astype(np.uint16)
    n_hard = np.bincount(pidx[kind == KIND_HARD_NEGATIVE], minlength=n).astype(np.uint16)
    truth = None
    if image.truth_yx is not None:
        truth = _points_in_tiles(image.truth_yx, image.truth_kinds, grid, keep, shape, patch_size)
    rgb = np.empty((n, patch_size, patch_size, 3), np.uint8)
    for j, t in enumerate(keep):
        rgb[j] = rgb_reader(int(grid[t, 0]), int(grid[t, 1]))
    return store.PatchRows(rgb=rgb, origin=grid[keep].astype(np.int32), label=(n_points > 0).astype(np.uint8),
                           n_points=n_points, n_hard=n_hard, tissue=tissue[keep].astype(np.float32),
                           points=(pidx, yx, kind), truth=truth)


def _block_rows(rows: store.PatchRows, sel: slice) -> store.PatchRows:
    """Rows of a slice of tiles, with point indices made local to the slice."""

    def cut(pts):
        if pts is None:
            return None
        pidx, yx, kind = pts
        m = (pidx >= sel.start) & (pidx < sel.stop)
        return pidx[m] - sel.start, yx[m], kind[m]

    return store.PatchRows(rgb=rows.rgb[sel], origin=rows.origin[sel], label=rows.label[sel],
                           n_points=rows.n_points[sel], n_hard=rows.n_hard[sel], tissue=rows.tissue[sel],
                           points=cut(rows.points), truth=cut(rows.truth))


def _prepare_field(f, i: int, image: SourceImage, patch_size: int, min_tissue: float) -> tuple[int, int]:
    """Tile one high-power field read whole. Returns (patches written, tiles skipped)."""
    from uts_cli.io.images import open_image, tissue_fraction, tissue_mask

    with open_image(image.path) as reader:
        rgb = reader.read()
    h, w = rgb.shape[:2]
    _check_points(image, h, w)
    grid = tile_grid(h, w, patch_size)
    # A mask at 1/4 resolution is plenty for a tissue fraction and 16x cheaper than a full one.
    mask = tissue_mask(rgb[::FIELD_MASK_STEP, ::FIELD_MASK_STEP])
    tissue = np.array([tissue_fraction(mask, int(y), int(x), patch_size, patch_size, 1 / FIELD_MASK_STEP)
                       for y, x in grid], np.float32)
    keep = _kept_tiles(image, grid, tissue, (h, w), patch_size, min_tissue)
    rows = _tile_rows(image, lambda y, x: extract_tile(rgb, y, x, patch_size), grid, keep, tissue,
                      (h, w), patch_size)
    store.append_rows(f, i, rows)
    return len(keep), len(grid) - len(keep)


def _kept_tiles(image: SourceImage, grid: np.ndarray, tissue: np.ndarray, shape, patch_size: int,
                min_tissue: float) -> np.ndarray:
    """Tiles with enough tissue, plus every tile holding an annotated point (never drop a label)."""
    keep = tissue >= min_tissue
    for pts in (image.points_yx, image.truth_yx):
        if pts is not None and len(pts):
            keep[assign_points(pts, shape[0], shape[1], patch_size)] = True
    return np.flatnonzero(keep)


def _prepare_slide(f, i: int, image: SourceImage, patch_size: int, min_tissue: float) -> tuple[int, int]:
    """Tile a whole-slide image region by region, skipping tiles with too little tissue."""
    from uts_cli.io.images import open_image, tissue_fraction, tissue_mask

    with open_image(image.path) as reader:
        h, w = reader.shape[:2]
        _check_points(image, h, w)
        lowres, scale = reader.read_lowres()
        mask = tissue_mask(lowres)
        grid = tile_grid(h, w, patch_size)
        tissue = np.array([tissue_fraction(mask, int(y), int(x), patch_size, patch_size, scale)
                           for y, x in grid], np.float32)
        keep = _kept_tiles(image, grid, tissue, (h, w), patch_size, min_tissue)
        for b in range(0, len(keep), WSI_BLOCK):
            block = keep[b:b + WSI_BLOCK]
            rows = _tile_rows(image, lambda y, x: reader.read_region(y, x, patch_size, patch_size),
                              grid, block, tissue, (h, w), patch_size)
            store.append_rows(f, i, rows)
    return len(keep), len(grid) - len(keep)


def _image_row(image: SourceImage) -> dict:
    from uts_cli.io.images import open_image

    with open_image(image.path) as reader:
        shape = tuple(int(s) for s in reader.shape)
        pixel_size = image.pixel_size_um if image.pixel_size_um is not None else reader.pixel_size_um
    return {"id": image.image_id, "case_id": image.case_id, "path": str(image.path), "shape": shape,
            "split": image.split, "pixel_size_um": pixel_size, "labelled": image.labelled}


@library_errors
def prepare(cfg: PrepareConfig, reporter: Reporter | None = None) -> PrepareResult:
    """Tile every image of a dataset into a new patch store.

    Args:
        cfg: what to read and how to tile it.
        reporter: progress sink (NullReporter when None).

    Returns:
        A summary of the written store.

    Raises:
        UsageError: bad options, or the output exists without ``overwrite``.
        InputDataError: missing, corrupt or malformed input data.
    """
    from uts_cli.datasets import registry
    from uts_cli.datasets.splits import apply_splits, read_splits_file

    reporter = reporter or NullReporter()
    t0 = time.monotonic()
    if cfg.patch_size < 16:
        raise UsageError(f"--patch-size {cfg.patch_size} is too small", hint="use at least 16 pixels")
    if cfg.compression not in store.COMPRESSIONS:
        raise UsageError(f"unknown compression {cfg.compression!r}",
                         hint=f"use one of {', '.join(store.COMPRESSIONS)}")
    listing = registry.discover(cfg.dataset, cfg.root, **cfg.dataset_options)
    if cfg.splits_file is not None:
        apply_splits(listing, read_splits_file(cfg.splits_file))
    images = sorted(listing.images, key=lambda im: im.image_id)
    if not images:
        raise InputDataError(f"no images found for {listing.name} under {listing.root}",
                             hint="check --root and the folder layout in the README")
    for warning in listing.warnings:
        reporter.warn(warning)
    out = Path(cfg.output) if cfg.output else default_output(listing.name, cfg.patch_size)
    store.check_output_path(out, cfg.overwrite, warn=reporter.warn)

    has_truth = any(im.truth_yx is not None for im in images)
    image_rows = [_image_row(im) for im in images]
    store_cfg = to_dict(cfg)
    store_cfg.update(root=str(listing.root), output=None, overwrite=None, dataset=listing.name,
                     images=[[r["id"], r["split"], list(r["shape"])] for r in image_rows])
    chash = store.config_hash(store_cfg)
    part = store.partial_path(out)
    with _disk_full_names(part):
        f = store.open_partial_for_resume(out, chash, warn=reporter.warn)
        resumed = 0
        if f is None:
            f = store.create_partial(out, attrs={"config_json": to_json(cfg), "config_hash": chash,
                                                 "dataset": listing.name, "source_root": str(listing.root)},
                                     patch_size=cfg.patch_size, compression=cfg.compression,
                                     has_truth=has_truth)
            store.write_images_table(f, image_rows)
        else:
            resumed = int(f["images/done"][...].sum())
            reporter.log(f"resuming {part}: {resumed}/{len(images)} images already done")
        try:
            done = f["images/done"][...]
            reporter.start(f"prepare {listing.name}", len(images))
            reporter.advance(resumed)
            for i, image in enumerate(images):
                if done[i]:
                    continue
                min_tissue = cfg.min_tissue
                if min_tissue is None:
                    min_tissue = WSI_DEFAULT_MIN_TISSUE if image.whole_slide else 0.0
                tile = _prepare_slide if image.whole_slide else _prepare_field
                _, n_skipped = tile(f, i, image, cfg.patch_size, min_tissue)
                f["images/n_skipped"][i] = n_skipped
                store.commit_image(f, i, _file_sha256(Path(image.path)))
                reporter.advance(1)
            reporter.finish()
            skipped = int(f["images/n_skipped"][...].sum())
            store.finalize(f, out)
        finally:
            if f.id.valid:
                f.close()
    ps = store.PatchStore(out)
    pidx, _, kinds = ps.all_points()
    return PrepareResult(
        store=out, dataset=listing.name, n_images=ps.n_images, n_patches=len(ps),
        n_positive=int(ps.label.sum()), n_points=int((kinds == KIND_MITOSIS).sum()),
        n_hard_negatives=int((kinds == KIND_HARD_NEGATIVE).sum()), n_skipped_background=skipped,
        splits={name: int((ps.split == code).sum()) for name, code in store.SPLIT_CODES.items()},
        resumed_images=resumed, seconds=round(time.monotonic() - t0, 2), warnings=list(listing.warnings))
