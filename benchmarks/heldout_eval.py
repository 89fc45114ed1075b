"""Finished study runs scored again on one large held-out test set (the same for every seed).

Each seed of ``science.py`` is tested on the 4 test cases of its own rendered dataset: 16 fields,
which alone move a seed's F1 by about +- 0.05 (docs/science.md, section 9). This script renders
one more synthetic dataset (its own generator seed, the study's look) with ``--cases`` test cases,
and scores every finished run of the given seeds and tags on it, at the run's own pixel threshold
(chosen on its own val split, as before). The held-out fields are normalized once per training
store, with that store's own stain reference, so each model sees them in the colours it trained on.

Nothing is trained. Runs found under ``WORKDIR/seed<N>/runs-<TAG>/<model>-s<N>`` with a complete
``metrics.json``; their scores go to ``RUN/eval-heldout-<name>`` (the run's ``eval-test`` stays).

    python benchmarks/heldout_eval.py --workdir /work/sci/main --seeds 0 1 2 3 4 --tags l2 \\
        --out benchmarks/results/science-study/heldout-l2.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from uts_cli.api.demo import heldout_set_name, heldout_test_store, test_set_summary
from uts_cli.api.evaluate import evaluate
from uts_cli.config import EvalConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from science import DATASET_FLAGS, _given, field_bootstrap_sd, mean_sd  # noqa: E402  (a sibling script)

# Model names science.py gives its runs (prefix before "-s<seed>"), in table order.
MODELS = {"teacher": "teacher", "student": "student (TP)", "student-keepneg": "student, --keep-negatives",
          "student-trim0": "student, --trim-positives 0", "student-warm": "student from its teacher's weights",
          "teacher2x": "teacher 2x epochs", "teacher-cont": "teacher continued from its weights",
          "teacher-oracle": "teacher on clean labels"}


def finished_runs(workdir: Path, seeds: list[int], tags: list[str]):
    """(seed, tag, model, run folder) of every complete run science.py leaves."""
    for seed in seeds:
        for tag in tags:
            runs = workdir / f"seed{seed}" / f"runs-{tag}"
            for model in MODELS:
                run = runs / f"{model}-s{seed}"
                metrics = run / "metrics.json"
                if metrics.is_file() and json.loads(metrics.read_text()).get("status") == "complete":
                    yield seed, tag, model, run


def report(scores: dict, seeds: list[int], tags: list[str], header: list[str]) -> str:
    lines = [*header, ""]
    for tag in tags:
        models = [m for m in MODELS if any((s, tag, m) in scores for s in seeds)]
        if not models:
            continue
        lines += [f"## `{tag}`: region F1 on the held-out test set (± field bootstrap sd)", "",
                  "| seed | " + " | ".join(MODELS[m] for m in models) + " |",
                  "| --- |" + " --- |" * len(models)]
        for s in seeds:
            cells = [f"{scores[(s, tag, m)]['f1']:.3f} ± {scores[(s, tag, m)]['f1_boot_sd']:.3f}"
                     if (s, tag, m) in scores else "-" for m in models]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("| mean ± sd | " + " | ".join(
            mean_sd([scores[(s, tag, m)]["f1"] for s in seeds if (s, tag, m) in scores]) for m in models) + " |")
        lines.append("")
        for a, b in (("student", "teacher"), ("student", "teacher2x"), ("teacher2x", "teacher"),
                     ("student-trim0", "teacher"), ("student-trim0", "student"), ("student-trim0", "teacher2x"),
                     ("student-warm", "teacher"), ("student-warm", "student"), ("student-warm", "teacher2x"),
                     ("student-warm", "teacher-cont"), ("teacher-cont", "teacher"), ("student", "teacher-cont")):
            pairs = [scores[(s, tag, a)]["f1"] - scores[(s, tag, b)]["f1"] for s in seeds
                     if (s, tag, a) in scores and (s, tag, b) in scores]
            if pairs:
                lines.append(f"- {MODELS[a]} - {MODELS[b]}: {mean_sd(pairs)} "
                             f"({', '.join(f'{p:+.3f}' for p in pairs)}; better on {sum(p > 0 for p in pairs)} "
                             f"of {len(pairs)})")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="the science.py --workdir of the runs")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--tags", nargs="+", required=True)
    parser.add_argument("--cases", type=int, default=40, help="held-out test cases (4 fields each)")
    parser.add_argument("--generator-seed", type=int, default=1000,
                        help="the held-out dataset's renderer seed (no study seed uses it)")
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--again", action="store_true", help="score runs again that were already scored")
    for flag, (_, kind) in DATASET_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help="the study's synthetic look")
    args = parser.parse_args(argv)
    looks = _given(args, DATASET_FLAGS)
    t0 = time.monotonic()
    set_name = f"{heldout_set_name(args.cases, looks, args.generator_seed)}-p{args.patch_size}"
    eval_name = f"eval-heldout-{set_name}"
    test_store = None
    scores, rows = {}, []
    for seed, tag, model, run in finished_runs(args.workdir, args.seeds, args.tags):
        done = run / eval_name / "metrics.json"   # written last and atomically: present means finished
        if done.is_file() and not args.again:
            ev = json.loads(done.read_text())
        else:
            train_store = Path(json.loads((run / "config.json").read_text())["config"]["store"])
            test_store = heldout_test_store(args.workdir / "heldout", train_store, args.cases, args.patch_size,
                                            looks, args.generator_seed, args.device)
            result = evaluate(EvalConfig(run=run, store=test_store, split="test", truth="clean",
                                         output=run / eval_name, device=args.device))
            ev = {"region": result.region, "threshold": result.threshold, "store": str(result.store)}
        r = ev["region"]
        scores[(seed, tag, model)] = {
            "precision": r["precision"], "recall": r["recall"], "f1": r["f1"], "tp": r["tp"], "fp": r["fp"],
            "fn": r["fn"], "threshold": ev["threshold"],
            "f1_boot_sd": field_bootstrap_sd(run / eval_name / "matches.csv", Path(ev["store"]))}
        rows.append({"seed": seed, "tag": tag, "model": model, "run": str(run), **scores[(seed, tag, model)]})
        print(json.dumps(rows[-1]), flush=True)
    test_store = test_store or (Path(ev["store"]) if rows else None)
    n_fields = test_set_summary(test_store, held_out=True)["fields"] if test_store else 0
    header = ["# Study runs on one held-out test set", "",
              f"Command: `python {' '.join(['benchmarks/heldout_eval.py', *argv])}`  ",
              f"Held-out set: {set_name}, {args.cases} test cases ({n_fields} fields), generator seed "
              f"{args.generator_seed}, look {json.dumps(looks)}; clean truth, one-to-one within 30 px, each "
              f"run's own pixel threshold. Time: {time.monotonic() - t0:.0f} s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(scores, args.seeds, args.tags, header))
    args.out.with_suffix(".json").write_text(json.dumps({"heldout": set_name, "n_fields": n_fields, "runs": rows},
                                                        indent=2))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
