"""Benchmark: training throughput of `uts teach` against the model alone, and its peak memory.

* model-only: CamNet (ResNet-18 to layer 3 by default) forward + BCE + backward + Adam step on one
  fixed random batch already in memory, after a warm-up; samples/s over ``--steps`` steps. It runs
  twice (first and last) so that drift of a shared machine shows.
* teach: ``uts_cli.api.teach.train_run`` on a patch store, same model and batch, ``--workers``
  DataLoader workers, 2 epochs of ``--steps`` steps; samples/s of the 2nd epoch from the run's
  history (``samples_per_s`` = training samples / time of the epoch's training loop, validation
  excluded). Stores of ``--sizes`` patches are written through ``uts_cli.io.store`` with crops of
  rendered H&E fields. With ``--ablate-augment`` teach also runs with augmentation off at the
  largest size, which tells the cost of the data loader from that of the (main-process)
  augmentation.

Each measurement runs in its own fresh process; see ``_common.py`` for how peak memory is read.
Run ``python benchmarks/bench_teach.py --help``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DEFAULT_OUT = _common.BENCH_DIR / "results" / "teach.md"
SOURCE_FIELD = 512       # side of the rendered fields the patches are cut from
SOURCE_FIELDS = 8        # how many fields are rendered
MITOSES_PER_MPX = 16.0   # about 4 mitoses per 512 px field: ~25% positive 128 px crops
VAL_PATCHES = 32         # a token validation split (validation is not timed)
PATCHES_PER_IMAGE = 500  # store rows per pseudo source image


# --------------------------------------------------------------------------------------------
# Test stores
# --------------------------------------------------------------------------------------------


def _crops(rng: np.random.Generator, fields: list, n: int, p: int):
    """``n`` random crops (with random flips/transposes) of the fields, and their mitoses."""
    from uts_cli.io import store

    rgb = np.empty((n, p, p, 3), np.uint8)
    origin = rng.integers(0, SOURCE_FIELD - p + 1, size=(n, 2))
    which = rng.integers(len(fields), size=n)
    flips = rng.integers(0, 8, size=n)
    pidx, yx = [], []
    for j in range(n):
        image, points = fields[which[j]]
        y0, x0 = origin[j]
        crop = image[y0:y0 + p, x0:x0 + p]
        local = points - (y0, x0)
        local = local[((local >= 0) & (local <= p - 1)).all(axis=1)]
        if flips[j] & 1:
            crop, local = crop[:, ::-1], local * (1, -1) + (0, p - 1)
        if flips[j] & 2:
            crop, local = crop[::-1], local * (-1, 1) + (p - 1, 0)
        if flips[j] & 4:
            crop, local = crop.transpose(1, 0, 2), local[:, ::-1]
        rgb[j] = crop
        pidx += [j] * len(local)
        yx += local.tolist()
    pidx = np.array(pidx, np.int64)
    n_points = np.bincount(pidx, minlength=n).astype(np.uint16)
    return store.PatchRows(rgb=rgb, origin=origin.astype(np.int32), label=(n_points > 0).astype(np.uint8),
                           n_points=n_points, n_hard=np.zeros(n, np.uint16), tissue=np.ones(n, np.float32),
                           points=(pidx, np.array(yx, np.float32).reshape(-1, 2), np.zeros(len(pidx), np.uint8)))


def build_store(path: Path, n_patches: int, patch_size: int, seed: int = 0) -> Path:
    """Write (or reuse) a complete lzf store (the product default) of ``n_patches`` realistic patches.

    The last ``VAL_PATCHES`` patches form the val split, the rest train.
    """
    from uts_cli.io import store

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    fields = [_common.render_field(i, SOURCE_FIELD, seed, mitoses_per_mpx=MITOSES_PER_MPX)
              for i in range(SOURCE_FIELDS)]
    n_train = max(1, n_patches - VAL_PATCHES)
    blocks = [("train", min(PATCHES_PER_IMAGE, n_train - s)) for s in range(0, n_train, PATCHES_PER_IMAGE)]
    blocks.append(("val", VAL_PATCHES))
    rows = [{"id": f"bench/{i:04d}", "case_id": f"bench{i:04d}", "path": "synthetic",
             "shape": (SOURCE_FIELD, SOURCE_FIELD, 3), "split": split, "pixel_size_um": 0.25}
            for i, (split, _) in enumerate(blocks)]
    cfg = {"dataset": "bench", "n_patches": n_patches, "patch_size": patch_size, "seed": seed}
    f = store.create_partial(path, attrs={"config_json": json.dumps(cfg), "config_hash": store.config_hash(cfg),
                                          "dataset": "bench"},
                             patch_size=patch_size, compression="lzf", has_truth=False)
    try:
        store.write_images_table(f, rows)
        for i, (_, count) in enumerate(blocks):
            store.append_image(f, i, _crops(rng, fields, count, patch_size), sha256="0" * 64)
        store.finalize(f, path)
    finally:
        if f.id.valid:
            f.close()
    return path


# --------------------------------------------------------------------------------------------
# The measured children
# --------------------------------------------------------------------------------------------


def model_only(arch: str, n_blocks: int, batch_size: int, patch_size: int, steps: int, warmup: int,
               device: str = "cpu", width: int = 64, channels_last: bool = True) -> None:
    """Train steps on one fixed batch already on the device; print samples/s as JSON.

    It uses what ``fit`` uses (the same AMP policy and memory format), so the ratio compares like
    with like.
    """
    import torch
    import torch.nn.functional as F

    from uts_cli.devices import configure_cpu_threads, resolve_amp, resolve_device
    from uts_cli.model.cam import CamNet

    dev = resolve_device(device)
    threads = configure_cpu_threads() if dev.type == "cpu" else torch.get_num_threads()
    amp = resolve_amp("auto", dev)
    torch.manual_seed(0)
    model = CamNet(arch=arch, n_blocks=n_blocks, width=width).to(dev).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(enabled=amp.needs_scaler)
    pixels = torch.randint(0, 256, (batch_size, patch_size, patch_size, 3), dtype=torch.uint8, device=dev)
    x = model.prepare_input(pixels, channels_last=channels_last)
    y = (torch.arange(batch_size, device=dev) % 2).float()

    def step() -> None:
        with amp.autocast():
            logits, _ = model(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    print(json.dumps({"samples_per_s": steps * batch_size / seconds, "seconds": seconds,
                      "steps": steps, "threads": threads}))


def teach(store: str, runs_dir: str, arch: str, n_blocks: int, batch_size: int, steps: int,
          workers: int, augment: bool, device: str = "cpu", width: int = 64, channels_last: bool = True) -> None:
    """Two epochs of ``train_run``; print the 2nd epoch's training throughput as JSON."""
    import torch

    from uts_cli.api.teach import train_run
    from uts_cli.config import TeachConfig

    cfg = TeachConfig(store=Path(store), name="bench", runs_dir=Path(runs_dir), arch=arch, n_blocks=n_blocks,
                      width=width, weights="none", epochs=2, batch_size=batch_size, steps_per_epoch=steps,
                      workers=workers, device=device, augment=augment, overwrite=True, channels_last=channels_last)
    result = train_run(cfg)
    last = result.history[-1]
    print(json.dumps({"samples_per_s": float(last["samples_per_s"]),
                      "train_seconds": float(last["train_seconds"]),
                      "n_train_samples": int(last["n_train_samples"]), "n_train": result.n_train,
                      "n_val": result.n_val, "threads": torch.get_num_threads(),
                      "epoch_seconds": [float(r["seconds"]) for r in result.history]}))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_model_only(args) -> dict:
    c = _common.python_child(
        f"import bench_teach as b; b.model_only({args.arch!r}, {args.n_blocks}, {args.batch_size}, "
        f"{args.patch_size}, {args.steps}, {args.warmup}, {args.device!r}, {args.width}, "
        f"{args.channels_last == 'on'})")
    return {**c.json_tail(), "wall_s": c.wall_s, "peak_rss_mb": c.maxrss_mb, "tree_pss_mb": c.tree_pss_mb}


def run_teach(args, store: Path, runs_dir: Path, augment: bool = True) -> dict:
    c = _common.python_child(
        f"import bench_teach as b; b.teach({str(store)!r}, {str(runs_dir)!r}, {args.arch!r}, {args.n_blocks}, "
        f"{args.batch_size}, {args.steps}, {args.workers}, {augment}, {args.device!r}, {args.width}, "
        f"{args.channels_last == 'on'})")
    return {**c.json_tail(), "wall_s": c.wall_s, "peak_rss_mb": c.maxrss_mb, "tree_pss_mb": c.tree_pss_mb}


def report(runs: list[dict], args, machine: dict, elapsed: float) -> tuple[str, dict]:
    model = [r for r in runs if r["run"] == "model-only"]
    reference = sum(r["samples_per_s"] for r in model) / len(model)
    table = [[r["run"], r.get("store_patches"), r.get("augment"), r["samples_per_s"],
              r["samples_per_s"] / reference, r["peak_rss_mb"], r["tree_pss_mb"], r["wall_s"]]
             for r in runs]
    teach_runs = [r for r in runs if r["run"] == "teach" and r["augment"]]
    md = [_common.header_block("uts teach: training throughput and peak memory", machine),
          f"Model {args.arch} to layer {args.n_blocks}, width {args.width}, + CAM head, batch {args.batch_size} of "
          f"{args.patch_size} px patches, CPU (float32), channels-last {args.channels_last}, "
          f"{args.workers} DataLoader worker(s). "
          f"model-only: {args.steps} steps after {args.warmup} warm-up steps on one fixed in-memory batch "
          f"(no data loading, no augmentation). teach: `train_run`, ImageNet weights off, 2 epochs of "
          f"{args.steps} steps, samples/s of epoch 2 from `history.csv` (training loop only; validation on "
          f"{VAL_PATCHES} patches not timed). Stores: lzf (the default), crops of {SOURCE_FIELDS} rendered "
          f"{SOURCE_FIELD} px H&E fields, about a quarter positive.", "",
          "- *ratio*: samples/s over the mean of the model-only runs "
          f"({reference:.1f} samples/s).",
          "- *peak RSS*: `ru_maxrss` of the process (largest single process: the main one or a "
          "worker); *tree PSS*: peak PSS summed over the process and its DataLoader workers, "
          "sampled every 0.2 s.", "",
          _common.markdown_table(["run", "store patches", "augment", "samples/s", "ratio", "peak RSS MB",
                                  "tree PSS MB", "wall s"], table), "",
          "Target: teach >= 0.9 x model-only; peak RSS about the same at both store sizes.", ""]
    if len(teach_runs) > 1:
        small, large = teach_runs[0], teach_runs[-1]
        md += [f"Peak RSS {large['store_patches']} vs {small['store_patches']} patches: "
               f"{large['peak_rss_mb']:.0f} / {small['peak_rss_mb']:.0f} MB = "
               f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}; tree PSS "
               f"{large['tree_pss_mb']:.0f} / {small['tree_pss_mb']:.0f} MB = "
               f"{large['tree_pss_mb'] / max(small['tree_pss_mb'], 1e-9):.2f}.", ""]
    md.append(f"Total benchmark time: {elapsed:.0f} s.")
    data = {"benchmark": "teach", "machine": machine, "command": sys.argv, "arch": args.arch,
            "n_blocks": args.n_blocks, "width": args.width, "channels_last": args.channels_last, "batch_size": args.batch_size, "patch_size": args.patch_size,
            "steps": args.steps, "workers": args.workers, "model_only_samples_per_s": reference,
            "runs": runs, "seconds": elapsed}
    return "\n".join(md), data


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Training throughput (samples/s) of `uts teach` against the model-only "
                    "forward/backward/step rate on the same batch, and teach's peak RSS at two store sizes.",
        epilog="Example: python benchmarks/bench_teach.py --sizes 2000,20000 --workers 1")
    ap.add_argument("--sizes", default="2000,20000",
                    help="store sizes in patches, comma separated (default 2000,20000)")
    ap.add_argument("--patch-size", type=int, default=128, help="patch side in pixels (default 128)")
    ap.add_argument("--batch-size", type=int, default=16, help="training batch size (default 16)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per measurement (default 60)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed model-only steps first (default 5)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of teach (default 1)")
    ap.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (model-only then uses the same AMP as fit)")
    ap.add_argument("--n-blocks", type=int, default=3, help="ResNet stages kept (default 3)")
    ap.add_argument("--width", type=int, default=64, help="channels of the first stage (default 64, ResNet's)")
    ap.add_argument("--channels-last", choices=("on", "off"), default="on",
                    help="NHWC memory format for both measurements (on: what uts teach does by default)")
    ap.add_argument("--ablate-augment", action="store_true",
                    help="also run teach with augmentation off at the largest size")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/uts-bench"),
                    help="where stores and runs are written (default /tmp/uts-bench)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="markdown report; JSON written next to it "
                         f"(default {DEFAULT_OUT.relative_to(_common.REPO)})")
    ap.add_argument("--keep", action="store_true", help="keep the stores (reused by the next run) and runs")
    args = ap.parse_args(argv)
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--sizes must be integers separated by commas, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) <= VAL_PATCHES + args.batch_size:
        ap.error(f"every size must exceed {VAL_PATCHES + args.batch_size} patches")
    if args.steps < 1 or args.batch_size < 2 or args.workers < 0:
        ap.error("need --steps >= 1, --batch-size >= 2 and --workers >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    log = _common.log
    t0 = time.perf_counter()
    machine = _common.machine_info()
    base = args.workdir / "teach"
    base.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    try:
        stores = {}
        for size in args.sizes:
            t = time.perf_counter()
            stores[size] = build_store(base / f"store-n{size}-p{args.patch_size}.h5", size, args.patch_size)
            log(f"store of {size} patches ready ({time.perf_counter() - t:.0f} s)")
        runs_dir = Path(tempfile.mkdtemp(prefix="runs-", dir=base))
        plan = [("model-only", None, True)] + [("teach", s, True) for s in args.sizes]
        if args.ablate_augment:
            plan.append(("teach", args.sizes[-1], False))
        plan.append(("model-only", None, True))
        for kind, size, augment in plan:
            log(f"{kind}" + (f" on {size} patches, augment {augment}" if size else ""))
            if kind == "model-only":
                r = run_model_only(args)
            else:
                r = run_teach(args, stores[size], runs_dir, augment)
            runs.append({"run": kind, "store_patches": size, "augment": augment if size else None, **r})
            log(f"  {r['samples_per_s']:.1f} samples/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                f"tree PSS {r['tree_pss_mb']:.0f} MB, {r['wall_s']:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    markdown, data = report(runs, args, machine, time.perf_counter() - t0)
    json_path = _common.write_report(args.out, markdown, data)
    print(markdown)
    log(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
