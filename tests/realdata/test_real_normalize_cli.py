"""`uts prepare folder` + `uts normalize` on all 2,384 real AMi-Br crops, through the CLI.

The crops are read in place (never copied): the folder reader gets the crop folder as root and an
annotations CSV written to a temporary folder (each crop's mitosis at its centre). The figures are
printed (run with -s): patches, flagged patches and the between-scanner colour spread before/after.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from test_real_stain import colour_spread, scanner_group
from uts_cli.cli.app import app
from uts_cli.io.store import PatchStore

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}


@pytest.mark.slow
def test_prepare_and_normalize_all_ami_br_crops(realdata, tmp_path):
    root = realdata / "ami-br"
    if not (root / "AMI-BR.csv").is_file():
        pytest.skip("AMi-Br crops not available")
    files = sorted((root / "patches").glob("*/*.png"))
    ann = tmp_path / "annotations.csv"
    with open(ann, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "x", "y", "label"])
        for f in files:
            w.writerow([f"{f.parent.name}/{f.name}", 64, 64, "mitosis"])
    runner = CliRunner()
    raw, norm = tmp_path / "ami.h5", tmp_path / "ami-norm.h5"
    r = runner.invoke(app, ["prepare", "folder", "--root", str(root / "patches"), "--annotations", str(ann),
                            "--patch-size", "128", "-o", str(raw), "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["n_images"] == len(files) == 2384 and doc["n_patches"] == 2384 and doc["n_points"] == 2384
    r = runner.invoke(app, ["normalize", str(raw), "-o", str(norm), "--device", "cpu", "--batch-size", "64",
                            "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["n_flagged"] == 0

    with open(root / "AMI-BR.csv", newline="") as fh:
        slides = {(row["dataset"], row["uid"]): row["slide"] for row in csv.DictReader(fh)}
    before_store, after_store = PatchStore(raw), PatchStore(norm)
    groups = []
    for image_id in before_store.image_ids:
        dataset, uid = image_id.split("/")[-1].split("_")
        groups.append(scanner_group(dataset, slides[(dataset, uid)]))
    groups = np.array(groups)[before_store.image_idx]
    before = colour_spread(before_store.read_rgb(np.arange(len(before_store))), groups)
    after = colour_spread(after_store.read_rgb(np.arange(len(after_store))), groups)
    print(f"AMi-Br via CLI: {len(files)} crops, 0 flagged; between-scanner Lab spread {before[0]:.2f} -> "
          f"{after[0]:.2f}; distance to global mean {before[1]:.2f} -> {after[1]:.2f}; reference "
          f"{doc['reference']}")
    assert after[0] < 0.5 * before[0]
    assert after[1] < 0.7 * before[1]
