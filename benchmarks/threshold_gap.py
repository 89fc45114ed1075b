"""How much do study runs lose to their val-chosen pixel threshold and checkpoint?

A run picks its checkpoint and pixel threshold on its own val split (4 cases at the demo
settings). This script sweeps the pixel threshold on the large held-out test set of
``heldout_eval.py`` for each run's best and last checkpoints, and reports the F1 at the run's own
threshold next to the F1 at the threshold that is best on the held-out set itself (an oracle no
run can have). A small gap means a larger val split would not help the choice of threshold.

Nothing is trained; it reads the runs ``heldout_eval.py`` reads.

    python benchmarks/threshold_gap.py --workdir /work/sci/main --seeds 0 1 2 3 4 --tags trim25 \\
        --out benchmarks/results/science-study/threshold-gap-trim25.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from uts_cli.api.demo import heldout_test_store
from uts_cli.devices import resolve_device
from uts_cli.io.store import PatchStore
from uts_cli.model.predict import load_run_model, predict_patches
from uts_cli.model.validate import SWEEP, region_sweep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout_eval import MODELS, finished_runs  # noqa: E402  (a sibling script)
from science import DATASET_FLAGS, _given  # noqa: E402


def sweep_run(run: Path, checkpoint: str, store: PatchStore, device) -> dict:
    """Held-out F1 over the sweep for one checkpoint of a run, and at the run's own threshold."""
    model, _ = load_run_model(run, checkpoint, device)
    indices = store.indices("test")
    maps = ((b.indices, b.cams) for b in predict_patches(model, store, indices, device, want_cam=True,
                                                        cam_dtype=np.float32))
    sweep = region_sweep(store, maps, indices=indices)
    own = float(json.loads((run / "config.json").read_text())["pixel_threshold"])
    k = int(np.argmin(np.abs(np.asarray(sweep.thresholds) - own)))
    return {"own_threshold": own, "f1_own": sweep.counts[k].f1, "best_threshold": sweep.threshold,
            "f1_best": sweep.f1, "curve": sweep.curve()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--tags", nargs="+", required=True)
    parser.add_argument("--models", nargs="+", default=["teacher", "student"], choices=list(MODELS))
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--generator-seed", type=int, default=1000)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    for flag, (_, kind) in DATASET_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help="the study's synthetic look")
    args = parser.parse_args(argv)
    looks = _given(args, DATASET_FLAGS)
    device = resolve_device(args.device)
    t0 = time.monotonic()
    rows = []
    for seed, tag, model, run in finished_runs(args.workdir, args.seeds, args.tags):
        if model not in args.models:
            continue
        train_store = Path(json.loads((run / "config.json").read_text())["config"]["store"])
        store = PatchStore(heldout_test_store(args.workdir / "heldout", train_store, args.cases, args.patch_size,
                                              looks, args.generator_seed, args.device))
        row = {"seed": seed, "tag": tag, "model": model, "run": str(run)}
        for checkpoint in ("best", "last"):
            row[checkpoint] = sweep_run(run, checkpoint, store, device)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "run"}, default=str)[:400], flush=True)

    lines = ["# Held-out F1 at the run's own pixel threshold and at the held-out set's best", "",
             f"Command: `python {' '.join(['benchmarks/threshold_gap.py', *argv])}`  ",
             f"Held-out set: {args.cases} test cases, generator seed {args.generator_seed}, look "
             f"{json.dumps(looks)}; region F1, one-to-one within 30 px; sweep {SWEEP[0]}..{SWEEP[-1]}. "
             f"Time: {time.monotonic() - t0:.0f} s", "",
             "| seed | tag | model | own threshold | F1 (best ckpt, own thr) | best thr on held-out | F1 there | "
             "gap | F1 (last ckpt, own thr) | F1 (last ckpt, best thr) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b, last = r["best"], r["last"]
        lines.append(f"| {r['seed']} | {r['tag']} | {r['model']} | {b['own_threshold']:.2f} | {b['f1_own']:.3f} | "
                     f"{b['best_threshold']:.2f} | {b['f1_best']:.3f} | {b['f1_best'] - b['f1_own']:+.3f} | "
                     f"{last['f1_own']:.3f} | {last['f1_best']:.3f} |")
    lines.append("")
    for model in args.models:
        for tag in args.tags:
            sel = [r for r in rows if r["model"] == model and r["tag"] == tag]
            if len(sel) > 1:
                gaps = [r["best"]["f1_best"] - r["best"]["f1_own"] for r in sel]
                lines.append(f"- {tag} {model}: threshold gap {statistics.mean(gaps):+.3f} ± "
                             f"{statistics.stdev(gaps):.3f} (largest {max(gaps):+.3f}); oracle-threshold F1 "
                             f"{statistics.mean(r['best']['f1_best'] for r in sel):.3f} ± "
                             f"{statistics.stdev(r['best']['f1_best'] for r in sel):.3f} against "
                             f"{statistics.mean(r['best']['f1_own'] for r in sel):.3f} ± "
                             f"{statistics.stdev(r['best']['f1_own'] for r in sel):.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
