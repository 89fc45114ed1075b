"""``distill``: remove the samples the teacher disagrees with, then train the student.

Writes into the student's run folder, besides the usual run files:
``distill/removed.csv`` (one row per removed patch, with why and where) and
``distill/geojson/<image>.geojson`` (the annotated points of removed patches and the teacher's
detections, in source-image pixel coordinates; one file per image, to import into QuPath), plus ``distill/summary.json``.
These review files are written before the student trains, so they exist even when training is
interrupted.

The teacher's scores and decisions are kept in ``distill/teacher_scores.npz`` (with
``kept_train.npy`` / ``kept_val.npy``), bound to the store's uuid and the teacher checkpoint's
sha256: ``--resume`` reuses them instead of scoring the store again.

Every option, the student name and an existing student run are checked before the teacher is
loaded, so a mistake costs seconds, not a scoring pass.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uts_cli.choices import FILTERS, PIXEL_THRESHOLD_MODES
from uts_cli.config import DistillConfig, TeachConfig, check_schema_version, to_dict
from uts_cli.distillation import REASONS, Decision, decide
from uts_cli.errors import InputDataError, UsageError, library_errors
from uts_cli.io.atomic import atomic_write, atomic_write_json
from uts_cli.io.rundir import RunDir, RunLogReporter, check_run_name, resolve_run
from uts_cli.io.store import PatchStore
from uts_cli.reporting import NullReporter, Reporter

# Fewer kept training samples than this cannot train a student sensibly.
MIN_KEPT = 8
SCORES_FILE = "teacher_scores.npz"
CSV_FIELDS = ["patch", "split", "image", "image_path", "patch_y", "patch_x", "patch_size", "label",
              "teacher_prob", "reason", "action", "annotated_points_yx", "teacher_detections_yx"]


@dataclass
class _Scores:
    """The teacher's view of one split: what ``decide`` needs, plus the detections for review."""

    indices: np.ndarray
    probs: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    detections: dict[int, np.ndarray]
    peak_near: np.ndarray | None = None   # CAM peak within the radius of an annotated mitosis


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
    reused_scores: bool = False


def _score_teacher(model, store: PatchStore, indices: np.ndarray, device, threshold: float, pixel_threshold: float,
                   radius: float, batch_size: int, amp: str, workers: int, reporter: Reporter):
    """Teacher image-level probabilities and per-patch localization counts on ``indices``."""
    from uts_cli.evaluation import score_map
    from uts_cli.model.predict import predict_patches

    n = len(indices)
    probs = np.zeros(n, np.float32)
    tp, fp, fn = (np.zeros(n, np.int64) for _ in range(3))
    peak_near = np.zeros(n, bool)
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
            peak_near[j] = cam_peak_near(cam, yx[kind == 0], radius)
            if len(scored.detections):
                detections[int(k)] = scored.detections.yx
        reporter.advance(len(batch.indices))
    reporter.finish()
    return probs, tp, fp, fn, detections, peak_near


def cam_peak_near(cam: np.ndarray, points_yx: np.ndarray, radius: float) -> bool:
    """True when the CAM's maximum lies within ``radius`` pixels of one of ``points_yx``."""
    if len(points_yx) == 0:
        return False
    peak = np.array(np.unravel_index(int(np.argmax(cam)), cam.shape), np.float32)
    return bool((np.hypot(*(np.asarray(points_yx, np.float32) - peak).T) <= radius).any())


def _score_teacher_sharded(model, store: PatchStore, indices: np.ndarray, *args, **kwargs):
    """:func:`_score_teacher` with the patches split over the ranks, the results gathered on all of them.

    Every rank ends with the same arrays as one process scoring everything, so every rank takes
    the same decisions and trains on the same kept set.
    """
    from uts_cli import distributed

    ctx = distributed.current()
    if not ctx.enabled:
        return _score_teacher(model, store, indices, *args, **kwargs)
    indices = np.asarray(indices, np.int64)
    mine = distributed.shard_strided(len(indices), ctx.world_size, ctx.rank)
    part = _score_teacher(model, store, indices[mine], *args, **kwargs) if len(mine) else None
    parts = distributed.all_gather_object((mine, part))
    probs = np.zeros(len(indices), np.float32)
    tp, fp, fn = (np.zeros(len(indices), np.int64) for _ in range(3))
    peak_near = np.zeros(len(indices), bool)
    detections: dict[int, np.ndarray] = {}
    for pos, res in parts:
        if res is None:
            continue
        probs[pos], tp[pos], fp[pos], fn[pos], peak_near[pos] = res[0], res[1], res[2], res[3], res[5]
        detections.update(res[4])
    # In index order, as a single process inserts them (the saved scores file is then the same).
    detections = {int(k): detections[int(k)] for k in indices if int(k) in detections}
    return probs, tp, fp, fn, detections, peak_near


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


def _check_options(cfg: DistillConfig) -> None:
    """Every option that can be checked without reading the teacher or the store."""
    check_run_name(cfg.name)
    if cfg.criterion not in FILTERS:
        raise UsageError(f"unknown filter {cfg.criterion!r}", hint=f"use --filter {' or '.join(FILTERS)}")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite exclude each other", hint="give one of them")
    if not cfg.radius_px > 0:
        raise UsageError(f"--radius-px {cfg.radius_px} must be positive", hint="use e.g. --radius-px 30")
    if cfg.workers < 0:
        raise UsageError(f"--workers {cfg.workers} must not be negative", hint="use 0 to load in the main process")
    known = {f.name for f in dataclasses.fields(TeachConfig)}
    unknown = set(cfg.overrides) - known
    if unknown:
        raise UsageError(f"unknown student option(s): {', '.join(sorted(unknown))}", hint="see uts distill --help")
    o = {k: v for k, v in cfg.overrides.items() if v is not None}
    checks = [
        ("epochs", lambda v: int(v) >= 1, "--epochs must be at least 1"),
        ("lr", lambda v: float(v) > 0, "--lr must be positive"),
        ("batch_size", lambda v: int(v) >= 1, "--batch-size must be at least 1"),
        ("steps_per_epoch", lambda v: int(v) >= 1, "--steps-per-epoch must be at least 1"),
        ("pixel_threshold", lambda v: v in PIXEL_THRESHOLD_MODES,
         f"--pixel-threshold must be one of {', '.join(PIXEL_THRESHOLD_MODES)}"),
        ("weights", lambda v: v in ("imagenet", "none") or Path(v).is_file(),
         "--weights must be imagenet, none or an existing weights file"),
    ]
    for key, ok, message in checks:
        if key in o and not ok(o[key]):
            raise UsageError(f"{message} (got {o[key]!r})", hint="fix the student option and rerun")


def _check_student_dir(cfg: DistillConfig, student: RunDir, teacher_dir: Path) -> None:
    if student.path.resolve() == teacher_dir.resolve():
        raise UsageError(f"the student run would replace its teacher: {student.path}",
                         hint="give the student another --name")
    if student.path.exists() and not student.path.is_dir():
        raise UsageError(f"student run path is a file: {student.path}", hint="choose another --name or --runs-dir")
    exists = student.path.is_dir() and any(student.path.iterdir())
    if exists and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"student run exists and is not empty: {student.path}",
                         hint="pass --resume to continue it, --overwrite to replace it, or choose another --name")


def _load_teacher(run: RunDir, device):
    """The teacher network from its best checkpoint (the costly step the option checks precede)."""
    from uts_cli.model.predict import load_run_model

    return load_run_model(run, "best", device)[0]


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _save_scores(path: Path, key: dict, scores: dict[str, _Scores | None],
                 decisions: dict[str, Decision | None]) -> None:
    """Write the teacher's scores and decisions of both splits atomically into one ``.npz``."""
    arrays: dict[str, np.ndarray] = {"key_json": np.array(json.dumps(key, sort_keys=True))}
    for split, sc in scores.items():
        d = decisions[split]
        if sc is None or d is None:
            continue
        det_patch = np.array([k for k, yx in sc.detections.items() for _ in range(len(yx))], np.int64)
        det_yx = (np.concatenate([sc.detections[k] for k in sc.detections]).astype(np.float32)
                  if sc.detections else np.zeros((0, 2), np.float32))
        arrays.update({f"{split}_indices": sc.indices, f"{split}_probs": sc.probs, f"{split}_tp": sc.tp,
                       f"{split}_fp": sc.fp, f"{split}_fn": sc.fn, f"{split}_det_patch": det_patch,
                       f"{split}_det_yx": det_yx, f"{split}_keep": d.keep,
                       f"{split}_peak_near": sc.peak_near if sc.peak_near is not None else np.zeros(0, bool),
                       f"{split}_reason": d.reason.astype(str), f"{split}_label": d.label})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _load_scores(path: Path) -> tuple[dict, dict[str, _Scores | None], dict[str, Decision | None]] | None:
    """Read what :func:`_save_scores` wrote; None when the file is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            key = json.loads(str(z["key_json"]))
            scores: dict[str, _Scores | None] = {}
            decisions: dict[str, Decision | None] = {}
            for split in ("train", "val"):
                if f"{split}_indices" not in z:
                    scores[split] = decisions[split] = None
                    continue
                det_patch, det_yx = z[f"{split}_det_patch"], z[f"{split}_det_yx"]
                dets = {int(k): det_yx[det_patch == k] for k in np.unique(det_patch)}
                peak = z[f"{split}_peak_near"] if f"{split}_peak_near" in z else None
                scores[split] = _Scores(z[f"{split}_indices"], z[f"{split}_probs"], z[f"{split}_tp"],
                                        z[f"{split}_fp"], z[f"{split}_fn"], dets,
                                        peak if peak is not None and len(peak) == len(z[f"{split}_indices"]) else None)
                decisions[split] = Decision(keep=z[f"{split}_keep"], reason=z[f"{split}_reason"],
                                            label=z[f"{split}_label"])
    except (OSError, ValueError, KeyError):
        return None
    return key, scores, decisions


def _write_review(out_dir: Path, rows: list[dict], features: list[dict], summary: dict) -> None:
    from uts_cli.io.export import write_geojson_points, write_points_csv

    write_points_csv(out_dir / "removed.csv", rows, fieldnames=CSV_FIELDS)
    geo = out_dir / "geojson"
    for stale in geo.glob("*.geojson") if geo.is_dir() else ():
        stale.unlink()  # left by an earlier decision set of this run
    # QuPath imports GeoJSON into the open image, so write one file per source image.
    by_image: dict[str, list] = {}
    for feat in features:
        by_image.setdefault(feat["properties"]["image"], []).append(feat)
    for image_id, feats in by_image.items():
        write_geojson_points(geo / (image_id.replace("/", "__") + ".geojson"), feats)
    atomic_write_json(out_dir / "summary.json", summary)


@library_errors
def distill(cfg: DistillConfig, reporter: Reporter | None = None) -> DistillResult:
    """Filter the teacher's training set and train a student on what is kept.

    Args:
        cfg: teacher, student name and options, filter settings.
        reporter: progress sink.

    Returns:
        What was removed and why, where the review files are, and the student's training summary.

    Raises:
        UsageError: a bad option or student name, or the student run exists without
            ``resume``/``overwrite`` (all checked before the teacher is loaded); or ``resume``
            with filter settings that differ from those the student was trained with.
        InputDataError: the teacher run is missing/incomplete, or too few samples are kept.
        ResourceError: the device is unavailable, or the disk is full.

    Under torchrun the teacher's scoring is split over the processes and the student trains
    with DistributedDataParallel; rank 0 writes every file.
    """
    from uts_cli import distributed

    with distributed.session(cfg.device) as (_, device):
        with distributed.peer_guard():
            return _distill(cfg, reporter, device)


def _distill(cfg: DistillConfig, reporter: Reporter | None, device) -> DistillResult:
    from uts_cli import distributed
    from uts_cli.api.teach import train_run
    from uts_cli.data import only_one_mitosis

    on_main = distributed.on_main
    reporter = distributed.rank_reporter(reporter or NullReporter())
    t0 = time.monotonic()
    _check_options(cfg)
    teacher_dir = resolve_run(cfg.teacher, cfg.runs_dir)
    student = RunDir(resolve_run(cfg.name, cfg.runs_dir))
    _check_student_dir(cfg, student, teacher_dir)
    teacher_run = RunDir(teacher_dir).open_existing()
    tconf = teacher_run.read_config()
    check_schema_version(tconf, teacher_run.config_path)
    if "threshold" not in tconf or "config" not in tconf:
        raise InputDataError(f"teacher run {teacher_dir} has not finished training",
                             hint=f"finish it with: uts teach STORE --name {teacher_dir.name} "
                                  f"--runs-dir {teacher_dir.parent} --resume")
    teacher_ck = teacher_run.checkpoint_path("best")
    if not teacher_ck.is_file():
        raise InputDataError(f"teacher run has no best checkpoint: {teacher_ck}",
                             hint="train the teacher with `uts teach` first")
    cfg.check_overrides()
    teacher_cfg = TeachConfig.from_dict(tconf)
    # The student inherits the teacher's options, then the overrides; the run itself is distill's.
    student_cfg = dataclasses.replace(
        teacher_cfg, **{k: v for k, v in cfg.overrides.items() if v is not None},
        name=cfg.name, runs_dir=Path(cfg.runs_dir), resume=cfg.resume, overwrite=cfg.overwrite,
        device=cfg.device, workers=cfg.workers)
    store = PatchStore(student_cfg.store)

    train_idx = store.indices("train")
    if student_cfg.only_one_mitosis:
        train_idx = only_one_mitosis(store, train_idx)
    val_idx = store.indices("val")
    threshold = float(tconf["threshold"])
    pixel_threshold = float(tconf.get("pixel_threshold", threshold))
    score_key = {"store_uuid": store.uuid, "teacher_checkpoint_sha256": _file_sha256(teacher_ck),
                 "threshold": threshold, "pixel_threshold": pixel_threshold, "radius_px": float(cfg.radius_px),
                 "n_train": int(len(train_idx)), "n_val": int(len(val_idx))}
    if cfg.criterion == "PEAK":
        # Scores saved before the CAM peaks were recorded lack them: PEAK must not reuse those.
        score_key["peaks"] = True
    decision_key = {"criterion": cfg.criterion, "pseudolabel": bool(cfg.pseudolabel)}
    if cfg.keep_negatives:  # only when set, so the scores cached by earlier versions stay valid
        decision_key["keep_negatives"] = True

    # The student folder exists from here on; everything below can be resumed.
    if cfg.resume and student.path.is_dir():
        if not student.config_path.is_file() and not (student.path / "distill").is_dir() \
                and any(student.path.iterdir()):
            raise UsageError(f"{student.path} is not a student run of `uts distill`",
                             hint="choose another --name, or --overwrite it")
    else:
        on_main(lambda: student.create(overwrite=cfg.overwrite))
    log = RunLogReporter(reporter, student) if distributed.current().is_main else reporter
    out_dir = student.path / "distill"
    scores_path = out_dir / SCORES_FILE
    trained = student.has_checkpoint("last")

    cached = _load_scores(scores_path) if cfg.resume else None
    reused = False
    scores: dict[str, _Scores | None] = {}
    decisions: dict[str, Decision | None] = {}
    if cached is not None and cached[0].get("score") == score_key:
        _, scores, decisions = cached
        reused = True
        if cached[0].get("decision") != decision_key:
            if trained:
                raise UsageError(f"the student in {student.path} was trained with other filter settings "
                                 f"({cached[0].get('decision')})",
                                 hint="rerun with the same --filter/--pseudolabel/--keep-negatives, or --overwrite the student")
            decisions = {}
        log.log(f"reusing the teacher's scores from {scores_path}")
    else:
        if trained:
            raise UsageError(f"the student in {student.path} was distilled from other teacher scores "
                             "(teacher, store or thresholds changed, or the scores file is missing)",
                             hint="--overwrite the student to distill it again")
        if cached is not None:
            log.warn(f"the saved teacher scores in {scores_path} do not match this teacher and store; "
                     "scoring again")
        teacher = _load_teacher(teacher_run, device)
        amp = teacher_cfg.amp
        batch = teacher_cfg.batch_size
        for split, idx in (("train", train_idx), ("val", val_idx)):
            if len(idx) == 0:
                scores[split] = None
                continue
            probs, tp, fp, fn, dets, peak = _score_teacher_sharded(teacher, store, idx, device, threshold,
                                                                    pixel_threshold, cfg.radius_px, batch, amp,
                                                                    cfg.workers, log)
            scores[split] = _Scores(np.asarray(idx, np.int64), probs, tp, fp, fn, dets, peak)
        del teacher
    if not decisions:
        for split, sc in scores.items():
            decisions[split] = None if sc is None else decide(
                store.label[sc.indices], sc.probs, threshold, sc.tp, sc.fp, sc.fn, cfg.criterion, cfg.pseudolabel,
                peak_near=sc.peak_near, keep_negatives=cfg.keep_negatives)
        on_main(lambda: _save_scores(scores_path, {"score": score_key, "decision": decision_key}, scores,
                                     decisions))

    def kept(split: str) -> np.ndarray:
        sc, d = scores.get(split), decisions.get(split)
        return sc.indices[d.keep] if sc is not None and d is not None else np.zeros(0, np.int64)

    kept_train, kept_val = kept("train"), kept("val")
    def write_kept() -> None:
        atomic_write(out_dir / "kept_train.npy", lambda f: np.save(f, kept_train))
        atomic_write(out_dir / "kept_val.npy", lambda f: np.save(f, kept_val))

    on_main(write_kept)
    labels = None
    if cfg.pseudolabel:
        labels = store.label.copy()
        for split, sc in scores.items():
            if sc is not None:
                labels[sc.indices] = decisions[split].label
    rows, features = [], []
    removed_train = np.zeros(0, np.int64)
    for split, sc in scores.items():
        if sc is None:
            continue
        d = decisions[split]
        r, f = _removed_rows(store, sc.indices, sc.probs, d, sc.detections, split)
        rows += r
        features += f
        if split == "train":
            removed_train = sc.indices[d.reason != ""]

    by_reason: dict[str, int] = {}
    for r in rows:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    lookalikes, real = _truth_audit(store, removed_train)
    summary = {"teacher": str(teacher_dir), "criterion": cfg.criterion, "pseudolabel": cfg.pseudolabel,
               "keep_negatives": cfg.keep_negatives,
               "threshold": threshold, "pixel_threshold": pixel_threshold, "radius_px": cfg.radius_px,
               "n_train_before": int(len(train_idx)), "n_train_kept": int(len(kept_train)),
               "n_val_before": int(len(val_idx)), "n_val_kept": int(len(kept_val)),
               "removed_by_reason": by_reason, "removed_true_lookalikes": lookalikes,
               "removed_true_mitoses": real, "store_uuid": store.uuid,
               "teacher_checkpoint_sha256": score_key["teacher_checkpoint_sha256"]}
    # Written before training: the review must not depend on the student finishing.
    on_main(lambda: _write_review(out_dir, rows, features, summary))
    log.log(f"distill: kept {len(kept_train)} of {len(train_idx)} training and {len(kept_val)} of "
            f"{len(val_idx)} validation patches; review files in {out_dir}")

    kept_labels = (labels if labels is not None else store.label)[kept_train]
    if len(kept_train) < MIN_KEPT or kept_labels.min(initial=1) == kept_labels.max(initial=0):
        raise InputDataError(
            f"distillation kept {len(kept_train)} of {len(train_idx)} training patches "
            f"({int(kept_labels.sum())} positive): too few to train a student",
            hint=f"the teacher disagrees with almost every annotation (see {out_dir / 'removed.csv'}); check "
                 "the teacher's val F1, try --filter FP or --pseudolabel, or train the teacher longer")

    extra = {"distill": summary, "teacher_config": tconf}
    # A student that never finished an epoch has no checkpoint to resume from: train it afresh.
    student_cfg = dataclasses.replace(student_cfg, resume=trained, overwrite=False)
    result = train_run(student_cfg, reporter, train_indices=kept_train, val_indices=kept_val, labels=labels,
                       extra_config=extra, command="distill", prepared=True)
    return DistillResult(
        run=result.run, teacher=teacher_dir, criterion=cfg.criterion, pseudolabel=cfg.pseudolabel,
        n_train_before=int(len(train_idx)), n_train_kept=int(len(kept_train)), n_val_before=int(len(val_idx)),
        n_val_kept=int(len(kept_val)), removed_by_reason=by_reason, removed_true_lookalikes=lookalikes,
        removed_true_mitoses=real, removed_csv=out_dir / "removed.csv", removed_geojson=out_dir / "geojson",
        student={k: v for k, v in to_dict(result).items() if k != "history"},
        seconds=round(time.monotonic() - t0, 2), reused_scores=reused)
