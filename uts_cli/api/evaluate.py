"""``eval``: localization precision / recall / F1 of a run, at patch and at region level.

Writes into ``RUN/eval-<split>/`` (or ``--output``): ``metrics.json``, ``matches.csv`` (one row per
region-level detection and per missed mitosis, in source-image coordinates) and, with overlays,
one PNG per field with TP (green), FP (yellow) and FN (blue) circles.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uts_cli.choices import CHECKPOINT_NAMES, MATCHING_MODES, TRUTH_MODES
from uts_cli.config import EvalConfig, check_schema_version
from uts_cli.errors import InputDataError, UsageError, library_errors
from uts_cli.io.store import SPLIT_CODES, PatchStore
from uts_cli.metrics import Counts
from uts_cli.reporting import NullReporter, Reporter

DEFAULT_RADIUS_PX = 30.0
OVERLAY_COLOURS = {"TP": (0, 200, 0), "FP": (255, 215, 0), "FN": (0, 90, 255)}


@dataclass
class EvalResult:
    run: Path
    store: Path
    split: str
    truth: str
    matching: str
    threshold: float
    radius_px: float | dict
    n_patches: int
    n_images: int
    patch: dict
    region: dict
    output: Path
    seconds: float
    image_level: dict = field(default_factory=dict)


def _radius_for(store: PatchStore, image_idx: int, cfg: EvalConfig) -> float:
    if cfg.radius_um is None:
        return cfg.radius_px if cfg.radius_px is not None else DEFAULT_RADIUS_PX
    size = float(store.image_pixel_size[image_idx])
    if not np.isfinite(size) or size <= 0:
        raise InputDataError(f"image {store.image_ids[image_idx]} has no recorded pixel size; "
                             "cannot convert --radius-um", hint="pass --radius-px instead")
    return cfg.radius_um / size


# Overlays bigger than this are drawn downscaled (a whole-slide field at full size is tens of GB).
OVERLAY_MAX_PIXELS = 64_000_000


def _overlay_scale(h: int, w: int) -> float:
    return min(1.0, (OVERLAY_MAX_PIXELS / max(h * w, 1)) ** 0.5)


def _draw_overlay(path: Path, rgb: np.ndarray, rows: list[dict], radius: float, scale: float = 1.0) -> None:
    import imageio.v3 as iio
    from skimage.draw import circle_perimeter

    img = rgb.copy()
    h, w = img.shape[:2]
    for r in rows:
        colour = OVERLAY_COLOURS[r["status"]]
        cy, cx = int(round(r["y"] * scale)), int(round(r["x"] * scale))
        for dr in (0, 1, 2):  # a 3 px ring stays visible on a downscaled view
            rr, cc = circle_perimeter(cy, cx, max(1, int(radius * scale)) + dr, shape=(h, w))
            img[rr, cc] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, img)


def _field_rgb(store: PatchStore, image_idx: int, scale: float = 1.0) -> np.ndarray:
    """The field put back together from its patches, at ``scale`` (white where no patch is)."""
    h, w = (int(v) for v in store.image_shape[image_idx][:2])
    oh, ow = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    out = np.full((oh, ow, 3), 255, np.uint8)
    p = store.patch_size
    for k in store.image_patches(image_idx):
        y, x = (int(v) for v in store.origin[k])
        tile = store.read_rgb(int(k))[: h - y, : w - x]
        if scale != 1.0:
            from PIL import Image

            y0, x0 = int(round(y * scale)), int(round(x * scale))
            y1, x1 = int(round(min(y + p, h) * scale)), int(round(min(x + p, w) * scale))
            if y1 <= y0 or x1 <= x0:
                continue
            tile = np.asarray(Image.fromarray(np.ascontiguousarray(tile)).resize((x1 - x0, y1 - y0), Image.BILINEAR))
            y, x = y0, x0
        out[y:y + tile.shape[0], x:x + tile.shape[1]] = tile[: oh - y, : ow - x]
    return out


@library_errors
def evaluate(cfg: EvalConfig, reporter: Reporter | None = None) -> EvalResult:
    """Score a trained run on one split of a store.

    Raises:
        UsageError: bad options.
        InputDataError: unknown run, run without checkpoint, store from another schema, no truth.
    """
    from uts_cli.devices import resolve_device
    from uts_cli.evaluation import RegionStitcher, match_rows, score_detections, score_map
    from uts_cli.io.atomic import atomic_write_json
    from uts_cli.io.export import write_points_csv
    from uts_cli.io.rundir import RunDir
    from uts_cli.metrics import best_f1_threshold
    from uts_cli.model.predict import load_run_model, predict_patches

    reporter = reporter or NullReporter()
    t0 = time.monotonic()
    if cfg.matching not in MATCHING_MODES:
        raise UsageError(f"unknown matching {cfg.matching!r}", hint=f"use one of {', '.join(MATCHING_MODES)}")
    if cfg.split not in SPLIT_CODES:
        raise UsageError(f"unknown split {cfg.split!r}", hint="use train, val or test")
    if cfg.truth not in TRUTH_MODES:
        raise UsageError(f"unknown --truth {cfg.truth!r}", hint=f"use one of {', '.join(TRUTH_MODES)}")
    if cfg.checkpoint not in CHECKPOINT_NAMES:
        raise UsageError(f"unknown checkpoint {cfg.checkpoint!r}", hint=f"use one of {', '.join(CHECKPOINT_NAMES)}")
    if cfg.radius_px is not None and cfg.radius_um is not None:
        raise UsageError("--radius-px and --radius-um exclude each other", hint="give one of them")
    run = RunDir(Path(cfg.run)).open_existing()
    rconf = run.read_config()
    check_schema_version(rconf, run.config_path)
    store_path = Path(cfg.store) if cfg.store else Path(rconf.get("config", {}).get("store", ""))
    store = PatchStore(store_path)
    device = resolve_device(cfg.device)
    model, info = load_run_model(run, cfg.checkpoint, device)
    run_stain = (rconf.get("stain") or {}).get("method")
    if run_stain is not None and run_stain != store.stain:
        reporter.warn(f"run was trained on a store with stain method {run_stain!r}, {store.path} has "
                      f"{store.stain!r}: scores may not mean what they should (normalize the store the same way)")
    if store.patch_size != int(rconf.get("input_size", store.patch_size)):
        reporter.warn(f"run was trained on {rconf.get('input_size')} px patches, store has {store.patch_size} px")
    threshold = cfg.threshold
    if threshold is None:
        threshold = float(rconf.get("pixel_threshold", rconf.get("threshold", info["threshold"])))
    use_truth = cfg.truth == "clean" or (cfg.truth == "auto" and store.has_truth)
    if use_truth and not store.has_truth:
        raise InputDataError(f"store {store.path} has no clean ground truth", hint="use --truth annotations")
    truth_name = "clean" if use_truth else "annotations"

    def truth_patch(k: int) -> np.ndarray:
        yx, kind = store.truth_for(k) if use_truth else store.points_for(k)
        return yx[kind == 0]

    indices = store.indices(cfg.split)
    # Images shipped without labels (MIDOG21 151-200) would make every detection a false positive.
    indices = indices[store.image_labelled[store.image_idx[indices]]]
    if len(indices) == 0:
        raise InputDataError(f"store {store.path} has no {cfg.split} patches", hint="choose another --split")
    out_dir = Path(cfg.output) if cfg.output else run.path / f"eval-{cfg.split}"
    images = np.unique(store.image_idx[indices])
    stitcher = RegionStitcher(store.image_idx, store.origin, store.image_shape, store.patch_size, indices,
                              threshold)
    patch_counts, region_counts = Counts(), Counts()
    rows: list[dict] = []
    probs_all, labels_all = [], []
    radii = {}
    reporter.start(f"eval {cfg.split}", len(indices))
    for batch in predict_patches(model, store, indices, device, batch_size=cfg.batch_size, want_cam=True,
                                 bn_adapt=cfg.bn_adapt, workers=cfg.workers, cam_dtype=np.float32):
        # float32 maps (one batch at a time): blobs then match predict's, pixel for pixel.
        cams = batch.cams.astype(np.float32)
        for k, cam in zip(batch.indices, cams):
            img = int(store.image_idx[k])
            truth = truth_patch(int(k))
            patch_counts += score_map(cam, threshold, truth, _radius_for(store, img, cfg), cfg.matching).counts
            labels_all.append(int(len(truth) > 0))
        probs_all.append(batch.probs)
        for img, dets in stitcher.add(batch.indices, cams):
            radius = _radius_for(store, img, cfg)
            radii[store.image_ids[img]] = radius
            truth = store.image_points(img, truth=use_truth, kind=0)
            scored = score_detections(dets, truth, radius, cfg.matching)
            region_counts += scored.counts
            img_rows = match_rows(store.image_ids[img], scored)
            rows += img_rows
            if cfg.overlays:
                name = store.image_ids[img].replace("/", "__") + ".png"
                h, w = (int(v) for v in store.image_shape[img][:2])
                scale = _overlay_scale(h, w)
                _draw_overlay(out_dir / "overlays" / name, _field_rgb(store, img, scale), img_rows, radius, scale)
        reporter.advance(len(batch.indices))
    reporter.finish()
    probs = np.concatenate(probs_all)
    labels = np.array(labels_all)
    image_level = {"threshold": float(rconf.get("threshold", info["threshold"]))}
    pred = probs >= image_level["threshold"]
    il = Counts(tp=int((pred & (labels == 1)).sum()), fp=int((pred & (labels == 0)).sum()),
                fn=int((~pred & (labels == 1)).sum()))
    image_level.update(il.to_dict())
    if labels.min(initial=1) != labels.max(initial=0):
        image_level["best_possible_f1"] = float(best_f1_threshold(probs, labels).f1)

    fields = ["image", "status", "y", "x", "score", "area", "distance"]
    write_points_csv(out_dir / "matches.csv", rows, fieldnames=fields)
    radius_report: float | dict = next(iter(set(radii.values()))) if len(set(radii.values())) == 1 else radii
    result = EvalResult(run=run.path, store=store.path, split=cfg.split, truth=truth_name, matching=cfg.matching,
                        threshold=threshold, radius_px=radius_report, n_patches=int(len(indices)),
                        n_images=int(len(images)), patch=patch_counts.to_dict(), region=region_counts.to_dict(),
                        output=out_dir, seconds=round(time.monotonic() - t0, 2), image_level=image_level)
    from dataclasses import asdict

    atomic_write_json(out_dir / "metrics.json", {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in asdict(result).items()})
    return result
