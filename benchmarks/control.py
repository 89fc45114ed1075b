"""Train and score only the compute-matched control teacher of a finished science.py study.

``science.py --control`` trains it together with the teacher and the student; this adds it to a
study that ran without it (same workdir, tag and settings), writing a small JSON and Markdown
report, so the control need not retrain the teacher and student.

    python benchmarks/control.py --seeds 0 1 --tag l2 --workdir /tmp/uts-science
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from uts_cli.api.demo import PROFILES, demo_store, profile_config, teacher_config
from uts_cli.api.evaluate import evaluate
from uts_cli.api.teach import teach
from uts_cli.config import EvalConfig


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/uts-science"))
    parser.add_argument("--tag", default="base", help="the study's tag (runs in WORKDIR/seed<N>/runs-<TAG>)")
    parser.add_argument("--profile", default="default", choices=sorted(PROFILES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True, help="Markdown report; a .json is written beside it")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        # The demo's teacher options (DEMO_TEACH_OPTIONS), as science.py trains with by default.
        cfg = profile_config(args.profile, workdir=args.workdir / f"seed{seed}", seed=seed, device=args.device)
        store = demo_store(cfg)
        runs = Path(cfg.workdir) / f"runs-{args.tag}"
        name = f"teacher2x-s{seed}"
        teach(teacher_config(cfg, store, name, runs, epochs=2 * cfg.epochs, overwrite=True))
        ev = evaluate(EvalConfig(run=runs / name, split="test", device=args.device))
        rows.append({"seed": seed, "threshold": ev.threshold, "region": ev.region})
        print(json.dumps(rows[-1]), flush=True)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"command": " ".join(["benchmarks/control.py", *argv]), "seeds": rows}, indent=2))
        lines = ["# Control teacher (twice the epochs)", "", f"Command: `python benchmarks/control.py {' '.join(argv)}`",
                 "", "| seed | precision | recall | F1 | TP | FP | FN | pixel threshold |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['seed']} | {r['region']['precision']:.3f} | {r['region']['recall']:.3f} | {r['region']['f1']:.3f} | "
                  f"{r['region']['tp']} | {r['region']['fp']} | {r['region']['fn']} | {r['threshold']:.2f} |" for r in rows]
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
