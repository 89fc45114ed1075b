"""Teacher vs student on the synthetic dataset over several seeds (the method's claim, measured).

Each seed renders its own synthetic dataset (training annotations with look-alikes marked as
mitoses and missed mitoses; clean val/test) and runs the pipeline of ``uts demo``: prepare,
normalize, teach, distill, eval on the clean test truth (region level, one-to-one, 30 px).

A *variant* is a set of training options (``--ema-decay``, ``--lr-schedule``, ...); its runs go to
``WORKDIR/seed<N>/runs-<TAG>`` so variants share the rendered stores but not their runs. For every
teacher the filter is audited against the clean truth: for each criterion, how many of the
training positives whose only annotated "mitosis" is a look-alike (noisy) and how many with a
real mitosis (real) it would remove, from one scoring pass. ``--teacher-only`` stops there (no
student), which is how the training options are compared cheaply.

    python benchmarks/science.py --seeds 0 1 2 3 4 --tag base --teacher-only
    python benchmarks/science.py --seeds 0 1 2 --tag ema --ema-decay 0.99 --criterion PEAK --control
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from uts_cli.api.demo import DEMO_TEACH_OPTIONS, PROFILES, demo_store, profile_config, teacher_config
from uts_cli.api.distill import _score_teacher, _truth_audit, distill
from uts_cli.api.evaluate import evaluate
from uts_cli.api.teach import teach, train_run
from uts_cli.choices import FILTERS
from uts_cli.config import DistillConfig, EvalConfig
from uts_cli.distillation import decide
from uts_cli.io.store import PatchStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from filter_bound import separability  # noqa: E402  (a sibling script, not a package)

def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


TEACH_FLAGS = {  # flag -> (TeachConfig field, type)
    "--width": ("width", int),
    "--channels-last": ("channels_last", _on_off),
    "--select": ("select", str), "--aggregation": ("aggregation", str), "--cam-upsample": ("cam_upsample", str),
    "--optimizer": ("optimizer", str), "--weight-decay": ("weight_decay", float),
    "--lr-schedule": ("lr_schedule", str), "--warmup-epochs": ("warmup_epochs", float),
    "--ema-decay": ("ema_decay", float), "--bn-reestimate": ("bn_reestimate", int),
    "--trim-positives": ("trim_positives", float),
    "--location": ("location", str), "--alpha-location": ("alpha_location", float),
    "--margin": ("margin", float), "--temperature": ("temperature", float),
    "--norm": ("norm", str), "--image-loss": ("image_loss", str), "--gce-q": ("gce_q", float),
    "--balance": ("balance", _on_off), "--strong-augmentation": ("strong_augmentation", _on_off),
}
DATASET_FLAGS = {  # flag -> (SyntheticSpec field, type): the look of the rendered data
    "--stain-spread": ("stain_spread", float), "--nucleus-density": ("nucleus_density", float),
    "--lookalikes-per-field": ("lookalikes_per_field", float),
}


def _region(ev) -> dict:
    return {"run": str(ev.run), "threshold": ev.threshold, "region": ev.region, "image_level": ev.image_level,
            "f1_boot_sd": field_bootstrap_sd(Path(ev.output) / "matches.csv", ev.store)}


def field_bootstrap_sd(matches_csv: Path, store_path: Path, n: int = 2000, seed: int = 0) -> float:
    """Standard deviation of the test F1 when the test fields are resampled with replacement.

    How much of a seed's F1 is the luck of its few test fields: a seed-to-seed spread no larger
    than this says little about the training. Fields with no detection and no mitosis count too.
    """
    import numpy as np

    store = PatchStore(store_path)
    test_images = np.unique(store.image_idx[store.indices("test")])
    counts = {store.image_ids[int(i)]: np.zeros(3) for i in test_images}
    with open(matches_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            counts.setdefault(row["image"], np.zeros(3))[("TP", "FP", "FN").index(row["status"])] += 1
    table = np.array(list(counts.values()))
    draws = table[np.random.default_rng(seed).integers(0, len(table), (n, len(table)))].sum(axis=1)
    tp, fp, fn = draws.T
    return float(np.std(2 * tp / np.maximum(1, 2 * tp + fp + fn)))


def audit_filters(run: Path, store_path: Path, device: str, radius: float = 30.0) -> dict:
    """What each criterion would remove from the training positives, against the clean truth.

    Returns:
        ``{"noisy": n, "real": n, "<criterion>": {"removed_noisy": .., "removed_real": .., "kept": ..}}``
        where noisy/real count the training positives (after the at-most-one-mitosis filter) whose
        annotation is only a look-alike / holds a real mitosis; ``pseudolabel`` counts the positives
        relabelled negative instead.
    """
    from uts_cli.data import only_one_mitosis
    from uts_cli.devices import resolve_device
    from uts_cli.io.rundir import RunDir
    from uts_cli.io.store import PatchStore
    from uts_cli.model.predict import load_run_model
    from uts_cli.reporting import NullReporter

    store = PatchStore(store_path)
    rd = RunDir(run)
    conf = rd.read_config()
    dev = resolve_device(device)
    model, _ = load_run_model(rd, "best", dev)
    idx = only_one_mitosis(store, store.indices("train"))
    threshold = float(conf["threshold"])
    pixel = float(conf.get("pixel_threshold", threshold))
    probs, tp, fp, fn, _, peak = _score_teacher(model, store, idx, dev, threshold, pixel, radius, 32, "auto", 0,
                                                NullReporter())
    labels = store.label[idx]
    noisy, real = _truth_audit(store, idx[labels == 1])
    out: dict = {"noisy": noisy, "real": real}
    for crit in FILTERS:
        d = decide(labels, probs, threshold, tp, fp, fn, crit, peak_near=peak)
        rn, rr = _truth_audit(store, idx[~d.keep])
        out[crit] = {"removed_noisy": rn, "removed_real": rr, "kept": int(d.keep.sum())}
        if crit == "TP":  # the image-level rule on negatives is the same for every criterion
            out["negatives"] = negative_audit(store, idx[labels == 0], d.keep[labels == 0])
    d = decide(labels, probs, threshold, tp, fp, fn, "TP", pseudolabel=True)
    rn, rr = _truth_audit(store, idx[(labels == 1) & (d.label == 0)])
    out["pseudolabel"] = {"removed_noisy": rn, "removed_real": rr, "kept": len(idx)}
    return out


def clean_labels(store_path: Path):
    """Per-patch labels from the clean truth: 1 where the patch holds a true mitosis."""
    import numpy as np

    store = PatchStore(store_path)
    pidx, _, kind = store.all_points(truth=True)
    labels = np.zeros(len(store), np.uint8)
    labels[pidx[kind == 0]] = 1
    return labels


def negative_audit(store, negatives, kept) -> dict:
    """What the image-level rule (a negative the teacher calls positive) removes, against the clean truth.

    Returns:
        counts of the training negatives that hold a real mitosis (unannotated: the noisy ones), a
        look-alike (and no mitosis) or neither, in all and among the removed (``removed_*``).
    """
    out = {"with_mitosis": 0, "with_lookalike": 0, "plain": 0}
    out.update({f"removed_{k}": 0 for k in list(out)})
    for k, keep in zip(negatives, kept):
        _, kind = store.truth_for(int(k))
        what = "with_mitosis" if (kind == 0).any() else "with_lookalike" if len(kind) else "plain"
        out[what] += 1
        out[f"removed_{what}"] += int(not keep)
    return out


def _given(args: argparse.Namespace, flags: dict) -> dict:
    """``{field: value}`` of the ``flags`` (flag -> (field, type)) given on the command line."""
    values = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _) in flags.items()}
    return {k: v for k, v in values.items() if v is not None}


def mean_sd(values: list[float]) -> str:
    """``mean ± sd`` to 3 decimals; the mean alone for one value, ``-`` for none."""
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.3f}{sd}"


def report(rows: list[dict], audits: dict, header: list[str]) -> str:
    lines = header + ["", "Test split, clean truth, region level (fields stitched), one-to-one matching within 30 px.",
                      "F1 ± sd: the sd of that seed's F1 over bootstrap resamples of its test fields (2,000 draws).",
                      "", "| seed | model | precision | recall | F1 | TP | FP | FN | image F1 | pixel threshold | student kept | removed positives (truth) |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['model']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} ± {r['f1_boot_sd']:.3f} | "
                     f"{r['tp']} | {r['fp']} | {r['fn']} | {r['image_f1']:.3f} | {r['threshold']:.2f} | "
                     f"{r.get('kept', '')} | {r.get('removed', '')} |")
    lines += ["", "| model | precision | recall | F1 (mean ± sd over seeds) | seeds |", "| --- | --- | --- | --- | --- |"]
    for who in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == who]
        lines.append(f"| {who} | {mean_sd([r['precision'] for r in sel])} | {mean_sd([r['recall'] for r in sel])} | "
                     f"{mean_sd([r['f1'] for r in sel])} | {len(sel)} |")
    if audits:
        crits = [*FILTERS, "pseudolabel"]
        lines += ["", "Filter audit of each teacher on its training positives (clean truth): removed noisy / all "
                      "noisy, removed real / all real (pseudolabel: relabelled negative).", "",
                  "| seed | " + " | ".join(crits) + " |", "| --- |" + " --- |" * len(crits)]
        for seed, a in audits.items():
            lines.append(f"| {seed} | " + " | ".join(
                f"{a[c]['removed_noisy']}/{a['noisy']} noisy, {a[c]['removed_real']}/{a['real']} real" for c in crits) + " |")
        lines += ["", "| criterion | noisy removed (mean ± sd) | real kept (mean ± sd) |", "| --- | --- | --- |"]
        for c in crits:
            nr = [a[c]["removed_noisy"] / max(1, a["noisy"]) for a in audits.values()]
            rk = [1 - a[c]["removed_real"] / max(1, a["real"]) for a in audits.values()]
            lines.append(f"| {c} | {mean_sd(nr)} | {mean_sd(rk)} |")
        seps = {seed: a["separability"] for seed, a in audits.items() if "separability" in a}
        if seps:
            lines += ["", "Separability of the training positives by the teacher (benchmarks/filter_bound.py): ROC AUC "
                          "real vs noisy, and the best any threshold does (noisy removed at 80 % real kept / real "
                          "kept at 90 % noisy removed), for the CAM peak near the annotated point and the image "
                          "probability.", "", "| seed | near: AUC | near: best trade | image: AUC | image: best trade |",
                      "| --- | --- | --- | --- | --- |"]
            for seed, sp in seps.items():
                lines.append(f"| {seed} | " + " | ".join(
                    f"{sp[k]['auc']:.3f} | {sp[k]['noisy_removed_at_80_real_kept']:.2f} / "
                    f"{sp[k]['real_kept_at_90_noisy_removed']:.2f}" for k in ("near", "image")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/uts-science"))
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/science-<tag>.md")
    parser.add_argument("--tag", default="base", help="variant name; runs go to WORKDIR/seed<N>/runs-<tag>")
    parser.add_argument("--profile", default="default", choices=sorted(PROFILES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--criterion", default="TP", choices=FILTERS)
    parser.add_argument("--keep-negatives", action="store_true",
                        help="the filter judges the positives only (student runs named student-keepneg-s<N>)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--student-init", choices=["fresh", "teacher"], default="fresh",
                        help="the student's initial weights: fresh (the method's) or its teacher's best checkpoint "
                             "(runs named student-warm-s<N>)")
    parser.add_argument("--student-trim-positives", type=float, default=None,
                        help="the student's --trim-positives instead of the teacher's (runs named student-trim<F>-s<N>)")
    for flag in ("--n-cases", "--n-blocks", "--epochs", "--steps-per-epoch", "--patch-size", "--batch-size"):
        parser.add_argument(flag, type=int, default=None, help="override the profile's value")
    parser.add_argument("--teacher-only", action="store_true", help="teacher, its eval and the filter audit only")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a teacher run of this tag that finished training (resume instead of retrain)")
    parser.add_argument("--control", action="store_true",
                        help="also train a teacher for twice the epochs (the student's compute) as a control")
    parser.add_argument("--control-only", action="store_true",
                        help="train and score only the control: the 2x-epochs teacher, or with "
                             "--continue-control that one (adds it to a study run without it)")
    parser.add_argument("--continue-control", action="store_true",
                        help="also train the teacher on for the student's epochs from its own best checkpoint, on "
                             "the unfiltered labels (teacher-cont-s<N>): the control of a --student-init teacher run")
    parser.add_argument("--oracle", action="store_true",
                        help="also train a teacher on the clean truth (labels and points), with the teacher's "
                             "settings: the ceiling that removing all label noise would reach")
    parser.add_argument("--oracle-only", action="store_true",
                        help="train and score only the clean-label teacher of --oracle")
    for flag, (_, kind) in TEACH_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None)
    for flag, (_, kind) in DATASET_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help="synthetic dataset look (default: the renderer's)")
    args = parser.parse_args(argv)
    options, looks = _given(args, TEACH_FLAGS), _given(args, DATASET_FLAGS)
    out = args.out or Path(f"benchmarks/results/science-{args.tag}.md")

    rows, raw, audits = [], [], {}
    t0 = time.monotonic()
    for seed in args.seeds:
        ts = time.monotonic()
        cfg = profile_config(args.profile, workdir=args.workdir / f"seed{seed}", seed=seed, device=args.device,
                             criterion=args.criterion, lr=args.lr, teach_options={**DEMO_TEACH_OPTIONS, **options},
                             dataset_options=looks,
                             n_cases=args.n_cases,
                             n_blocks=args.n_blocks, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                             patch_size=args.patch_size, batch_size=args.batch_size)
        store = demo_store(cfg)
        runs = Path(cfg.workdir) / f"runs-{args.tag}"
        student_trim = "" if args.student_trim_positives is None else f"-trim{args.student_trim_positives:g}"
        warm = "-warm" if args.student_init == "teacher" else ""
        tname = f"teacher-s{seed}"
        teacher_best = str(runs / tname / "checkpoints" / "best.pt")   # the warm starts' weights
        sname = f"student{'-keepneg' if args.keep_negatives else ''}{warm}{student_trim}-s{seed}"
        student_overrides = ({} if args.student_trim_positives is None
                             else {"trim_positives": args.student_trim_positives})
        if warm:
            student_overrides["weights"] = teacher_best
        done = runs / tname / "metrics.json"
        reuse = args.reuse and done.is_file() and json.loads(done.read_text()).get("status") == "complete"
        models, extra, d = {}, {}, None
        if not (args.control_only or args.oracle_only):
            tres = teach(teacher_config(cfg, store, tname, runs, resume=reuse, overwrite=not reuse))
            models["teacher"] = _region(evaluate(EvalConfig(run=runs / tname, split="test", device=args.device)))
            audits[seed] = audit_filters(runs / tname, store, args.device)
            audits[seed]["separability"] = separability(runs / tname, store, args.device)
            extra = {"teacher_best_epoch": tres.best_epoch,
                     "teacher_pixel_threshold_at_edge": tres.pixel_threshold_at_edge}
            if not args.teacher_only:
                d = distill(DistillConfig(teacher=runs / tname, name=sname, runs_dir=runs, criterion=args.criterion,
                                          keep_negatives=args.keep_negatives, device=args.device,
                                          overrides=student_overrides, workers=cfg.workers, overwrite=True))
                models["student"] = _region(evaluate(EvalConfig(run=runs / sname, split="test", device=args.device)))
        if args.oracle or args.oracle_only:
            oname = f"teacher-oracle-s{seed}"
            train_run(teacher_config(cfg, store, oname, runs, use_truth=True), labels=clean_labels(store),
                      extra_config={"labels": "clean truth (benchmarks/science.py --oracle)"})
            models["teacher on clean labels"] = _region(evaluate(EvalConfig(run=runs / oname, split="test",
                                                                            device=args.device)))
        if args.continue_control:
            cname = f"teacher-cont-s{seed}"
            teach(teacher_config(cfg, store, cname, runs, weights=teacher_best))
            models["teacher, continued"] = _region(evaluate(EvalConfig(run=runs / cname, split="test",
                                                                       device=args.device)))
        if args.control or (args.control_only and not args.continue_control):
            teach(teacher_config(cfg, store, f"teacher2x-s{seed}", runs, epochs=2 * cfg.epochs))
            models["teacher 2x epochs"] = _region(evaluate(EvalConfig(run=runs / f"teacher2x-s{seed}", split="test",
                                                                      device=args.device)))
        for who, m in models.items():
            r = m["region"]
            rows.append({"seed": seed, "model": who, **{k: r[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")},
                         "image_f1": m["image_level"]["f1"], "threshold": m["threshold"],
                         "f1_boot_sd": m["f1_boot_sd"]})
            if who == "student" and d is not None:
                rows[-1]["kept"] = f"{d.n_train_kept}/{d.n_train_before}"
                rows[-1]["removed"] = f"{d.removed_true_lookalikes} look-alike / {d.removed_true_mitoses} real"
        raw.append({"seed": seed, "models": models, "audit": audits.get(seed), **extra, "seconds": round(time.monotonic() - ts, 1),
                    "distill": None if d is None else {k: v for k, v in dataclasses.asdict(d).items() if k != "student"}})
        print(json.dumps(rows[-len(models):]), flush=True)
        # Rewritten after every seed: an unfinished study still leaves its finished seeds behind.
        settings = {**{k: v for k, v in dataclasses.asdict(cfg).items()
                       if k not in ("workdir", "seed", "teach_options", "dataset_options")},
                    **options, **looks, "keep_negatives": args.keep_negatives,
                    "student_trim_positives": args.student_trim_positives, "student_init": args.student_init}
        header = ["# Teacher vs student on the synthetic dataset", "",
                  f"Command: `python {' '.join(['benchmarks/science.py', *argv])}`  ",
                  f"Settings: {json.dumps(settings, default=str)}  ",
                  f"Seeds done: {[r['seed'] for r in raw]}; time so far: {time.monotonic() - t0:.0f} s"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report(rows, audits, header))
        out.with_suffix(".json").write_text(json.dumps({"settings": settings, "seeds": raw}, indent=2, default=str))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
