"""``predict``: mitosis detections, exports and a clinical summary for new fields and whole slides.

Per input image ``OUT/<slide>/`` holds ``detections.csv``, ``detections.geojson`` (QuPath),
``detections.json`` (grand-challenge "Multiple points"), ``thumbnail.png``, ``heatmap.png``
(with ``--heatmap``) and ``summary.json``; ``OUT/summary.csv`` has one row per slide.

A slide is written into ``OUT/.<slide>.partial/`` and renamed when complete, so a slide folder
that exists is complete (``summary.json`` is written last, inside the temporary folder). A rerun
skips complete slides unless ``overwrite``, and removes partial folders left by a killed run.

Under torchrun, or with ``devices`` (one spawned process per device, see :mod:`uts_cli.launch`),
the slides are split over the processes by size, each slide's folder is written by the process
that owns it, and rank 0 writes ``summary.csv`` from everyone's rows once all are done.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from uts_cli.config import PredictConfig
from uts_cli.errors import InputDataError, ResourceError, UsageError, UtsError, library_errors
from uts_cli.reporting import NullReporter, Reporter

# Pixel sizes closer than this (relative) to the run's are used as they are.
RESAMPLE_TOLERANCE = 0.10
# A mitosis is up to about 12-15 um across; this much overlap keeps one cut by a tile border whole
# in the neighbouring tile.
DEFAULT_OVERLAP_UM = 16.0
SLIDE_FILES = {"csv": "detections.csv", "geojson": "detections.geojson", "midog": "detections.json"}
_GLOB_CHARS = set("*?[")
# How long a rank that has finished its slides waits for the others (see _patient_group).
GATHER_TIMEOUT_S = 7 * 24 * 3600


@dataclass
class SlideResult:
    """Outcome for one input image."""

    name: str
    path: str
    status: str                        # done | skipped | failed
    output: str | None = None
    count: int | None = None
    summary: dict = field(default_factory=dict)
    error: dict | None = None          # {type, message, hint, exit_code} when failed


@dataclass
class PredictResult:
    run: Path
    output: Path
    checkpoint: str
    threshold: float
    tile_size: int
    overlap: int
    run_pixel_size_um: float | None
    device: str
    n_done: int
    n_skipped: int
    n_failed: int
    seconds: float
    slides: list[SlideResult]
    timings: dict = field(default_factory=dict)
    world_size: int = 1                # processes that shared the slides (torchrun or --devices)


def expand_inputs(items: list[str | os.PathLike]) -> list[Path]:
    """Paths from command-line inputs: files, folders (their images, recursively) and globs.

    Globs are expanded here too, so quoted patterns work in scripts. A literal path that does not
    exist is kept (it is reported as a failed slide, and the others are still done).

    Raises:
        UsageError: no input, or a glob that matches nothing.
    """
    from uts_cli.io.images import is_image_file, list_image_files

    out: list[Path] = []
    for item in items:
        text = str(item)
        if any(c in text for c in _GLOB_CHARS) and not Path(text).exists():
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            matches = [p for p in matches if p.is_dir() or is_image_file(p)]
            if not matches:
                raise UsageError(f"no image matches {text!r}", hint="check the pattern; quote it for the shell")
            for m in matches:
                out.extend(list_image_files(m) if m.is_dir() else [m])
        elif Path(text).is_dir():
            found = list_image_files(Path(text))
            if not found:
                raise UsageError(f"folder {text} holds no image (.tif, .tiff, .svs, .png, .jpg)",
                                 hint="pass image files or a folder that contains some")
            out.extend(found)
        else:
            out.append(Path(text))
    if not out:
        raise UsageError("no input image given", hint="pass one or more image files, folders or globs")
    seen, unique = set(), []
    for p in out:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def slide_names(paths: list[Path]) -> list[str]:
    """Output folder name per input: the file stem; stems shared by several inputs get a suffix
    from a hash of the absolute path (deterministic, so reruns find their folders)."""
    # "slide.ome.tif" -> "slide": the OME infix is part of the format, not of the name.
    stems = [p.stem[:-4] if p.stem.lower().endswith(".ome") else p.stem for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    names = []
    for p, s in zip(paths, stems):
        if counts[s] > 1:
            digest = hashlib.sha1(os.path.abspath(p).encode()).hexdigest()[:8]
            s = f"{s}-{digest}"
        names.append(s)
    return names


def default_overlap(tile: int, pixel_size_um: float | None) -> int:
    """Overlap of about 16 um (64 px at 0.25 um/px), at most a quarter of the tile."""
    px = round(DEFAULT_OVERLAP_UM / pixel_size_um) if pixel_size_um else 64
    return int(max(0, min(px, tile // 4)))


def _resolve_pixel_size(reader, cfg: PredictConfig, run_mpp: float | None) -> tuple[float | None, str]:
    if cfg.mpp is not None:
        return float(cfg.mpp), "--mpp"
    if reader.pixel_size_um is not None:
        return float(reader.pixel_size_um), "file"
    if cfg.assume_run_mpp:
        return run_mpp, "run"
    raise InputDataError(f"{reader.path} records no pixel size",
                         hint="pass --mpp MICRONS_PER_PIXEL (e.g. --mpp 0.25), or --assume-run-mpp "
                              "if it was scanned like the run's training images")


def _geometry(reader, mpp: float | None, run_mpp: float | None):
    from uts_cli.model.infer import Geometry, choose_level

    if mpp is None or run_mpp is None:
        return Geometry()
    factor = run_mpp / mpp
    if abs(factor - 1.0) <= RESAMPLE_TOLERANCE:
        return Geometry()
    level, down = choose_level(reader.level_shapes, factor)
    return Geometry(factor=float(factor), level=level, level_downsample=down)


def _settings(cfg: PredictConfig, run: Path, threshold: float, overlap: int) -> dict:
    return {"run": str(Path(run).resolve()), "checkpoint": cfg.checkpoint, "threshold": threshold,
            "overlap": overlap, "tta": cfg.tta, "stain_norm": cfg.stain_norm, "mpp": cfg.mpp,
            "skip_background": cfg.skip_background, "min_area": cfg.min_area}


@dataclass
class _Context:
    cfg: PredictConfig
    model: object
    device: object
    stain_state: object
    tile: int
    overlap: int
    threshold: float
    run_mpp: float | None
    settings: dict
    reporter: Reporter


def _predict_slide(ctx: _Context, path: Path, name: str, folder: Path, index: int, total: int) -> dict:
    """Detect, export and summarise one image into ``folder`` (a temporary folder)."""
    from uts_cli.clinical import clinical_summary
    from uts_cli.io.atomic import atomic_write_json
    from uts_cli.io.export import write_detections_csv, write_detections_geojson, write_multiple_points
    from uts_cli.io.images import open_image, tissue_mask
    from uts_cli.model.infer import TileDataset, infer_tiles, make_tile_loader
    from uts_cli.stitching import BandStitcher, LowresMax
    from uts_cli.thumbnail import render_thumbnail, write_png
    from uts_cli.tileplan import keep_tissue, plan_tiles

    cfg, rep = ctx.cfg, ctx.reporter
    t0 = time.monotonic()
    with open_image(path) as reader:
        height, width, _ = reader.shape
        mpp, mpp_source = _resolve_pixel_size(reader, cfg, ctx.run_mpp)
        geom = _geometry(reader, mpp, ctx.run_mpp)
        lowres, scale = reader.read_lowres()
        levels = list(reader.level_shapes)
    mask = tissue_mask(lowres)
    tissue_px = float(mask.sum()) / (scale * scale)
    work_h = max(1, int(round(height / geom.factor)))
    work_w = max(1, int(round(width / geom.factor)))
    plan = plan_tiles(work_h, work_w, ctx.tile, ctx.overlap)
    if cfg.skip_background:
        plan = keep_tissue(plan, mask, scale * geom.factor)
    tiles = plan.origins()
    heat = LowresMax(lowres.shape[:2], scale * geom.factor) if cfg.heatmap else None
    stitcher = BandStitcher(plan, ctx.threshold, min_area=cfg.min_area,
                            on_band=heat.add if heat is not None else None)
    rep.start(f"[{index}/{total}] {name}", len(tiles))
    dataset = TileDataset(path, plan, tiles, geom)
    loader = make_tile_loader(dataset, cfg.batch_size, cfg.workers if len(tiles) > cfg.batch_size else 0,
                              ctx.device)
    timings = infer_tiles(ctx.model, loader, tiles, stitcher, ctx.device, stain_state=ctx.stain_state,
                          tta=cfg.tta, amp=cfg.amp, progress=lambda n: rep.advance(n))
    rep.finish()
    t_post = time.perf_counter()
    dets = stitcher.detections()
    yx = geom.to_input(dets.yx)
    if len(yx):
        yx[:, 0] = np.clip(yx[:, 0], 0, height - 1)
        yx[:, 1] = np.clip(yx[:, 1], 0, width - 1)
    scores = np.clip(dets.score, 0.0, 1.0)
    tissue_area = tissue_px if mpp is not None else None
    clinical = clinical_summary(yx, (height, width), mpp, tissue_area, hotspot_area_mm2=cfg.hotspot_area_mm2)

    files = {}
    if "csv" in cfg.formats:
        files["csv"] = write_detections_csv(folder / SLIDE_FILES["csv"], yx, scores, mpp).name
    if "geojson" in cfg.formats:
        files["geojson"] = write_detections_geojson(
            folder / SLIDE_FILES["geojson"], yx, scores,
            properties={"slide": name, "source": str(path)}).name
    if "midog" in cfg.formats:
        if mpp is None:
            rep.warn(f"{name}: no pixel size known, so no 'Multiple points' JSON (coordinates are in mm)")
        else:
            files["midog"] = write_multiple_points(folder / SLIDE_FILES["midog"], yx, scores, mpp).name
    files["thumbnail"] = write_png(folder / "thumbnail.png", render_thumbnail(
        lowres, scale, yx=yx, tissue_mask=mask, hotspot=clinical.hotspot)).name
    if heat is not None:
        files["heatmap"] = write_png(folder / "heatmap.png", render_thumbnail(
            lowres, scale, yx=yx, hotspot=clinical.hotspot, heatmap=np.clip(heat.map, 0, 1))).name
    timings.post += time.perf_counter() - t_post
    summary = {
        "slide": name, "path": str(path), "status": "done", "count": int(len(yx)),
        "image_height": int(height), "image_width": int(width), "levels": len(levels),
        "pixel_size_um": mpp, "pixel_size_source": mpp_source,
        "resample_factor": round(geom.factor, 6), "read_level": geom.level,
        "tiles_total": plan.n_tiles, "tiles_run": plan.n_kept,
        "background_skipped": round(plan.skipped_area_fraction(), 4),
        "tissue_area_px": round(tissue_px, 1),
        **{k: v for k, v in clinical.to_dict().items() if k != "count"},
        "seconds": round(time.monotonic() - t0, 2), "timings": timings.to_dict(),
        "peak_band_mb": round(stitcher.peak_band_bytes / 2**20, 2),
        "files": files, "settings": ctx.settings,
    }
    # Written last: a slide folder with summary.json is complete.
    atomic_write_json(folder / "summary.json", summary)
    return summary


def _clean_partial(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)


def _summary_row(summary: dict) -> dict:
    keep = ("slide", "path", "status", "count", "tissue_area_mm2", "density_per_mm2", "hotspot",
            "pixel_size_um", "image_height", "image_width", "tiles_total", "tiles_run",
            "background_skipped", "seconds", "error")
    return {k: summary[k] for k in keep if k in summary}


def _check_options(cfg: PredictConfig) -> None:
    from uts_cli.choices import CHECKPOINT_NAMES
    from uts_cli.io.export import EXPORT_FORMATS

    if cfg.checkpoint not in CHECKPOINT_NAMES:
        raise UsageError(f"unknown checkpoint {cfg.checkpoint!r}", hint=f"use {' or '.join(CHECKPOINT_NAMES)}")
    bad = [f for f in cfg.formats if f not in EXPORT_FORMATS]
    if bad or not cfg.formats:
        raise UsageError(f"unknown export format {', '.join(bad) or '(none)'}",
                         hint=f"use a comma-separated list of {', '.join(EXPORT_FORMATS)}")
    if cfg.mpp is not None and not (0 < cfg.mpp < 100):
        raise UsageError(f"--mpp must be a pixel size in micrometres (got {cfg.mpp})", hint="e.g. --mpp 0.25")
    if cfg.hotspot_area_mm2 <= 0:
        raise UsageError("--hotspot-area must be positive (mm^2)", hint="the default is 2.37")
    if cfg.batch_size < 1 or cfg.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0", hint="fix the option")
    if cfg.min_area < 1:
        raise UsageError(f"min_area must be at least 1 pixel (got {cfg.min_area})",
                         hint="set PredictConfig.min_area to 1 or more")
    if not cfg.inputs:
        raise UsageError("no input image given", hint="pass one or more image files, folders or globs")


@library_errors
def predict(cfg: PredictConfig, reporter: Reporter | None = None) -> PredictResult:
    """Detect mitoses in every input image and write the exports and summaries.

    One image that cannot be read (or lacks a pixel size) is recorded as failed and the others
    are still done; the caller decides the exit status from ``n_failed``.

    Under torchrun (or with ``cfg.devices``, which starts one process per device) the images are
    split over the processes by size; each process writes the folders of its own images, and
    rank 0 writes ``summary.csv`` with every process's rows, in input order. Every process
    returns the same result (its slides, ``n_failed``, ...), for all the images.

    Raises:
        UsageError: bad options, or no inputs.
        InputDataError: the run, its config or its checkpoint is missing or unreadable.
        ResourceError: the device is not available, or a process of the job was lost.
    """
    from uts_cli import distributed

    _check_options(cfg)
    if cfg.devices:
        from uts_cli.launch import plan_devices, run_ranks

        plan = plan_devices(cfg.devices, cfg.device)
        if plan.world_size == 1:
            return predict(dataclasses.replace(cfg, devices=(), device=plan.single_device()), reporter)
        child = dataclasses.replace(cfg, devices=(), device=plan.rank_device_spec)
        return run_ranks(predict, child, plan, reporter or NullReporter(),
                         rerun_hint="rerun the same command: slides already finished are skipped")
    with distributed.session(cfg.device) as (ctx, device):
        with distributed.peer_guard(resume_hint="rerun the same command: slides already finished are skipped"):
            return _predict(cfg, reporter or NullReporter(), ctx, device)


class _RankLines(NullReporter):
    """The reporter of a rank other than 0: its own slides' lines and warnings, named by rank.

    Progress bars stay with rank 0 (several bars on one terminal would collide).
    """

    def __init__(self, reporter: Reporter, rank: int):
        self._reporter, self._prefix = reporter, f"rank {rank}: "

    def log(self, message: str) -> None:
        self._reporter.log(self._prefix + message)

    def warn(self, message: str) -> None:
        self._reporter.warn(self._prefix + message)


def _work_size(path: Path, done_file: Path, overwrite: bool) -> float:
    """How much work ``path`` is, for splitting the slides over ranks: level-0 pixels from the
    header (the file size when the header cannot be read; 0 for a slide that will be skipped)."""
    from uts_cli.io.images import read_header

    if not overwrite and done_file.is_file():
        return 0.0
    try:
        (height, width, _), _ = read_header(path)
        return float(height) * float(width)
    except UtsError:
        try:
            return float(path.stat().st_size)
        except OSError:
            return 0.0


def _patient_group():
    """A gloo group for the final gather, made before the work starts (every rank must join it).

    Ranks that finish early may wait for a whole slide's worth of work on another rank, which
    can exceed the default group's timeout (meant for a silent partner); this group waits much
    longer. A partner that dies is still noticed at once (its sockets close).
    """
    import datetime as dt

    import torch.distributed as dist

    from uts_cli import distributed

    if not distributed.current().enabled:
        return None
    seconds = max(distributed._timeout().total_seconds(), GATHER_TIMEOUT_S)
    with distributed.peer_guard():
        return dist.new_group(backend="gloo", timeout=dt.timedelta(seconds=seconds))


def _gather(obj, group) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    from uts_cli import distributed

    ctx = distributed.current()
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * ctx.world_size
    with distributed.peer_guard():
        dist.all_gather_object(out, obj, group=group)
    return out


def _predict(cfg: PredictConfig, reporter: Reporter, dctx, device) -> PredictResult:
    from uts_cli import distributed
    from uts_cli.config import check_schema_version
    from uts_cli.io.export import write_summary_csv
    from uts_cli.io.rundir import RunDir
    from uts_cli.model.infer import Timings
    from uts_cli.model.predict import load_run_model

    t_start = time.monotonic()
    main_rep = distributed.rank_reporter(reporter)  # job-wide lines: the same on every rank
    slide_rep = reporter if dctx.is_main else _RankLines(reporter, dctx.rank)
    inputs = [Path(p) for p in cfg.inputs]
    group = _patient_group()

    run = RunDir(Path(cfg.run)).open_existing()
    rconf = run.read_config()
    check_schema_version(rconf, run.config_path)
    model, info = load_run_model(run, cfg.checkpoint, device)
    tile = int(rconf.get("input_size") or 0)
    if tile < 8:
        raise InputDataError(f"run {run.path} records no usable input_size ({rconf.get('input_size')!r})",
                             hint="retrain the run with this version of uts")
    run_mpp = rconf.get("pixel_size_um")
    run_mpp = float(run_mpp) if run_mpp else None
    threshold = cfg.threshold
    if threshold is None:
        threshold = float(rconf.get("pixel_threshold", rconf.get("threshold", info["threshold"])))
    overlap = default_overlap(tile, run_mpp) if cfg.overlap is None else int(cfg.overlap)
    if not 0 <= overlap < tile:
        raise UsageError(f"--overlap must be in 0..{tile - 1} pixels for this run's {tile} px tiles "
                         f"(got {overlap})", hint="use --overlap 0 for the store grid of `uts prepare`")
    stain_state = None
    stain = rconf.get("stain") or {}
    if cfg.stain_norm and stain.get("method", "none") != "none" and stain.get("state"):
        from uts_cli.stain import StainState

        stain_state = StainState.from_dict(stain["state"])
    if run_mpp is None:
        main_rep.warn(f"run {run.path} records no training pixel size; images are not resampled")

    out = Path(cfg.output) if cfg.output else run.path / "predictions"
    names = slide_names(inputs)
    total = len(inputs)
    # Every rank computes the same split from the same headers, before anyone writes (on_main
    # below waits for all ranks first), so each slide has exactly one owner.
    mine = list(range(total))
    if dctx.enabled:
        sizes = [_work_size(p, out / n / "summary.json", cfg.overwrite) for p, n in zip(inputs, names)]
        mine = distributed.shard_by_size(sizes, dctx.world_size, dctx.rank)
    distributed.on_main(lambda: out.mkdir(parents=True, exist_ok=True))
    settings = _settings(cfg, run.path, threshold, overlap)
    ctx = _Context(cfg, model, device, stain_state, tile, overlap, threshold, run_mpp, settings, slide_rep)
    done: list[tuple[int, SlideResult, dict]] = []   # (input position, result, summary.csv row)
    total_t = Timings()
    for pos in mine:
        path, name, i = inputs[pos], names[pos], pos + 1
        final = out / name
        partial = out / f".{name}.partial"
        _clean_partial(partial)  # left by a killed run
        done_file = final / "summary.json"
        if done_file.is_file() and not cfg.overwrite:
            import json

            try:
                summary = json.loads(done_file.read_text())
            except (OSError, ValueError):
                summary = None
            if summary is not None:
                if summary.get("settings") != settings:
                    slide_rep.warn(f"{name}: kept from an earlier run with other settings; "
                                   "pass --overwrite to predict it again")
                slide_rep.log(f"[{i}/{total}] {name}: complete already, skipped ({summary.get('count')} detections)")
                summary = {**summary, "status": "skipped"}
                done.append((pos, SlideResult(name, str(path), "skipped", str(final), summary.get("count"), summary),
                             _summary_row(summary)))
                continue
        partial.mkdir(parents=True)
        try:
            summary = _predict_slide(ctx, path, name, partial, i, total)
        except UtsError as exc:
            slide_rep.finish()
            _clean_partial(partial)
            slide_rep.warn(f"[{i}/{total}] {name}: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""))
            err = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}
            done.append((pos, SlideResult(name, str(path), "failed", None, None, {}, err),
                         {"slide": name, "path": str(path), "status": "failed", "error": exc.message}))
            if isinstance(exc, ResourceError):
                raise  # no device or memory: the next slides would fail the same way
            continue
        except MemoryError:
            _clean_partial(partial)
            raise ResourceError(f"out of memory on {path}", hint="lower --batch-size or --workers") from None
        except BaseException:
            slide_rep.finish()
            _clean_partial(partial)
            raise
        if final.exists():
            old = out / f".{name}.old"
            _clean_partial(old)
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, final)
        st = summary["timings"]
        total_t.add(Timings(st["read_s"], st["normalize_s"], st["model_s"], st["post_s"], st["tiles"]))
        slide_rep.log(f"[{i}/{total}] {name}: {summary['count']} detections, "
                      f"{100 * summary['background_skipped']:.0f}% background skipped, {summary['seconds']:.1f}s")
        done.append((pos, SlideResult(name, str(path), "done", str(final), summary["count"], summary),
                     _summary_row(summary)))
        if not dctx.enabled:  # one process: the table grows slide by slide, as a progress record
            write_summary_csv(out / "summary.csv", [row for _, _, row in done])

    # One table for the whole job, in input order, from every rank's slides.
    parts = _gather((done, total_t.to_dict(), str(device), time.monotonic() - t_start), group)
    entries = sorted((e for part in parts for e in part[0]), key=lambda e: e[0])
    slides = [e[1] for e in entries]
    rows = [e[2] for e in entries]
    if dctx.enabled:
        total_t = Timings()
        for _, t, _, _ in parts:
            total_t.add(Timings(t["read_s"], t["normalize_s"], t["model_s"], t["post_s"], t["tiles"]))
    distributed.on_main(lambda: write_summary_csv(out / "summary.csv", rows))
    devices = list(dict.fromkeys(part[2] for part in parts))
    return PredictResult(run=run.path, output=out, checkpoint=cfg.checkpoint, threshold=threshold, tile_size=tile,
                         overlap=overlap, run_pixel_size_um=run_mpp, device=",".join(devices),
                         n_done=sum(s.status == "done" for s in slides),
                         n_skipped=sum(s.status == "skipped" for s in slides),
                         n_failed=sum(s.status == "failed" for s in slides),
                         seconds=round(max(part[3] for part in parts), 2), slides=slides,
                         timings=total_t.to_dict(), world_size=dctx.world_size)


def result_to_dict(result: PredictResult) -> dict:
    """JSON-safe dict of a :class:`PredictResult`."""
    d = asdict(result)
    for k in ("run", "output"):
        d[k] = str(d[k])
    return d


