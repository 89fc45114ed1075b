"""The GPU check: does the engine keep one GPU busy? (run through ``benchmarks/gpu_check.sh``)

Prints, for the default model (ResNet-18 to layer 3 + CAM head) at 500 px, bf16 autocast and
channels-last:

* the device, and the model's FLOPs per patch (forward; training step = forward + backward),
  counted with ``torch.utils.flop_counter`` for the model in use;
* teach: samples/s of ``train_run`` (epoch 2, training loop only) beside the model-only rate
  (forward + BCE + backward + Adam step on one batch already on the GPU), and the loader alone;
* predict: ``uts predict`` tiles/s and megapixels/s beside the bare forward rate, through
  ``benchmarks/bench_predict.py`` (skipped with a message when ``uts predict`` is absent);
* normalize: ``uts normalize`` patches/s on the GPU;
* for each rate, the fraction of the device's dense bf16 peak it reaches.

``--smoke`` runs everything tiny on the CPU (a minute or so) so that the script is known to
work before a GPU session spends its time on it. The figures of a smoke run mean nothing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched
# against torch.cuda.get_device_name(); --peak-tflops overrides.
BF16_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "H100": 756.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A10G": 70.0, "A10": 125.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "V100": 125.0,
}


def log(msg: str) -> None:
    print(msg, flush=True)


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):  # most specific name first
        if key.lower() in name.lower():
            return BF16_PEAK_TFLOPS[key]
    return None


def describe_device(dev) -> dict:
    import torch

    info = {"device": str(dev), "torch": torch.__version__, "cuda": torch.version.cuda}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(name="CPU", threads=torch.get_num_threads())
    return info


def count_flops(arch: str, n_blocks: int, patch: int) -> tuple[float, float]:
    """GFLOP of one patch: forward, and forward + backward (a training step without the optimizer)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from uts_cli.model.cam import CamNet

    model = CamNet(arch=arch, n_blocks=n_blocks).to("meta")
    x = torch.zeros(1, 3, patch, patch, device="meta")
    with FlopCounterMode(display=False) as fwd:
        model(x)
    with FlopCounterMode(display=False) as step:
        logits, _ = model(x)
        F.binary_cross_entropy_with_logits(logits.float(), torch.zeros(1, device="meta")).backward()
    return fwd.get_total_flops() / 1e9, step.get_total_flops() / 1e9


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def model_only_train(dev, arch, n_blocks, batch, patch, steps, warmup) -> float:
    """Samples/s of train steps on one batch already on the device (what fit runs, minus the data)."""
    import torch
    import torch.nn.functional as F

    from uts_cli.devices import resolve_amp
    from uts_cli.model.cam import CamNet

    torch.manual_seed(0)
    amp = resolve_amp("auto", dev)
    cl = dev.type == "cuda"
    model = CamNet(arch=arch, n_blocks=n_blocks).to(dev).train()
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    pixels = torch.randint(0, 256, (batch, patch, patch, 3), dtype=torch.uint8, device=dev)
    x = model.prepare_input(pixels, channels_last=cl)
    y = (torch.arange(batch, device=dev) % 2).float()

    def step():
        with amp.autocast():
            logits, _ = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    return steps * batch / (time.perf_counter() - t0)


def bare_forward(dev, arch, n_blocks, batch, patch, steps, warmup) -> float:
    """Patches/s of inference forwards (logits and CAM) on one batch already on the device."""
    import torch

    from uts_cli.devices import resolve_amp
    from uts_cli.model.cam import CamNet

    amp = resolve_amp("auto", dev)
    cl = dev.type == "cuda"
    model = CamNet(arch=arch, n_blocks=n_blocks).to(dev).eval()
    if cl:
        model = model.to(memory_format=torch.channels_last)
    pixels = torch.randint(0, 256, (batch, patch, patch, 3), dtype=torch.uint8, device=dev)
    with torch.inference_mode():
        x = model.prepare_input(pixels, channels_last=cl)
        for i in range(warmup + steps):
            if i == warmup:
                _sync(dev)
                t0 = time.perf_counter()
            with amp.autocast():
                model(x)
        _sync(dev)
    return steps * batch / (time.perf_counter() - t0)


def loader_alone(store: Path, dev, batch, steps, workers) -> float:
    """Samples/s of the training loader: uint8 batches read, pinned and copied to the device."""
    from uts_cli.data import batch_to_device, make_train_loader
    from uts_cli.io.store import PatchStore

    s = PatchStore(store)
    loader = make_train_loader(s, s.indices("train"), batch, 0, workers, dev,
                               epoch_len=(steps + 2) * batch)
    loader.batch_sampler.set_epoch(1)
    n, t0 = 0, None
    for i, b in enumerate(loader):
        b = batch_to_device(b, dev)
        if i == 1:  # after the workers' start-up
            _sync(dev)
            t0, n = time.perf_counter(), 0
        elif i > 1:
            n += len(b.labels)
    _sync(dev)
    return n / (time.perf_counter() - t0)


def teach_rate(store: Path, runs: Path, dev, arch, n_blocks, batch, steps, workers) -> dict:
    from uts_cli.api.teach import train_run
    from uts_cli.config import TeachConfig

    cfg = TeachConfig(store=store, name="gpu-check", runs_dir=runs, arch=arch, n_blocks=n_blocks, weights="none",
                      epochs=2, batch_size=batch, steps_per_epoch=steps, workers=workers, device=str(dev.type),
                      overwrite=True)
    result = train_run(cfg)
    last = result.history[-1]
    return {"samples_per_s": float(last["samples_per_s"]), "epoch_seconds": [r["seconds"] for r in result.history]}


def normalize_rate(store: Path, out: Path, dev, batch) -> dict:
    from uts_cli.api.normalize import normalize
    from uts_cli.config import NormalizeConfig

    import tifffile

    # The bench store's patches are random crops, not a tiling of fields: give the stain
    # reference as an image (a rendered field) instead of letting normalize stitch one.
    reference = out.with_name("reference.tif")
    tifffile.imwrite(reference, _common.render_field(0, 1024, seed=1)[0])
    r = normalize(NormalizeConfig(store=store, output=out, reference=reference, device=str(dev.type),
                                  batch_size=batch, compression="none", overwrite=True))
    return {"patches_per_s": r.patches_per_second, "n_patches": r.n_patches, "flagged": r.n_flagged}


def predict_rates(args, workdir: Path) -> dict | None:
    """``bench_predict`` on one synthetic slide, or None (with a message) when predict is absent."""
    import importlib.util

    bench = Path(__file__).resolve().parent / "bench_predict.py"
    if importlib.util.find_spec("uts_cli.api.predict") is None or not bench.is_file():
        log("predict: skipped (`uts predict` is not in this revision)")
        return None
    import bench_predict

    argv = ["--device", args.device, "--sizes", str(args.slide), "--patch", str(args.patch),
            "--n-blocks", str(args.n_blocks), "--batch-size", str(args.predict_batch), "--workers",
            str(args.workers), "--forward-tiles", str(args.forward_tiles), "--workdir", str(workdir / "predict"),
            "--out", str(workdir / "predict.md")]
    data = bench_predict.main(argv)
    slide = data["slides"][0]
    return {"tiles_per_s": slide["tiles_per_s"], "mpx_per_s": slide["mpx_per_s"],
            "forward_tiles_per_s": data["forward"]["tiles_per_s"], "feed_ratio": slide.get("feed_ratio")}


def fraction(rate: float | None, gflop: float, peak: float | None) -> str:
    if rate is None or peak is None:
        return "n/a"
    return f"{rate * gflop / 1e3 / peak:.3f}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="GPU throughput check of teach, predict and normalize.")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script, not the GPU")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--patch", type=int, default=500, help="patch side in pixels (default 500)")
    ap.add_argument("--batch-size", type=int, default=64, help="training batch (default 64)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per measurement (default 40)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers (default 8)")
    ap.add_argument("--store-patches", type=int, default=1024, help="patches in the test store (default 1024)")
    ap.add_argument("--slide", type=int, default=8192, help="side of the predict test slide (default 8192)")
    ap.add_argument("--predict-batch", type=int, default=64, help="predict tiles per batch (default 64)")
    ap.add_argument("--forward-tiles", type=int, default=256, help="tiles of the bare forward rate (default 256)")
    ap.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50"))
    ap.add_argument("--n-blocks", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device, TFLOP/s")
    ap.add_argument("--no-predict", action="store_true", help="skip the predict part")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.patch, args.batch_size, args.steps, args.warmup = "cpu", 96, 4, 2, 1
        args.workers, args.store_patches, args.slide, args.predict_batch, args.forward_tiles = 0, 128, 1024, 4, 8
        args.no_predict = True
    return args


def main(argv=None) -> int:
    import torch

    from uts_cli.devices import resolve_device

    args = parse_args(argv)
    t_start = time.perf_counter()
    dev = resolve_device(args.device)
    info = describe_device(dev)
    peak = peak_tflops(info["name"], args.peak_tflops) if dev.type == "cuda" else None
    log(f"device: {info}")
    log(f"bf16 dense peak: {peak if peak else 'unknown (pass --peak-tflops)'} TFLOP/s")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fwd_gflop, step_gflop = count_flops(args.arch, args.n_blocks, args.patch)
    log(f"model {args.arch}/{args.n_blocks} blocks at {args.patch} px: {fwd_gflop:.1f} GFLOP forward, "
        f"{step_gflop:.1f} GFLOP per training step (forward + backward) per patch")

    work = Path(tempfile.mkdtemp(prefix="uts-gpu-check-"))
    figures: dict = {"device": info, "peak_tflops": peak, "forward_gflop": fwd_gflop, "step_gflop": step_gflop,
                     "args": vars(args) | {"out": str(args.out)}}
    try:
        import bench_teach

        common = (dev, args.arch, args.n_blocks)
        figures["model_only"] = model_only_train(*common, args.batch_size, args.patch, args.steps, args.warmup)
        log(f"model-only training: {figures['model_only']:.0f} samples/s")
        figures["forward"] = bare_forward(*common, args.batch_size, args.patch, args.steps, args.warmup)
        log(f"bare forward: {figures['forward']:.0f} patches/s")

        t = time.perf_counter()
        store = bench_teach.build_store(work / "store.h5", args.store_patches, args.patch)
        log(f"test store of {args.store_patches} patches written in {time.perf_counter() - t:.0f} s")
        figures["loader"] = loader_alone(store, dev, args.batch_size, args.steps, args.workers)
        log(f"loader alone ({args.workers} workers, to the device): {figures['loader']:.0f} samples/s")
        figures["teach"] = teach_rate(store, work / "runs", *common, args.batch_size, args.steps, args.workers)
        log(f"teach: {figures['teach']['samples_per_s']:.0f} samples/s")
        figures["model_only_last"] = model_only_train(*common, args.batch_size, args.patch, args.steps,
                                                      args.warmup)
        log(f"model-only training (again): {figures['model_only_last']:.0f} samples/s")
        figures["normalize"] = normalize_rate(store, work / "norm.h5", dev, args.batch_size)
        log(f"normalize: {figures['normalize']['patches_per_s']:.0f} patches/s")
        if args.no_predict:
            log("predict: skipped (--no-predict or --smoke)")
        else:
            try:
                figures["predict"] = predict_rates(args, work)
            except Exception as exc:  # the other figures stay useful
                log(f"predict: FAILED ({type(exc).__name__}: {exc})")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    model_ref = (figures["model_only"] + figures["model_only_last"]) / 2
    teach = figures["teach"]["samples_per_s"]
    rows = [["teach (samples/s)", teach, model_ref, teach / model_ref, fraction(teach, step_gflop, peak)],
            ["model-only training (samples/s)", model_ref, "", "", fraction(model_ref, step_gflop, peak)],
            ["loader alone (samples/s)", figures["loader"], model_ref, figures["loader"] / model_ref, ""],
            ["bare forward (patches/s)", figures["forward"], "", "", fraction(figures["forward"], fwd_gflop, peak)]]
    pred = figures.get("predict")
    if pred:
        tile_gflop = fwd_gflop  # predict's tiles are --patch px, the run's input size
        rows.append(["predict (tiles/s)", pred["tiles_per_s"], pred["forward_tiles_per_s"],
                     pred["tiles_per_s"] / pred["forward_tiles_per_s"], fraction(pred["tiles_per_s"], tile_gflop, peak)])
        rows.append(["predict (megapixels/s of slide)", pred["mpx_per_s"], "", "", ""])
    rows.append(["normalize (patches/s)", figures["normalize"]["patches_per_s"], "", "", ""])
    log("")
    log(_common.markdown_table(["what", "rate", "reference rate", "ratio", "of bf16 peak"], rows))
    log("")
    log("targets: teach >= 0.9 x model-only; predict >= 0.8 x bare forward")
    figures["seconds"] = time.perf_counter() - t_start
    log(f"gpu_check: {figures['seconds']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
