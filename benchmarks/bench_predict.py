"""Benchmark: `uts predict` throughput and peak memory on synthetic whole slides, against the model alone.

* A small run is trained on the built-in synthetic dataset (``--patch`` px tiles, ResNet-18 up to
  ``--n-blocks`` stages; a few steps: the weights do not change the compute).
* Synthetic pyramidal BigTIFF slides of ``--sizes`` px are written tile by tile from a generator
  (JPEG tiles, a pyramid down to <= 2048 px, 0.25 um/px): near-white glass with a few elliptic
  tissue regions (``--tissue`` share of the area) of rendered H&E.
* predict: ``uts predict SLIDE --run RUN --json`` in a fresh child process; megapixels/s over the
  whole slide and over the tiles actually run, peak RSS (largest process) and peak PSS of the
  process tree (DataLoader workers included), and the time shares of reading (waiting for the
  loader), stain normalization, the model and post-processing (stitching, blobs, exports).
* forward: the same model on the same kind of tiles, already in memory, batch ``--batch-size``:
  the bare forward rate. predict's tile rate over this rate tells whether the pipeline feeds the
  model.
* ``--big N`` adds one N x N slide (e.g. 30000) with ``--big-tissue`` share to check that peak
  memory does not grow with the slide.

``--device cuda`` runs both on a GPU. Run ``python benchmarks/bench_predict.py --help``.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DEFAULT_OUT = _common.BENCH_DIR / "results" / "predict.md"
SLIDE_TILE = 512           # TIFF tile side of the written slides
SLIDE_MPP = 0.25
GLASS = (236, 234, 238)    # colour of empty glass in the written slides


# --------------------------------------------------------------------------------------------
# Data: a run and slides
# --------------------------------------------------------------------------------------------


def train_synthetic_run(workdir: Path, *, patch: int = 128, n_blocks: int = 1, steps: int = 4,
                        seed: int = 0, stain_norm: bool = True, log=_common.log) -> Path:
    """Train a small run on a small copy of the synthetic dataset (reused when present).

    With ``stain_norm`` the run is trained on the normalized store, so predict applies the run's
    stain state to every tile (as a real run would).

    Returns:
        The run folder.
    """
    from uts_cli.api.normalize import normalize
    from uts_cli.api.prepare import prepare
    from uts_cli.api.teach import teach
    from uts_cli.config import NormalizeConfig, PrepareConfig, TeachConfig

    workdir = Path(workdir)
    run = workdir / "runs" / f"syn-p{patch}-b{n_blocks}{'-norm' if stain_norm else ''}"
    if (run / "checkpoints" / "best.pt").is_file():
        return run
    store = workdir / f"synthetic-p{patch}.h5"
    if not store.exists():
        log(f"prepare: synthetic dataset, {patch} px patches")
        prepare(PrepareConfig(dataset="synthetic", root=workdir / "synthetic", output=store, patch_size=patch,
                              compression="lzf", overwrite=True,
                              dataset_options={"seed": seed, "n_cases": 6, "fields_per_case": 2,
                                               "val_cases": 1, "test_cases": 1}))
    if stain_norm:
        norm = store.with_name(store.stem + "-norm.h5")
        if not norm.exists():
            log("normalize: histogram matching + Macenko")
            normalize(NormalizeConfig(store=store, output=norm, device="cpu", overwrite=True))
        store = norm
    log(f"teach: ResNet-18 to layer{n_blocks}, {steps} steps")
    teach(TeachConfig(store=store, name=run.name, runs_dir=run.parent, weights="none", n_blocks=n_blocks,
                      epochs=1, steps_per_epoch=steps, batch_size=8, lr=1e-3, workers=0, device="cpu",
                      overwrite=True))
    return run


def _tissue_tiles(n_rows: int, n_cols: int, share: float, seed: int) -> np.ndarray:
    """Bool (n_rows, n_cols): tiles inside a few ellipses covering about ``share`` of the slide."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n_rows, :n_cols]
    mask = np.zeros((n_rows, n_cols), bool)
    n_blobs = 3
    area = share * n_rows * n_cols / n_blobs
    for _ in range(n_blobs):
        aspect = rng.uniform(0.6, 1.6)
        ry, rx = math.sqrt(area / math.pi * aspect), math.sqrt(area / math.pi / aspect)
        cy, cx = rng.uniform(ry, max(ry + 1, n_rows - ry)), rng.uniform(rx, max(rx + 1, n_cols - rx))
        mask |= ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1
    return mask


def write_synthetic_slide(path: Path, size: int, *, tissue: float = 0.1, seed: int = 0,
                          n_fields: int = 4) -> dict:
    """Write a ``size`` x ``size`` pyramidal BigTIFF tile by tile; the writer never holds the slide.

    Tissue tiles are quadrants of ``n_fields`` rendered 1024 px H&E fields; glass tiles are flat
    near-white with a little noise. Levels halve down to a longer side of at most 2048 px.

    Returns:
        ``{"path", "size", "tissue_tiles", "tiles", "levels", "seconds"}``.
    """
    import tifffile

    t0 = time.perf_counter()
    fields = [_common.render_field(i, 2 * SLIDE_TILE, seed=seed, mitoses_per_mpx=4.0)[0] for i in range(n_fields)]
    rng = np.random.default_rng(seed)
    glass = np.clip(np.asarray(GLASS)[None, None] + rng.normal(0, 2, (SLIDE_TILE, SLIDE_TILE, 3)), 0, 255)
    glass = glass.astype(np.uint8)
    n = math.ceil(size / SLIDE_TILE)
    mask = _tissue_tiles(n, n, tissue, seed)

    def tile0(ty: int, tx: int) -> np.ndarray:
        if not mask[ty, tx]:
            return glass
        f = fields[(ty * 7 + tx * 3) % n_fields]
        qy, qx = (ty % 2) * SLIDE_TILE, (tx % 2) * SLIDE_TILE
        return f[qy:qy + SLIDE_TILE, qx:qx + SLIDE_TILE]

    def level_tiles(k: int):
        step = 2 ** k
        piece = SLIDE_TILE // step
        side = math.ceil(size / step)
        for ly in range(math.ceil(side / SLIDE_TILE)):
            for lx in range(math.ceil(side / SLIDE_TILE)):
                out = np.empty((SLIDE_TILE, SLIDE_TILE, 3), np.uint8)
                out[:] = GLASS
                for dy in range(step):
                    for dx in range(step):
                        ty, tx = ly * step + dy, lx * step + dx
                        if ty < n and tx < n:
                            out[dy * piece:(dy + 1) * piece, dx * piece:(dx + 1) * piece] = tile0(ty, tx)[::step, ::step]
                yield out

    levels = 1
    while math.ceil(size / 2 ** (levels - 1)) > 2048:
        levels += 1
    try:
        import imagecodecs  # noqa: F401

        compression = "jpeg"
    except ImportError:
        compression = "zlib"
    res = 1e4 / SLIDE_MPP
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        for k in range(levels):
            side = math.ceil(size / 2 ** k)
            kwargs = dict(shape=(side, side, 3), dtype=np.uint8, tile=(SLIDE_TILE, SLIDE_TILE), photometric="rgb",
                          compression=compression, resolution=(res / 2 ** k, res / 2 ** k),
                          resolutionunit="CENTIMETER")
            if k == 0:
                tw.write(level_tiles(0), subifds=levels - 1, metadata={"axes": "YXS"}, **kwargs)
            else:
                tw.write(level_tiles(k), subfiletype=1, **kwargs)
    return {"path": str(path), "size": size, "tissue_tiles": int(mask.sum()), "tiles": int(mask.size),
            "levels": levels, "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def measure_predict(slide: Path, run: Path, out: Path, *, device: str, workers: int, batch_size: int) -> dict:
    argv = [sys.executable, "-m", "uts_cli", "-q", "predict", str(slide), "--run", str(run), "-o", str(out),
            "--overwrite", "--json", "--device", device, "--workers", str(workers),
            "--batch-size", str(batch_size)]
    child = _common.run_child(argv)
    doc = child.json_tail()
    s = doc["slides"][0]["summary"]
    t = s["timings"]
    busy = t["read_s"] + t["normalize_s"] + t["model_s"] + t["post_s"]
    tile = doc["tile_size"]
    mpx = s["image_height"] * s["image_width"] / 1e6
    return {
        "size": s["image_height"], "wall_s": round(child.wall_s, 1), "predict_s": s["seconds"],
        "mpx_per_s": round(mpx / s["seconds"], 2),
        "tile_mpx_per_s": round(s["tiles_run"] * tile * tile / 1e6 / s["seconds"], 3),
        "tiles_per_s": round(s["tiles_run"] / s["seconds"], 2),
        "tiles_run": s["tiles_run"], "tiles_total": s["tiles_total"],
        "background_skipped": s["background_skipped"], "detections": s["count"],
        "peak_rss_mb": round(child.maxrss_mb), "peak_tree_pss_mb": round(child.tree_pss_mb),
        "share": {k: round(t[f"{k}_s"] / busy, 3) if busy else None for k in ("read", "normalize", "model", "post")},
        "peak_band_mb": s["peak_band_mb"],
    }


_FORWARD = r"""
import json, sys, time, numpy as np, torch
from uts_cli.model.predict import load_run_model
from uts_cli.model.infer import Geometry, TileDataset, cam_probabilities
from uts_cli.io.images import open_image, tissue_mask
from uts_cli.tileplan import keep_tissue, plan_tiles
from uts_cli.devices import resolve_amp, resolve_device
slide, run, device, bs, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
dev = resolve_device(device)
model, info = load_run_model(run, "best", dev)
p = int(json.load(open(run + "/config.json"))["input_size"])
with open_image(slide) as r:
    low, scale = r.read_lowres()
    h, w, _ = r.shape
plan = keep_tissue(plan_tiles(h, w, p, min(64, p // 4)), tissue_mask(low), scale)
ds = TileDataset(slide, plan, plan.origins(), Geometry())
tiles = torch.stack([ds[i][0] for i in range(min(n, len(ds)))]).to(dev)
policy = resolve_amp("auto", dev)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
def run_all():
    with torch.inference_mode(), policy.autocast():
        for i in range(0, len(tiles), bs):
            x = model.prepare_input(tiles[i:i + bs], channels_last=True)
            cam_probabilities(model, x, p).float().cpu()
    sync()
run_all()
t0 = time.perf_counter(); run_all(); dt = time.perf_counter() - t0
print(json.dumps({"tiles": len(tiles), "seconds": dt, "tiles_per_s": len(tiles) / dt}))
"""


def measure_forward(slide: Path, run: Path, *, device: str, batch_size: int, n_tiles: int) -> dict:
    child = _common.run_child([sys.executable, "-c", _FORWARD, str(slide), str(run), device, str(batch_size),
                               str(n_tiles)])
    d = child.json_tail()
    return {"tiles": d["tiles"], "tiles_per_s": round(d["tiles_per_s"], 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="slide sides in pixels")
    ap.add_argument("--tissue", type=float, default=0.3, help="tissue share of the benchmark slides")
    ap.add_argument("--big", type=int, default=0, help="also an N x N slide for the memory check (e.g. 30000)")
    ap.add_argument("--big-tissue", type=float, default=0.05)
    ap.add_argument("--patch", type=int, default=256, help="run input size (tile side)")
    ap.add_argument("--n-blocks", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--forward-tiles", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None, help="keep data here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    run = train_synthetic_run(work, patch=args.patch, n_blocks=args.n_blocks)
    rows, data = [], {"args": {k: str(v) for k, v in vars(args).items()}, "slides": []}
    sizes = list(args.sizes) + ([args.big] if args.big else [])
    forward = None
    for size in sizes:
        share = args.big_tissue if args.big and size == args.big else args.tissue
        slide = work / f"slide-{size}-t{int(share * 100)}.tif"
        if not slide.exists():
            _common.log(f"writing {size} x {size} slide ({share:.0%} tissue)")
            info = write_synthetic_slide(slide, size, tissue=share)
            _common.log(f"  {info}")
        _common.log(f"predict {slide.name}")
        m = measure_predict(slide, run, work / "out", device=args.device, workers=args.workers,
                            batch_size=args.batch_size)
        if forward is None:
            forward = measure_forward(slide, run, device=args.device, batch_size=args.batch_size,
                                      n_tiles=args.forward_tiles)
        m["feed_ratio"] = round(m["tiles_per_s"] / forward["tiles_per_s"], 3)
        _common.log(f"  {m}")
        data["slides"].append(m)
        rows.append([f"{size} x {size}", f"{m['background_skipped']:.0%}", m["tiles_run"], m["predict_s"],
                     m["mpx_per_s"], m["tile_mpx_per_s"], m["tiles_per_s"], forward["tiles_per_s"],
                     m["feed_ratio"], m["peak_rss_mb"], m["peak_tree_pss_mb"],
                     " / ".join(f"{m['share'][k]:.0%}" for k in ("read", "normalize", "model", "post"))])
    data["forward"] = forward
    data["machine"] = _common.machine_info()
    md = _common.header_block("uts predict: throughput and peak memory", data["machine"])
    md += (f"\nRun: ResNet-18 to layer{args.n_blocks}, {args.patch} px tiles, device {args.device}, "
           f"{args.workers} workers, batch {args.batch_size}.\n\n")
    md += _common.markdown_table(
        ["slide", "background skipped", "tiles run", "predict s", "Mpx/s (slide)", "Mpx/s (tiles)", "tiles/s",
         "bare forward tiles/s", "predict / forward", "peak RSS MB", "peak tree PSS MB",
         "read / normalize / model / post"], rows)
    _common.write_report(args.out, md, data)
    print(md)
    if tmp:
        tmp.cleanup()
    return data


if __name__ == "__main__":
    main()
