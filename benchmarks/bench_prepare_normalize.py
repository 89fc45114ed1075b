"""Benchmark: `uts prepare` and `uts normalize` against the original scripts' approach.

On a synthetic TUPAC16-layout dataset (2000 x 2000 px fields rendered by the built-in H&E
renderer) at two sizes, each of four steps runs in its own fresh process:

  (a) naive prepare: read each TIFF whole, tile it with the original loop (``while x + P < W``,
      which drops the last tile of a side that is an exact multiple of P: 3 x 3 tiles of a
      2000 px field) and write one PNG plus one label CSV per patch;
  (b) ``python -m uts_cli prepare TUPAC16 --root ... -o ...`` (default patch size and compression);
  (c) naive normalize: per PNG patch, read it, ``skimage.exposure.match_histograms`` to the
      reference, then torchstain's ``MacenkoNormalizer(backend="torch")`` (fitted once on the
      reference) ``.normalize()``; patches where Macenko fails pass through; write a PNG;
  (d) ``python -m uts_cli normalize STORE --reference REF --device cpu``.

Throughput is patches per second of each approach on its own patch count (the naive tiling
makes fewer patches). Run ``python benchmarks/bench_prepare_normalize.py --help``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DEFAULT_OUT = _common.BENCH_DIR / "results" / "prepare_normalize.md"
REFERENCE_INDEX = 1000  # a field index outside every generated dataset (and without tissue edge)


# --------------------------------------------------------------------------------------------
# The naive approach (run inside child processes)
# --------------------------------------------------------------------------------------------


def naive_prepare(root: str, out_dir: str, patch_size: int) -> None:
    """Tile every TUPAC16 field the way the original scripts did; print a JSON summary."""
    import imageio.v2 as imageio
    import numpy as np

    t0 = time.perf_counter()
    root, out = Path(root), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_patches = n_images = 0
    p = patch_size
    for tif in sorted(root.glob("mitoses_train_image_data/*/*/*.tif")):
        case, roi = tif.parent.name, tif.stem
        image = imageio.imread(tif)
        csv = root / "mitoses_ground_truth" / case / f"{roi}.csv"
        points = np.loadtxt(csv, delimiter=",", ndmin=2) - 1 if csv.stat().st_size else np.zeros((0, 2))
        height, width = image.shape[:2]
        y = 0
        while y + p < height:  # the original's off-by-one: a last full tile is never taken
            x = 0
            while x + p < width:
                name = f"{case}_{roi}_{y}_{x}"
                imageio.imwrite(out / f"{name}.png", image[y:y + p, x:x + p])
                inside = ((points[:, 0] >= y) & (points[:, 0] < y + p)
                          & (points[:, 1] >= x) & (points[:, 1] < x + p))
                local = points[inside] - (y, x)
                (out / f"{name}.csv").write_text("".join(f"{r:.0f},{c:.0f}\n" for r, c in local))
                n_patches += 1
                x += p
            y += p
        n_images += 1
    print(json.dumps({"n_patches": n_patches, "n_images": n_images,
                      "seconds": time.perf_counter() - t0}))


def naive_normalize(in_dir: str, reference: str, out_dir: str) -> None:
    """Histogram matching + torchstain Macenko, patch by patch; print a JSON summary."""
    import imageio.v2 as imageio
    import numpy as np
    import torch
    import torchstain
    from skimage.exposure import match_histograms

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = imageio.imread(reference)[..., :3]
    normalizer = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    normalizer.fit(torch.from_numpy(ref).permute(2, 0, 1))
    n_patches = n_failed = 0
    for png in sorted(Path(in_dir).glob("*.png")):
        patch = imageio.imread(png)
        matched = np.clip(match_histograms(patch, ref, channel_axis=-1), 0, 255).astype(np.uint8)
        try:
            # torchstain's documented call (stains=True also computes the H and E images).
            norm, _, _ = normalizer.normalize(I=torch.from_numpy(matched).permute(2, 0, 1), stains=True)
            result = norm.numpy().astype(np.uint8)
        except (RuntimeError, IndexError, ValueError):
            result = patch  # background: Macenko has too few tissue pixels
            n_failed += 1
        imageio.imwrite(out / png.name, result)
        n_patches += 1
    print(json.dumps({"n_patches": n_patches, "n_failed": n_failed,
                      "seconds": time.perf_counter() - t0}))


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def make_reference(path: Path, patch_size: int) -> Path:
    """A tissue-rich reference patch (centre of a field outside the datasets), as a PNG."""
    import imageio.v2 as imageio

    if not path.exists():
        side = max(2 * patch_size, 512)
        rgb, _ = _common.render_field(REFERENCE_INDEX, side)
        c = (side - patch_size) // 2
        path.parent.mkdir(parents=True, exist_ok=True)
        imageio.imwrite(path, rgb[c:c + patch_size, c:c + patch_size])
    return path


def _step(name: str, approach: str, child: _common.ChildResult, n_patches: int, work_s: float,
          **extra) -> dict:
    return {"step": name, "approach": approach, "patches": n_patches, "wall_s": child.wall_s,
            "patches_per_s_wall": n_patches / child.wall_s, "work_s": work_s,
            "patches_per_s_work": n_patches / max(work_s, 1e-9), "peak_rss_mb": child.maxrss_mb,
            "tree_pss_mb": child.tree_pss_mb, "argv": child.argv, **extra}


def measure_size(root: Path, work: Path, reference: Path, patch_size: int, log) -> list[dict]:
    """Run the four steps on one dataset; return one record per step."""
    uts = [sys.executable, "-m", "uts_cli"]
    pngs, pngs_norm = work / "naive_patches", work / "naive_normalized"
    raw, norm = work / "uts-raw.h5", work / "uts-norm.h5"
    mod = "import bench_prepare_normalize as b; "
    rows = []

    log("  (a) naive prepare")
    c = _common.python_child(mod + f"b.naive_prepare({str(root)!r}, {str(pngs)!r}, {patch_size})")
    r = c.json_tail()
    rows.append(_step("prepare", "naive", c, r["n_patches"], r["seconds"]))

    log("  (b) uts prepare")
    c = _common.run_child(uts + ["prepare", "TUPAC16", "--root", str(root), "-o", str(raw),
                                 "--patch-size", str(patch_size), "--json"])
    r = c.json_tail()
    rows.append(_step("prepare", "uts", c, r["n_patches"], r["seconds"]))

    log("  (c) naive normalize")
    c = _common.python_child(
        mod + f"b.naive_normalize({str(pngs)!r}, {str(reference)!r}, {str(pngs_norm)!r})")
    r = c.json_tail()
    rows.append(_step("normalize", "naive", c, r["n_patches"], r["seconds"], flagged=r["n_failed"]))

    log("  (d) uts normalize")
    c = _common.run_child(uts + ["normalize", str(raw), "--reference", str(reference), "--device", "cpu",
                                 "-o", str(norm), "--json"])
    r = c.json_tail()
    rows.append(_step("normalize", "uts", c, r["n_patches"], r["seconds"], flagged=r["n_flagged"]))
    for row in rows:
        log(f"    {row['step']:9s} {row['approach']:5s} {row['patches']:5d} patches "
            f"{row['wall_s']:7.1f} s  {row['patches_per_s_work']:6.1f} patches/s  "
            f"{row['peak_rss_mb']:6.0f} MB")
    return rows


def summarise(results: dict[int, list[dict]]) -> tuple[list[list], list[list]]:
    """Table rows: one per (size, step, approach); and speed-ups uts/naive per size and step."""
    table, ratios = [], []
    for size, rows in results.items():
        for r in rows:
            table.append([size, r["step"], r["approach"], r["patches"], r["wall_s"],
                          r["patches_per_s_wall"], r["work_s"], r["patches_per_s_work"],
                          r["peak_rss_mb"], r["tree_pss_mb"]])
        for step in ("prepare", "normalize"):
            naive = next(r for r in rows if r["step"] == step and r["approach"] == "naive")
            uts = next(r for r in rows if r["step"] == step and r["approach"] == "uts")
            ratios.append([size, step, uts["patches_per_s_work"] / naive["patches_per_s_work"],
                           uts["patches_per_s_wall"] / naive["patches_per_s_wall"],
                           uts["peak_rss_mb"] / naive["peak_rss_mb"]])
    return table, ratios


def rss_growth(results: dict[int, list[dict]]) -> list[list]:
    """Peak RSS at the largest size over the smallest, per step and approach."""
    small, large = min(results), max(results)
    rows = []
    for a, b in zip(results[small], results[large]):
        rows.append([a["step"], a["approach"], a["peak_rss_mb"], b["peak_rss_mb"],
                     b["peak_rss_mb"] / a["peak_rss_mb"]])
    return rows


def report(results: dict[int, list[dict]], machine: dict, args, elapsed: float) -> tuple[str, dict]:
    table, ratios = summarise(results)
    sizes = sorted(results)
    md = [_common.header_block("uts prepare / normalize vs the original scripts' approach", machine),
          f"Synthetic TUPAC16-layout datasets of {', '.join(map(str, sizes))} fields of "
          f"{args.field_size} x {args.field_size} px (built-in H&E renderer, uncompressed TIFF), "
          f"patch size {args.patch_size}. Each step ran in its own fresh process. The naive tiling "
          f"(`while x + P < W`) drops the last tile of each side, so it makes fewer patches "
          f"({_naive_tiles(args.field_size, args.patch_size)} per field against "
          f"{_uts_tiles(args.field_size, args.patch_size)}); every throughput is on the approach's "
          f"own patch count. Inputs were just written, so they were read from the page cache.", "",
          "- *wall s*: the whole process (interpreter start and imports included); "
          "*work s*: the work as the process timed it itself (after imports).",
          "- *peak RSS*: `ru_maxrss` of the process (the largest single process of its tree); "
          "*tree PSS*: peak PSS summed over the process tree, sampled every 0.2 s.",
          "- naive normalize: `match_histograms(patch, ref, channel_axis=-1)`, then torchstain "
          "`MacenkoNormalizer(backend=\"torch\")` `.normalize(I, stains=True)` (its documented call) "
          "per patch, one PNG per patch; uts normalize writes an HDF5 store (default lzf compression).", "",
          "## Per step", "",
          _common.markdown_table(["fields", "step", "approach", "patches", "wall s", "patches/s (wall)",
                                  "work s", "patches/s (work)", "peak RSS MB", "tree PSS MB"], table), "",
          "## Speed-up uts / naive", "",
          _common.markdown_table(["fields", "step", "throughput ratio (work)", "throughput ratio (wall)",
                                  "peak RSS ratio"], ratios), "",
          "Targets: prepare >= 3x, normalize >= 5x the naive approach (throughput).", ""]
    if len(sizes) > 1:
        md += [f"## Peak RSS, {sizes[-1]} fields vs {sizes[0]}", "",
               _common.markdown_table(["step", "approach", f"RSS MB ({sizes[0]})", f"RSS MB ({sizes[-1]})",
                                       "ratio"], rss_growth(results)), "",
               "Target: uts peak RSS does not grow with the dataset size (ratio about 1).", ""]
    md.append(f"Total benchmark time: {elapsed:.0f} s.")
    data = {"benchmark": "prepare_normalize", "machine": machine, "command": sys.argv,
            "field_size": args.field_size, "patch_size": args.patch_size, "sizes": sizes,
            "results": {str(k): v for k, v in results.items()}, "seconds": elapsed}
    return "\n".join(md), data


def _naive_tiles(side: int, p: int) -> int:
    n = 0
    while n * p + p < side:
        n += 1
    return n * n


def _uts_tiles(side: int, p: int) -> int:
    return (-(-side // p)) ** 2


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Throughput (patches/s) and peak RSS of `uts prepare` and `uts normalize` against "
                    "the original scripts' approach (PNG per patch; per-patch match_histograms + "
                    "torchstain), on synthetic TUPAC16-layout data at two sizes.",
        epilog="Example: python benchmarks/bench_prepare_normalize.py --sizes 8,32")
    ap.add_argument("--sizes", default="8,32",
                    help="dataset sizes in 2000 px fields, comma separated (default 8,32)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/uts-bench"),
                    help="where data and outputs are written (default /tmp/uts-bench)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="markdown report; JSON written next to it "
                         f"(default {DEFAULT_OUT.relative_to(_common.REPO)})")
    ap.add_argument("--patch-size", type=int, default=500, help="patch side in pixels (default 500)")
    ap.add_argument("--field-size", type=int, default=_common.TUPAC_FIELD,
                    help="field side in pixels (default 2000, as TUPAC16; smaller only for quick checks)")
    ap.add_argument("--keep", action="store_true",
                    help="keep generated datasets (reused by the next run) and all outputs")
    args = ap.parse_args(argv)
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--sizes must be integers separated by commas, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        ap.error("--sizes needs at least one positive size")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    log = _common.log
    t0 = time.perf_counter()
    machine = _common.machine_info()
    data_root = args.workdir / "prepare_normalize" / "data"
    runs = args.workdir / "prepare_normalize" / "runs"
    largest = max(args.sizes)
    log(f"generating data under {data_root}")
    big = _common.make_tupac16(data_root / f"tupac16-f{args.field_size}-n{largest}", largest,
                               field_size=args.field_size, log=log)
    reference = make_reference(data_root / f"reference-p{args.patch_size}.png", args.patch_size)
    results = {}
    try:
        for size in args.sizes:
            root = _common.make_tupac16(data_root / f"tupac16-f{args.field_size}-n{size}", size,
                                        field_size=args.field_size, source=big, log=log)
            log(f"{size} fields")
            out = runs / f"n{size}"
            shutil.rmtree(out, ignore_errors=True)
            results[size] = measure_size(root, out, reference, args.patch_size, log)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir / "prepare_normalize", ignore_errors=True)
    markdown, data = report(results, machine, args, time.perf_counter() - t0)
    json_path = _common.write_report(args.out, markdown, data)
    print(markdown)
    log(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
