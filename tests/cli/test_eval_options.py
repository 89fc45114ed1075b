"""`uts eval` options on hand-set CAMs: --threshold, --radius-um, --checkpoint last, --bn-adapt.

The network is replaced by maps with a known blob on (or next to) every true mitosis and one
weak decoy per patch, so each option's effect on the counts is known exactly.
"""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_tiny_store
from uts_cli.cli.app import app
from uts_cli.io.rundir import RunDir
from uts_cli.io.store import PatchStore
from uts_cli.model.predict import PredictionBatch

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()
SHIFT = 10.0     # every blob sits 10 px (2.5 um at 0.25 um/px) to the right of its mitosis
DECOY = 0.3      # one weak blob per patch, far from the mitoses


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalopts")
    store = write_tiny_store(root / "tiny.h5", n_images=12, seed=2, with_truth=True)
    run = RunDir(root / "runs" / "r").create()
    run.write_config({"schema_version": 2, "config": {"store": str(store)}, "threshold": 0.5,
                      "pixel_threshold": 0.5, "input_size": 64, "stain": {"method": None}})
    s = PatchStore(store)
    n_true = sum(len(s.image_points(int(i), truth=True)) for i in np.unique(s.image_idx[s.indices("test")]))
    assert n_true >= 2
    return root / "runs", s, n_true


def _maps(store, indices):
    p = store.patch_size
    yy, xx = np.mgrid[:p, :p].astype(np.float32)
    out = np.zeros((len(indices), p, p), np.float32)
    for j, k in enumerate(indices):
        yx, kind = store.truth_for(int(k))
        pts = yx[kind == 0]
        for y, x in pts:
            out[j] = np.maximum(out[j], 0.8 * np.exp(-((yy - y) ** 2 + (xx - x - SHIFT) ** 2) / 8.0))
        cy, cx = next(c for c in ((8, 8), (8, p - 8), (p - 8, 8), (p - 8, p - 8), (p / 2, p / 2))
                      if all(np.hypot(c[0] - y, c[1] - x - SHIFT) > 16 for y, x in pts))
        out[j] = np.maximum(out[j], DECOY * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0))
    return out


@pytest.fixture
def patched(monkeypatch, fake_run):
    """Replace the checkpoint load and the network pass; record what eval asked for."""
    import uts_cli.model.predict as predict

    calls = {}

    def load(run, which="best", device="cpu"):
        calls["checkpoint"] = which
        return None, {"threshold": 0.5, "epoch": 1}

    def patches(model, store, indices, device, batch_size=32, want_cam=False, bn_adapt=False, workers=0, **kw):
        calls["bn_adapt"] = bn_adapt
        indices = np.asarray(indices)
        for i in range(0, len(indices), batch_size):
            idx = indices[i:i + batch_size]
            yield PredictionBatch(idx, np.full(len(idx), 0.9, np.float32), store.label[idx].astype(np.float32),
                                  _maps(store, idx))

    monkeypatch.setattr(predict, "load_run_model", load)
    monkeypatch.setattr(predict, "predict_patches", patches)
    return calls


def _eval(runs, *extra):
    r = runner.invoke(app, ["eval", "r", "--runs-dir", str(runs), "--json", "--device", "cpu", "--batch-size", "5",
                            *extra], env=ENV)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_threshold_option_overrides_the_runs_pixel_threshold(fake_run, patched):
    runs, store, n_true = fake_run
    default = _eval(runs, "--radius-px", "15")
    assert default["threshold"] == 0.5 and default["region"]["fp"] == 0 and default["region"]["tp"] == n_true
    low = _eval(runs, "--radius-px", "15", "--threshold", "0.2")
    assert low["threshold"] == 0.2
    n_patches = low["n_patches"]
    assert low["region"]["tp"] == n_true and low["region"]["fp"] == n_patches   # every decoy now counts
    high = _eval(runs, "--radius-px", "15", "--threshold", "0.9")
    assert high["region"]["tp"] == 0 and high["region"]["fn"] == n_true


def test_radius_um_converts_with_the_pixel_size(fake_run, patched):
    runs, store, n_true = fake_run
    near = _eval(runs, "--radius-um", "1.5")         # 6 px < the 10 px offset: every blob misses
    assert near["radius_px"] == pytest.approx(6.0) and near["region"]["tp"] == 0 and near["region"]["fn"] == n_true
    far = _eval(runs, "--radius-um", "3.75")         # 15 px
    assert far["radius_px"] == pytest.approx(15.0) and far["region"]["tp"] == n_true
    r = runner.invoke(app, ["eval", "r", "--runs-dir", str(runs), "--radius-um", "3", "--radius-px", "12",
                            "--device", "cpu"], env=ENV)
    assert r.exit_code == 2 and "exclude each other" in r.stderr


def test_checkpoint_and_bn_adapt_reach_the_model(fake_run, patched):
    runs, _, _ = fake_run
    _eval(runs)
    assert patched == {"checkpoint": "best", "bn_adapt": False}
    _eval(runs, "--checkpoint", "last", "--bn-adapt")
    assert patched == {"checkpoint": "last", "bn_adapt": True}
    r = runner.invoke(app, ["eval", "r", "--runs-dir", str(runs), "--checkpoint", "first", "--device", "cpu"], env=ENV)
    assert r.exit_code == 2


def test_checkpoint_last_and_bn_adapt_on_a_trained_run(tmp_path):
    """The real path: a trained run's last.pt is loaded and BN adaptation runs (no mocks)."""
    store = write_tiny_store(tmp_path / "tiny.h5", n_images=6, with_truth=True)
    runs = tmp_path / "runs"
    r = runner.invoke(app, ["teach", str(store), "--name", "r", "--runs-dir", str(runs), "--weights", "none",
                            "--n-blocks", "1", "--epochs", "2", "--batch-size", "4", "--steps-per-epoch", "1",
                            "--workers", "0", "--device", "cpu"], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = _eval(runs, "--checkpoint", "last", "--bn-adapt")
    assert doc["n_patches"] > 0 and set(doc["region"]) >= {"tp", "fp", "fn", "f1"}
