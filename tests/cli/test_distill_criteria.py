"""`uts distill --filter ...` and `--pseudolabel` through the CLI on hand-set teacher outputs.

The teacher's scoring pass is replaced by fixed values, so each test knows exactly which patch
must be removed, kept or relabelled, and checks it in removed.csv, summary.json and kept_train.npy.
"""
import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import set_run_threshold, train_tiny_teacher
from uts_cli.cli.app import app

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from uts_cli.data import only_one_mitosis
    from uts_cli.io.store import PatchStore

    store, runs, _ = train_tiny_teacher(tmp_path_factory.mktemp("criteria"), n_images=12, seed=2)
    set_run_threshold(runs / "t", 0.5)
    s = PatchStore(store)
    train = only_one_mitosis(s, s.indices("train"))
    pos = train[s.label[train] == 1]
    neg = train[s.label[train] == 0]
    assert len(pos) >= 6 and len(neg) >= 4
    # Hand-set roles of training patches (store index -> role).
    roles = {int(neg[0]): "image_fp", int(pos[0]): "image_fn", int(pos[1]): "no_tp_peak_on",
             int(pos[2]): "no_tp_peak_away", int(pos[3]): "tp_and_fp"}
    return store, runs, roles, train


def _fake_scores(roles):
    """A stand-in for the teacher's scoring pass that returns the roles' hand-set outputs."""

    def score(model, store, indices, device, threshold, pixel_threshold, radius, batch_size, amp, workers, reporter):
        n = len(indices)
        probs = np.where(store.label[indices] == 1, 0.9, 0.1).astype(np.float32)
        tp = (store.label[indices] == 1).astype(np.int64)
        fp, fn = np.zeros(n, np.int64), np.zeros(n, np.int64)
        peak = store.label[indices] == 1
        dets = {}
        for j, k in enumerate(indices):
            role = roles.get(int(k))
            if role == "image_fp":
                probs[j], fp[j] = 0.9, 1
                dets[int(k)] = np.array([[10.0, 12.0]], np.float32)
            elif role == "image_fn":
                probs[j], tp[j], fn[j] = 0.2, 0, 1
            elif role == "no_tp_peak_on":
                tp[j], fn[j] = 0, 1
            elif role == "no_tp_peak_away":
                tp[j], fp[j], fn[j], peak[j] = 0, 1, 1, False
                dets[int(k)] = np.array([[3.0, 4.0]], np.float32)
            elif role == "tp_and_fp":
                fp[j] = 1
        return probs, tp, fp, fn, dets, peak

    return score


def _distill(monkeypatch, setup, name, *extra):
    import uts_cli.api.distill as dist

    store, runs, roles, _ = setup
    monkeypatch.setattr(dist, "_load_teacher", lambda run, device: None)
    monkeypatch.setattr(dist, "_score_teacher", _fake_scores(roles))
    r = runner.invoke(app, ["distill", "--teacher", "t", "--name", name, "--runs-dir", str(runs), "--workers", "0",
                            "--device", "cpu", "--steps-per-epoch", "2", "--json", *extra], env=ENV)
    assert r.exit_code == 0, r.stderr
    out = runs / name / "distill"
    with open(out / "removed.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == "train"]
    return json.loads(r.stdout), rows, np.load(out / "kept_train.npy"), roles


@pytest.mark.parametrize("criterion, removed", [
    ("TP", {"image_fp": "image_fp", "image_fn": "image_fn", "no_tp_peak_on": "no_tp", "no_tp_peak_away": "no_tp"}),
    # FP and FP_TP train a student each like the others; the unit tests of decide() cover their rule
    # in the default suite.
    pytest.param("FP", {"image_fp": "image_fp", "image_fn": "image_fn", "no_tp_peak_away": "has_fp",
                        "tp_and_fp": "has_fp"}, marks=pytest.mark.slow),
    pytest.param("FP_TP", {"image_fp": "image_fp", "image_fn": "image_fn", "no_tp_peak_on": "not_perfect",
                           "no_tp_peak_away": "not_perfect", "tp_and_fp": "not_perfect"}, marks=pytest.mark.slow),
    ("PEAK", {"image_fp": "image_fp", "image_fn": "image_fn", "no_tp_peak_away": "no_tp_peak_away"}),
])
def test_each_filter_removes_exactly_its_patches(monkeypatch, setup, criterion, removed):
    doc, rows, kept, roles = _distill(monkeypatch, setup, f"s-{criterion.lower()}", "--filter", criterion)
    by_role = {roles[int(r["patch"])]: r for r in rows}
    assert {role: r["reason"] for role, r in by_role.items()} == removed
    assert all(r["action"] == "removed" for r in rows)
    train = setup[3]
    assert doc["n_train_kept"] == len(kept) == len(train) - len(removed)
    assert not set(int(r["patch"]) for r in rows) & set(kept.tolist())
    # The review row carries the teacher's detections in image coordinates.
    fp_row = by_role["image_fp"]
    assert fp_row["teacher_detections_yx"] == f"{10 + int(fp_row['patch_y'])}.0,{12 + int(fp_row['patch_x'])}.0"


def test_pseudolabel_relabels_instead_of_removing(monkeypatch, setup):
    doc, rows, kept, roles = _distill(monkeypatch, setup, "s-pseudo", "--pseudolabel")
    assert doc["pseudolabel"] is True and doc["n_train_kept"] == len(kept) == len(setup[3])
    actions = {roles[int(r["patch"])]: (r["reason"], r["action"]) for r in rows}
    assert actions == {"image_fp": ("image_fp", "relabelled"), "image_fn": ("image_fn", "relabelled"),
                       "no_tp_peak_on": ("no_tp", "relabelled"), "no_tp_peak_away": ("no_tp", "relabelled")}
    # The student trained on the teacher's labels: the image-level disagreements flipped.
    cfg = json.loads((setup[1] / "s-pseudo" / "config.json").read_text())
    assert cfg["distill"]["pseudolabel"] is True


def test_keep_negatives_keeps_the_negative_the_teacher_calls_positive(monkeypatch, setup):
    doc, rows, kept, roles = _distill(monkeypatch, setup, "s-keepneg", "--keep-negatives")
    assert {roles[int(r["patch"])]: r["reason"] for r in rows} == {
        "image_fn": "image_fn", "no_tp_peak_on": "no_tp", "no_tp_peak_away": "no_tp"}
    image_fp = next(k for k, role in roles.items() if role == "image_fp")
    assert image_fp in kept.tolist() and doc["n_train_kept"] == len(setup[3]) - 3
    summary = json.loads((setup[1] / "s-keepneg" / "distill" / "summary.json").read_text())
    assert summary["keep_negatives"] is True
    assert json.loads((setup[1] / "s-keepneg" / "config.json").read_text())["distill"]["keep_negatives"] is True
