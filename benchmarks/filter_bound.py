"""How well can any threshold on a teacher's scores separate noisy from real training positives?

The filter of ``uts distill`` keeps or removes a training positive from what the teacher says
about it. On a synthetic store (clean truth known) a positive is *real* when its patch holds a
true mitosis and *noisy* when its annotated "mitosis" is only a look-alike. This script scores the
positives (after the at-most-one-mitosis filter) with a teacher and reports, for two scores:

- ``near``: the highest CAM probability within the radius of the annotated point (what the
  localization criteria look at), and
- ``image``: the teacher's image-level probability,

the ROC AUC of real against noisy, and the best any single threshold on that score can do:
the share of noisy positives removed while keeping 80 % of the real ones, and the share of real
positives kept while removing 90 % of the noisy ones (the targets of the filter).

The teacher and the store need not come from the same seed: ``--store`` of another seed's
dataset scores patches the teacher never trained on (an out-of-sample teacher, the best case of
cross-fitting). Several ``--teacher`` runs are scored one by one and, as an ensemble, by the mean
of their scores (what a filter that asks K teachers would see).

    python benchmarks/filter_bound.py --teacher RUN [RUN ...] [--store STORE.h5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    pos, neg = np.asarray(pos, np.float64)[:, None], np.asarray(neg, np.float64)[None, :]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    # Pairwise: a few hundred positives, so the (n_pos, n_neg) table is small.
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def best_threshold_trade(real: np.ndarray, noisy: np.ndarray) -> dict:
    """Removing every positive whose score is below a threshold: the two target trade-offs."""
    real, noisy = np.sort(np.asarray(real, np.float64)), np.asarray(noisy, np.float64)
    # Keep >= 80 % of the real: the threshold is the 20th percentile of the real scores (from below).
    t80 = real[int(np.floor(0.2 * len(real)))] if len(real) else 0.0
    # Remove >= 90 % of the noisy: the threshold just above the 90th percentile of the noisy scores.
    t90 = np.sort(noisy)[int(np.ceil(0.9 * len(noisy))) - 1] if len(noisy) else 0.0
    return {"noisy_removed_at_80_real_kept": float((noisy < t80).mean()) if len(noisy) else float("nan"),
            "real_kept_at_90_noisy_removed": float((real > t90).mean()) if len(real) else float("nan")}


def positive_scores(run: Path, store_path: Path | None = None, device: str = "cpu",
                    radius: float = 30.0) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    """``(store, {"near": ..., "image": ...}, real)`` for the training positives of ``store_path``
    (default: the run's store), scored by the run's best model; ``real`` marks a true mitosis."""
    from uts_cli.data import only_one_mitosis
    from uts_cli.devices import resolve_device
    from uts_cli.io.rundir import RunDir
    from uts_cli.io.store import PatchStore
    from uts_cli.model.predict import load_run_model, predict_patches

    rd = RunDir(run)
    store = PatchStore(store_path or rd.read_config()["store"]["path"])
    if not store.has_truth:
        raise SystemExit(f"{store.path}: no clean truth in this store (synthetic stores have one)")
    dev = resolve_device(device)
    model, _ = load_run_model(rd, "best", dev)
    idx = only_one_mitosis(store, store.indices("train"))
    idx = idx[store.label[idx] == 1]
    near, image, real = [], [], []
    for batch in predict_patches(model, store, idx, dev, want_cam=True):
        for k, p, cam in zip(batch.indices, batch.probs, batch.cams):
            yx, kind = store.points_for(int(k))
            yy, xx = np.mgrid[: cam.shape[0], : cam.shape[1]]
            inside = np.zeros(cam.shape, bool)
            for y, x in yx[kind == 0]:
                inside |= np.hypot(yy - y, xx - x) <= radius
            near.append(float(cam[inside].max()) if inside.any() else 0.0)
            image.append(float(p))
            _, true_kind = store.truth_for(int(k))
            real.append(bool((true_kind == 0).any()))
    return store.path, {"near": np.asarray(near), "image": np.asarray(image)}, np.asarray(real, bool)


def separation(scores: dict[str, np.ndarray], real: np.ndarray) -> dict:
    """AUC and the two target trade-offs of each score."""
    out = {"real": int(real.sum()), "noisy": int((~real).sum())}
    for name, score in scores.items():
        out[name] = {"auc": auc(score[real], score[~real]), **best_threshold_trade(score[real], score[~real])}
    return out


def separability(run: Path, store_path: Path | None = None, device: str = "cpu", radius: float = 30.0) -> dict:
    """Score the training positives of ``store_path`` (default: the run's store) with the run's best model."""
    store, scores, real = positive_scores(run, store_path, device, radius)
    return {"teacher": str(run), "store": str(store), **separation(scores, real)}


def ensemble_separability(runs: list[Path], store_path: Path | None = None, device: str = "cpu",
                          radius: float = 30.0) -> dict:
    """Each run's separability and that of the mean of their scores (all on one store)."""
    each, scored, real = [], [], None
    for run in runs:
        store, scores, r = positive_scores(run, store_path, device, radius)
        if real is not None and not np.array_equal(r, real):
            raise SystemExit(f"{run}: scored other positives than {runs[0]} (give --store)")
        store_path, real = store, r
        scored.append(scores)
        each.append({"teacher": str(run), **separation(scores, real)})
    mean = {k: np.mean([s[k] for s in scored], axis=0) for k in scored[0]}
    return {"store": str(store_path), "teachers": each, "ensemble": separation(mean, real)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, nargs="+", required=True,
                        help="a finished teach run; several: each and their mean-score ensemble")
    parser.add_argument("--store", type=Path, default=None, help="a synthetic store (default: the run's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if len(args.teacher) == 1:
        res = separability(args.teacher[0], args.store, args.device)
    else:
        res = ensemble_separability(args.teacher, args.store, args.device)
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
