"""How often does the teacher see a look-alike, or a mitosis, in a patch labelled positive?

On a synthetic store (clean truth known) this counts, over the training patches the teacher
learns from (the train split after the at-most-one-mitosis filter), the true mitoses and the
look-alikes that sit in patches labelled positive (an annotated mitosis) and in patches
labelled negative. It reports the share of each kind's appearances that carry a positive label,
as the data hold them and as class-balanced batches weight them (each positive repeated as
often as ``uts teach``'s sampler repeats it). The further apart the two kinds'
shares, the clearer the image-level labels tell the network that look-alikes are not mitoses.

    python benchmarks/label_mix.py STORE.h5 [STORE.h5 ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def label_mix(store_path: Path) -> dict:
    """Counts of mitoses and look-alikes in positive / negative training patches of one store."""
    from uts_cli.choices import KIND_HARD_NEGATIVE, KIND_MITOSIS
    from uts_cli.data import BalancedBatchSampler, only_one_mitosis
    from uts_cli.io.store import PatchStore

    store = PatchStore(store_path)
    if not store.has_truth:
        raise SystemExit(f"{store_path} has no clean truth (only synthetic stores do)")
    train = only_one_mitosis(store)
    labels = store.label[train] > 0.5   # the labels the teacher trains on
    counts = {"positives": 0, "negatives": 0, "mitoses_in_positives": 0, "mitoses_in_negatives": 0,
              "lookalikes_in_positives": 0, "lookalikes_in_negatives": 0}
    for k, positive in zip(train, labels):
        kinds = store.truth_for(int(k))[1]
        side = "positives" if positive else "negatives"
        counts[side] += 1
        counts[f"mitoses_in_{side}"] += int((kinds == KIND_MITOSIS).sum())
        counts[f"lookalikes_in_{side}"] += int((kinds == KIND_HARD_NEGATIVE).sum())
    # A positive's weight in balanced batches: the training sampler repeats the minority class.
    repeat = BalancedBatchSampler(labels, batch_size=1).repeat
    weight = repeat if counts["positives"] <= counts["negatives"] else 1 / repeat
    for kind in ("mitoses", "lookalikes"):
        pos, neg = counts[f"{kind}_in_positives"], counts[f"{kind}_in_negatives"]
        counts[f"{kind}_positive_share"] = pos / max(pos + neg, 1)
        counts[f"{kind}_positive_share_balanced"] = pos * weight / max(pos * weight + neg, 1e-9)
    return {"store": str(store_path), **counts}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = [label_mix(p) for p in args.stores]
    print("| store | positives / negatives | mitoses labelled positive: data / balanced | "
          "look-alikes labelled positive: data / balanced |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {Path(r['store']).name} | {r['positives']} / {r['negatives']} | "
              f"{r['mitoses_positive_share']:.0%} / {r['mitoses_positive_share_balanced']:.0%} | "
              f"{r['lookalikes_positive_share']:.0%} / {r['lookalikes_positive_share_balanced']:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
