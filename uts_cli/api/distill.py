"""``distill``: remove the samples the teacher disagrees with, then train the student.

Writes into the student's run folder, besides the usual run files:
``distill/removed.csv`` (one row per removed patch, with why and where) and
``distill/geojson/<image>.geojson`` (the annotated points of removed patches and the teacher's
detections, in source-image pixel coordinates; one file per image, to import into QuPath), plus ``distill/summary.json``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uts_cli.config import DistillConfig, TeachConfig, to_dict
from uts_cli.distillation import FILTERS, REASONS, decide
from uts_cli.errors import InputDataError, UsageError
from uts_cli.io.store import PatchStore
from uts_cli.reporting import NullReporter, Reporter

# Fewer kept training samples than this cannot train a student sensibly.
MIN_KEPT = 8


@dataclass
class DistillResult:
    run: Path
    teacher: Path
    criterion: str
    pseudolabel: bool
    n_train_before: int
    n_train_kept: int
    n_val_before: int
    n_val_kept: int
    removed_by_reason: dict[str, int]
    removed_true_lookalikes: int | None
    removed_true_mitoses: int | None
    removed_csv: Path
    removed_geojson: Path
    student: dict = field(default_factory=dict)
    seconds: float = 0.0


def _score_teacher(model, store: PatchStore, indices: np.ndarray, device, threshold: float, pixel_threshold: float,
                   radius: float, batch_size: int, amp: str, workers: int, reporter: Reporter):
    """Teacher image-level probabilities and per-patch localization counts on ``indices``."""
    from uts_cli.evaluation import score_map
    from uts_cli.model.predict import predict_patches

    n = len(indices)
    probs = np.zeros(n, np.float32)
    tp, fp, fn = (np.zeros(n, np.int64) for _ in range(3))
    detections: dict[int, np.ndarray] = {}
    pos = {int(k): j for j, k in enumerate(indices)}
    reporter.start("teacher scores", n)
    for batch in predict_patches(model, store, indices, device, batch_size=batch_size, amp=amp, want_cam=True,
                                 workers=workers):
        for k, p, cam in zip(batch.indices, batch.probs, batch.cams):
            j = pos[int(k)]
            probs[j] = p
            yx, kind = store.points_for(int(k))
            scored = score_map(cam.astype(np.float32), pixel_threshold, yx[kind == 0], radius)
            c = scored.counts
            tp[j], fp[j], fn[j] = c.tp, c.fp, c.fn
            if len(scored.detections):
                detections[int(k)] = scored.detections.yx
        reporter.advance(len(batch.indices))
    reporter.finish()
    return probs, tp, fp, fn, detections


def _removed_rows(store: PatchStore, indices, probs, decision, detections, split_name):
    rows, features = [], []
    from uts_cli.io.export import point_feature

    for j in np.flatnonzero(decision.reason != ""):
        k = int(indices[j])
        img = int(store.image_idx[k])
        oy, ox = (int(v) for v in store.origin[k])
        yx, kind = store.points_for(k)
        reason = str(decision.reason[j])
        base = {"patch": k, "split": split_name, "image": store.image_ids[img], "image_path": store.image_path[img],
                "patch_y": oy, "patch_x": ox, "patch_size": store.patch_size, "label": int(store.label[k]),
                "teacher_prob": round(float(probs[j]), 4), "reason": reason,
                "action": "relabelled" if decision.keep[j] else "removed"}
        mitoses = yx[kind == 0] + np.array([oy, ox], np.float32)
        dets = detections.get(k, np.zeros((0, 2), np.float32)) + np.array([oy, ox], np.float32)
        rows.append({**base, "annotated_points_yx": ";".join(f"{y:.1f},{x:.1f}" for y, x in mitoses),
                     "teacher_detections_yx": ";".join(f"{y:.1f},{x:.1f}" for y, x in dets)})
        props = {"image": base["image"], "image_path": base["image_path"], "patch": k, "reason": reason, "explanation": REASONS[reason],
                 "teacher_prob": base["teacher_prob"], "action": base["action"]}
        for y, x in mitoses:
            features.append(point_feature(float(y), float(x), "suspect annotation", properties=props))
        for y, x in dets:
            features.append(point_feature(float(y), float(x), "teacher detection", properties=props))
    return rows, features


def _truth_audit(store: PatchStore, removed: np.ndarray) -> tuple[int | None, int | None]:
    """On stores with a clean truth: how many removed positives were really look-alikes / mitoses."""
    if not store.has_truth:
        return None, None
    lookalike_only = real = 0
    for k in removed:
        if store.label[k] != 1:
            continue
        yx, kind = store.truth_for(int(k))
        if (kind == 0).any():
            real += 1
        else:
            lookalike_only += 1
    return lookalike_only, real


def distill(cfg: DistillConfig, reporter: Reporter | None = None) -> DistillResult:
    """Filter the teacher's training set and train a student on what is kept.

    Raises:
        UsageError: unknown filter, bad overrides, or the student run exists.
        InputDataError: the teacher run is missing/incomplete, or too few samples are kept.
    """
    from uts_cli.api.teach import resolve_run, train_run
    from uts_cli.data import only_one_mitosis
    from uts_cli.devices import resolve_device
    from uts_cli.io.export import write_geojson_points, write_points_csv
    from uts_cli.io.rundir import RunDir
    from uts_cli.io.atomic import atomic_write_json
    from uts_cli.model.predict import load_run_model

    reporter = reporter or NullReporter()
    t0 = time.monotonic()
    if cfg.criterion not in FILTERS:
        raise UsageError(f"unknown filter {cfg.criterion!r}", hint=f"use one of {', '.join(FILTERS)}")
    teacher_dir = resolve_run(cfg.teacher, cfg.runs_dir)
    teacher_run = RunDir(teacher_dir).open_existing()
    tconf = teacher_run.read_config()
    if "threshold" not in tconf or "config" not in tconf:
        raise InputDataError(f"teacher run {teacher_dir} has not finished training",
                             hint=f"finish it with: uts teach ... --name {teacher_dir.name} --resume")
    teacher_cfg = dict(tconf["config"])
    unknown = set(cfg.overrides) - {f.name for f in dataclasses.fields(TeachConfig)}
    if unknown:
        raise UsageError(f"unknown student option(s): {', '.join(sorted(unknown))}", hint="see uts distill --help")
    student_fields = {**teacher_cfg, **{k: v for k, v in cfg.overrides.items() if v is not None}}
    student_fields.update(name=cfg.name, runs_dir=str(cfg.runs_dir), resume=cfg.resume,
                          overwrite=cfg.overwrite, device=cfg.device, workers=cfg.workers)
    student_cfg = TeachConfig(**{k: (Path(v) if k in ("store", "runs_dir") else v)
                                 for k, v in student_fields.items()})
    store = PatchStore(student_cfg.store)
    device = resolve_device(cfg.device)

    train_idx = store.indices("train")
    if student_cfg.only_one_mitosis:
        train_idx = only_one_mitosis(store, train_idx)
    val_idx = store.indices("val")
    teacher, _ = load_run_model(teacher_run, "best", device)
    threshold = float(tconf["threshold"])
    pixel_threshold = float(tconf.get("pixel_threshold", threshold))
    amp = str(teacher_cfg.get("amp", "auto"))
    batch = int(teacher_cfg.get("batch_size", 32))

    decisions, rows, features = {}, [], []
    removed_train = np.zeros(0, np.int64)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        if len(idx) == 0:
            decisions[split] = None
            continue
        probs, tp, fp, fn, dets = _score_teacher(teacher, store, idx, device, threshold, pixel_threshold,
                                                 cfg.radius_px, batch, amp, cfg.workers, reporter)
        d = decide(store.label[idx], probs, threshold, tp, fp, fn, cfg.criterion, cfg.pseudolabel)
        decisions[split] = (idx, d)
        r, f = _removed_rows(store, idx, probs, d, dets, split)
        rows += r
        features += f
        if split == "train":
            removed_train = idx[d.reason != ""]
    del teacher

    out_dir = resolve_run(cfg.name, cfg.runs_dir) / "distill"
    train_d = decisions["train"]
    kept_train = train_d[0][train_d[1].keep] if train_d else np.zeros(0, np.int64)
    kept_val = decisions["val"][0][decisions["val"][1].keep] if decisions["val"] else np.zeros(0, np.int64)
    labels = None
    if cfg.pseudolabel:
        labels = store.label.copy()
        for split in ("train", "val"):
            if decisions[split]:
                idx, d = decisions[split]
                labels[idx] = d.label
    kept_labels = (labels if labels is not None else store.label)[kept_train]
    if len(kept_train) < MIN_KEPT or kept_labels.min(initial=1) == kept_labels.max(initial=0):
        raise InputDataError(
            f"distillation kept {len(kept_train)} of {len(train_idx)} training patches "
            f"({int(kept_labels.sum())} positive): too few to train a student",
            hint="the teacher disagrees with almost every annotation; check the teacher's val F1, "
                 "try --filter FP or --pseudolabel, or train the teacher longer")

    by_reason: dict[str, int] = {}
    for r in rows:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    lookalikes, real = _truth_audit(store, removed_train)
    summary = {"teacher": str(teacher_dir), "criterion": cfg.criterion, "pseudolabel": cfg.pseudolabel,
               "threshold": threshold, "pixel_threshold": pixel_threshold, "radius_px": cfg.radius_px,
               "n_train_before": int(len(train_idx)), "n_train_kept": int(len(kept_train)),
               "n_val_before": int(len(val_idx)), "n_val_kept": int(len(kept_val)),
               "removed_by_reason": by_reason, "removed_true_lookalikes": lookalikes,
               "removed_true_mitoses": real}
    extra = {"distill": summary, "teacher_config": tconf}
    result = train_run(student_cfg, reporter, train_indices=kept_train, val_indices=kept_val, labels=labels,
                       extra_config=extra, command="distill")
    fields = ["patch", "split", "image", "image_path", "patch_y", "patch_x", "patch_size", "label",
              "teacher_prob", "reason", "action", "annotated_points_yx", "teacher_detections_yx"]
    csv_path, geo_path = out_dir / "removed.csv", out_dir / "geojson"
    write_points_csv(csv_path, rows, fieldnames=fields)
    # QuPath imports GeoJSON into the open image, so write one file per source image.
    by_image: dict[str, list] = {}
    for feat in features:
        by_image.setdefault(feat["properties"]["image"], []).append(feat)
    for image_id, feats in by_image.items():
        write_geojson_points(geo_path / (image_id.replace("/", "__") + ".geojson"), feats)
    atomic_write_json(out_dir / "summary.json", summary)
    return DistillResult(
        run=result.run, teacher=teacher_dir, criterion=cfg.criterion, pseudolabel=cfg.pseudolabel,
        n_train_before=int(len(train_idx)), n_train_kept=int(len(kept_train)), n_val_before=int(len(val_idx)),
        n_val_kept=int(len(kept_val)), removed_by_reason=by_reason, removed_true_lookalikes=lookalikes,
        removed_true_mitoses=real, removed_csv=csv_path, removed_geojson=geo_path,
        student={k: v for k, v in to_dict(result).items() if k != "history"},
        seconds=round(time.monotonic() - t0, 2))
