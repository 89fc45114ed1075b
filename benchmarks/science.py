"""Teacher vs student on the synthetic dataset over several seeds (the method's claim, measured).

Each seed renders its own synthetic dataset (training annotations with look-alikes marked as
mitoses and missed mitoses; clean val/test) and runs the full demo pipeline: prepare, normalize,
teach, distill (--filter TP), eval on the clean test truth (region level, one-to-one, 30 px).

    python benchmarks/science.py --seeds 0 1 2 --out benchmarks/results/science.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from uts_cli.api.demo import DemoConfig, demo
from uts_cli.api.evaluate import evaluate
from uts_cli.api.teach import teach
from uts_cli.config import EvalConfig, TeachConfig


def control_teacher(res, cfg: DemoConfig) -> dict:
    """A teacher trained for the teacher's plus the student's steps, on the same store.

    If the student's gain were only the extra training round, this teacher would match it.
    """
    runs = Path(cfg.workdir) / "runs"
    name = f"teacher2x-s{cfg.seed}"
    teach(TeachConfig(store=res.store, name=name, runs_dir=runs, n_blocks=cfg.n_blocks, weights="none",
                      epochs=2 * cfg.epochs, steps_per_epoch=cfg.steps_per_epoch, batch_size=cfg.batch_size,
                      lr=cfg.lr, pixel_threshold=cfg.pixel_threshold, seed=cfg.seed, workers=cfg.workers,
                      device=cfg.device, overwrite=True))
    ev = evaluate(EvalConfig(run=runs / name, split="test", device=cfg.device))
    return {"run": str(ev.run), "threshold": ev.threshold, "region": ev.region, "image_level": ev.image_level}


def _fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/uts-science"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/science.md"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--criterion", default="TP")
    parser.add_argument("--control", action="store_true",
                        help="also train a teacher for twice the steps (the student's compute) as a control")
    args = parser.parse_args(argv)

    rows, raw = [], []
    t0 = time.monotonic()
    for seed in args.seeds:
        cfg = DemoConfig(workdir=args.workdir / f"seed{seed}", seed=seed, device=args.device, criterion=args.criterion)
        res = demo(cfg)
        models = {"teacher": res.teacher, "student": res.student}
        if args.control:
            models["teacher 2x steps"] = control_teacher(res, cfg)
        raw.append({**asdict(res), "controls": {k: v for k, v in models.items() if k.startswith("teacher 2x")}})
        d = res.distill
        for who, m in models.items():
            r = m["region"]
            rows.append({"seed": seed, "model": who, **{k: r[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")},
                         "image_f1": m["image_level"]["f1"], "threshold": m["threshold"]})
            if who == "student":
                rows[-1]["kept"] = f"{d['n_train_kept']}/{d['n_train_before']}"
                rows[-1]["removed"] = f"{d['removed_true_lookalikes']} look-alike / {d['removed_true_mitoses']} real"
        print(json.dumps(rows[-len(models):]), flush=True)

    lines = ["# Teacher vs student on the synthetic dataset", "",
             f"Command: `python {' '.join(['benchmarks/science.py', *argv])}`  ",
             f"Demo settings: {json.dumps({k: v for k, v in asdict(DemoConfig()).items() if k not in ('workdir', 'seed')})}  ",
             f"Total time: {time.monotonic() - t0:.0f} s", "",
             "Test split, clean truth, region level (fields stitched), one-to-one matching within 30 px.", "",
             "| seed | model | precision | recall | F1 | TP | FP | FN | image F1 | pixel threshold | student kept | removed positives (truth) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['model']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                     f"{r['tp']} | {r['fp']} | {r['fn']} | {r['image_f1']:.3f} | {r['threshold']:.2f} | "
                     f"{r.get('kept', '')} | {r.get('removed', '')} |")
    lines += ["", "| model | precision | recall | F1 (mean ± sd over seeds) |", "| --- | --- | --- | --- |"]
    for who in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == who]
        lines.append(f"| {who} | {_fmt([r['precision'] for r in sel])} | {_fmt([r['recall'] for r in sel])} | "
                     f"{_fmt([r['f1'] for r in sel])} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
