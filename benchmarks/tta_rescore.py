"""Test-time augmentation of the CAM, re-scored on finished runs (no training).

For each run, the val and test splits of its store are scored three ways: the plain CAM, the mean
of the four flips, and the mean of the eight symmetries of the square (flips and 90-degree turns).
The probability maps are turned back before averaging, at pixel resolution, so no CAM-cell offset
enters. As in training, the pixel threshold is the one with the best region-level F1 on val
(one-to-one, 30 px); the test F1 is read at that threshold, and at the best test threshold as a
ceiling for the threshold choice.

    python benchmarks/tta_rescore.py RUN [RUN ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

MODES = {  # name -> (quarter turns, flipped dims) of each view
    "none": [(0, ())],
    "flip": [(0, ()), (0, (3,)), (0, (2,)), (0, (2, 3))],
    "d8": [(r, d) for r in (0, 1) for d in ((), (3,), (2,), (2, 3))],
}


def averaged_maps(model, store, indices, views):
    """Yield ``(patch indices, mean probability maps)`` batch by batch over ``views``."""
    from uts_cli.data import make_eval_loader

    loader = make_eval_loader(store, indices, 32, 0, torch.device("cpu"))
    with torch.inference_mode():
        for batch in loader:
            x = model.prepare_input(batch.images)
            size = tuple(batch.images.shape[1:3])
            total = 0
            for turns, dims in views:
                xi = torch.rot90(x, turns, (2, 3)) if turns else x
                xi = torch.flip(xi, dims) if dims else xi
                _, cam = model(xi)
                prob = torch.sigmoid(model.upsample(cam.float(), size))
                prob = torch.flip(prob, dims) if dims else prob
                total = total + (torch.rot90(prob, -turns, (2, 3)) if turns else prob)
            yield batch.indices.numpy(), (total / len(views))[:, 0].numpy()


def rescore(run: Path) -> dict:
    from uts_cli.io.rundir import RunDir
    from uts_cli.io.store import PatchStore
    from uts_cli.model.predict import load_run_model
    from uts_cli.model.validate import SWEEP, region_sweep

    rd = RunDir(run)
    store = PatchStore(rd.read_config()["store"]["path"])
    model, _ = load_run_model(rd, "best", "cpu")
    out = {}
    for mode, views in MODES.items():
        val_idx, test_idx = store.indices("val"), store.indices("test")
        val = region_sweep(store, averaged_maps(model, store, val_idx, views), indices=val_idx)
        test = region_sweep(store, averaged_maps(model, store, test_idx, views), indices=test_idx)
        k = int(np.argmin(np.abs(SWEEP - val.threshold)))
        out[mode] = {"val_f1": val.best.f1, "threshold": val.threshold, "test_f1": test.counts[k].f1,
                     "test_f1_best_threshold": max(c.f1 for c in test.counts)}
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {}
    for run in args.runs:
        results[str(run)] = res = rescore(run)
        print(run, json.dumps({m: {k: round(v, 3) for k, v in r.items()} for m, r in res.items()}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
