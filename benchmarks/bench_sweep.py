"""Benchmark: the validation's region-level threshold sweep, one pass against a labelling per threshold.

Every epoch `uts teach` scores the val split's CAM maps at the 25 thresholds of
``uts_cli.model.validate.SWEEP``. This script measures that step alone, on the maps a real
(briefly trained) teacher produces, in both ways the code can take:

* ``whole``: each field stitched once and scored at every threshold in one pass
  (``localize.detections_at_thresholds``; what fields up to ``WHOLE_FIELD_PIXELS`` get);
* ``banded``: eval's banded stitcher once per threshold (what larger fields get, and what every
  field got before 2026-12-03), forced by setting ``WHOLE_FIELD_PIXELS`` to 0.

and, for comparison, ``whole, unsqueezed``: the one pass with each level labelled on the full
field, as before 2026-12-04 (the bench swaps the squeezed labelling for a plain one).

All ways must give the same counts at every threshold; the script checks that and stops otherwise.
Setup (not timed): by default a synthetic dataset of 48 cases (128 px patches, 8 val cases = 32
fields, 512 val patches) and a width-32 teacher trained for ``--epochs`` x 60 steps, whose maps are
still blurred over most of the field. ``--run`` takes the maps of a finished run instead (its own
store's val split), which shows the sweep on a trained teacher's mostly empty maps.

    python benchmarks/bench_sweep.py --out benchmarks/results/sweep.md
    python benchmarks/bench_sweep.py --run WORKDIR/runs/teacher --out benchmarks/results/sweep-trained.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def short_teacher(workdir: Path, epochs: int, seed: int) -> Path:
    """Prepare a 48-case store, train a short teacher on it and return the run folder."""
    from uts_cli.api.prepare import prepare
    from uts_cli.api.teach import teach
    from uts_cli.config import PrepareConfig, TeachConfig

    store_path = workdir / "syn.h5"
    prepare(PrepareConfig(dataset="synthetic", root=workdir / "raw", output=store_path, patch_size=128,
                          dataset_options={"seed": seed, "n_cases": 48, "val_cases": 8, "test_cases": 8}))
    teach(TeachConfig(store=store_path, name="t", runs_dir=workdir / "runs", width=32, weights="none",
                      epochs=epochs, steps_per_epoch=60, batch_size=32, lr=1e-3, seed=seed, device="cpu"))
    return workdir / "runs" / "t"


def val_maps(run: Path):
    """``(store, val indices, [(indices, maps), ...])``: the CAM maps of a run's best checkpoint on
    the val split of the store it trained on."""
    import torch

    from uts_cli.data import make_eval_loader
    from uts_cli.io.rundir import RunDir
    from uts_cli.io.store import PatchStore
    from uts_cli.model.predict import iter_predictions, load_run_model

    store = PatchStore(Path(RunDir(run).read_config()["config"]["store"]))
    model, _ = load_run_model(run)
    val = store.indices("val")
    loader = make_eval_loader(store, val, 32, 0, torch.device("cpu"))
    batches = [(p.indices, p.cams) for p in iter_predictions(model, loader, torch.device("cpu"), want_cam=True,
                                                              cam_dtype=np.float32)]
    return store, val, batches


def _label_unsqueezed(foreground: np.ndarray):
    """The labelling before 2026-12-04: the whole field, in the squeezed labelling's interface."""
    from skimage.measure import label

    labels, n = label(foreground, connectivity=2, return_num=True)
    return (lambda r, c: labels[r, c]), n


def timed_sweep(store, val, batches, repeats: int):
    from uts_cli.model.validate import region_sweep

    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = region_sweep(store, iter(batches), indices=val)
        times.append(time.perf_counter() - t0)
    return min(times), result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None,
                    help="a finished run folder: time the sweep on its maps instead of a short teacher's")
    ap.add_argument("--epochs", type=int, default=2, help="teacher epochs of 60 steps (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timings per way; the fastest is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    args = ap.parse_args(argv)

    import uts_cli.localize as localize
    import uts_cli.model.validate as validate

    with tempfile.TemporaryDirectory(prefix="uts-bench-sweep-") as tmp:
        run = args.run if args.run else short_teacher(Path(tmp), args.epochs, args.seed)
        store, val, batches = val_maps(run)
        source = (f"run {run.name} on {store.path.name}" if args.run
                  else f"teacher {args.epochs} x 60 steps")
        n_fields = len(np.unique(store.image_idx[val]))
        whole_s, whole = timed_sweep(store, val, batches, args.repeats)
        with mock.patch.object(localize, "_label_squeezed", _label_unsqueezed):
            plain_s, plain = timed_sweep(store, val, batches, args.repeats)
        with mock.patch.object(validate, "WHOLE_FIELD_PIXELS", 0):
            banded_s, banded = timed_sweep(store, val, batches, args.repeats)
    if not whole.counts == plain.counts == banded.counts:
        print("error: the ways disagree at some threshold", file=sys.stderr)
        return 1
    lines = [
        _common.header_block("Validation sweep: one pass against a labelling per threshold", _common.machine_info()),
        f"Val split: {len(val)} patches of {store.patch_size} px in {n_fields} fields; {len(validate.SWEEP)} "
        f"thresholds; {source} (best threshold {whole.threshold:.2f}, region F1 {whole.f1:.3f})",
        "",
        "| way | seconds a sweep (best of %d) | fields/s |" % args.repeats,
        "| --- | --- | --- |",
        f"| banded, once per threshold | {banded_s:.2f} | {n_fields / banded_s:.1f} |",
        f"| whole field, one pass, unsqueezed | {plain_s:.2f} | {n_fields / plain_s:.1f} |",
        f"| whole field, one pass, squeezed (the default) | {whole_s:.2f} | {n_fields / whole_s:.1f} |",
        "",
        f"Speed-up {banded_s / whole_s:.1f}x over banded, {plain_s / whole_s:.1f}x over unsqueezed; "
        f"counts identical at all {len(validate.SWEEP)} thresholds.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
