"""Time one-to-one point matching on large point sets (moved here from the unit tests).

Usage: ``python benchmarks/bench_matching.py [--sizes 1000,10000,50000] [--repeats 3]``. Prints one
line per size: points matched, the best of ``--repeats`` wall times, and the true positives.
The setting is the one the unit test checks for correctness: 80% of the predictions are the true
points plus 10 px noise, the rest are uniform over a 100000 px square; radius 30 px.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from uts_cli.metrics import match_points

RADIUS = 30.0


def run(n: int, repeats: int) -> tuple[float, int]:
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 100_000, size=(n, 2))
    k = int(0.8 * n)
    pred = np.concatenate([true[:k] + rng.normal(0, 10, size=(k, 2)),
                           rng.uniform(0, 100_000, size=(n - k, 2))])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = match_points(pred, true, RADIUS)
        best = min(best, time.perf_counter() - t0)
    return best, res.tp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,50000", help="comma-separated numbers of points")
    ap.add_argument("--repeats", type=int, default=3, help="runs per size; the fastest is reported")
    args = ap.parse_args()
    print("points  seconds  tp")
    for n in (int(s) for s in args.sizes.split(",")):
        seconds, tp = run(n, args.repeats)
        print(f"{n:>6}  {seconds:7.3f}  {tp}")


if __name__ == "__main__":
    main()
