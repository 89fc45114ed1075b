"""teach -> distill -> eval through the CLI on a tiny store, and the engine commands' error paths."""
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import median_train_score, set_run_threshold, tiny_teach_args, train_tiny_teacher
from uts_cli.cli.app import app

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()
TINY = tiny_teach_args(steps_per_epoch=3)


@pytest.fixture(scope="module")
def _trained_once(tmp_path_factory):
    """A tiny store with clean truth and a teacher run trained on it (built once, never changed)."""
    store, runs, r = train_tiny_teacher(tmp_path_factory.mktemp("engine"), n_images=10, steps_per_epoch=3,
                                        extra=("--json",))
    return store, runs, json.loads(r.stdout)


@pytest.fixture
def trained(_trained_once, tmp_path):
    """Each test gets its own copy of the runs folder, so no test sees another's changes."""
    store, runs, doc = _trained_once
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    return store, copy, doc


def test_teach_writes_a_complete_run(trained):
    store, runs, doc = trained
    assert doc["ok"] and doc["status"] == "complete" and doc["epochs_done"] == 1
    run = runs / "t"
    for name in ("config.json", "history.csv", "history.png", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run / name).exists(), name
    cfg = json.loads((run / "config.json").read_text())
    for key in ("threshold", "pixel_threshold", "input_size", "pixel_size_um", "stain", "model"):
        assert key in cfg, key
    assert cfg["input_size"] == 64 and cfg["model"]["n_blocks"] == 1


def test_eval_reports_patch_region_and_image_level(trained, tmp_path):
    store, runs, _ = trained
    out = tmp_path / "ev"
    r = runner.invoke(app, ["eval", "t", "--runs-dir", str(runs), "--json", "--device", "cpu", "--overlays",
                            "-o", str(out)], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["truth"] == "clean" and doc["split"] == "test"
    for level in ("patch", "region", "image_level"):
        assert {"tp", "fp", "fn", "precision", "recall", "f1"} <= set(doc[level])
    header = (out / "matches.csv").read_text().splitlines()[0]
    assert header == "image,status,y,x,score,area,distance"
    assert list((out / "overlays").glob("*.png"))
    legacy = runner.invoke(app, ["eval", "t", "--runs-dir", str(runs), "--json", "--device", "cpu",
                                 "--matching", "legacy", "-o", str(tmp_path / "lg")], env=ENV)
    assert json.loads(legacy.stdout)["matching"] == "legacy"


def test_distill_pseudolabel_trains_a_student_and_writes_review_files(trained):
    store, runs, _ = trained
    set_run_threshold(runs / "t", median_train_score(runs / "t", store))  # both classes among its decisions
    r = runner.invoke(app, ["distill", "--teacher", "t", "--name", "s", "--runs-dir", str(runs), "--pseudolabel",
                            "--workers", "0", "--device", "cpu", "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["pseudolabel"] and doc["n_train_kept"] == doc["n_train_before"]
    student = runs / "s"
    assert (student / "checkpoints" / "best.pt").exists()
    cfg = json.loads((student / "config.json").read_text())
    assert cfg["command"] == "distill" and cfg["distill"]["pseudolabel"] is True
    assert cfg["config"]["n_blocks"] == 1  # inherited from the teacher
    rows = (student / "distill" / "removed.csv").read_text().splitlines()
    assert rows[0].startswith("patch,split,image")
    # At the median threshold the teacher calls half the patches positive, so some labels change.
    assert len(rows) > 1
    assert all(",relabelled," in row for row in rows[1:])
    assert sum(doc["removed_by_reason"].values()) == len(rows) - 1
    geo = list((student / "distill" / "geojson").glob("*.geojson"))
    assert geo and json.loads(geo[0].read_text())["type"] == "FeatureCollection"


def test_distill_refuses_when_teacher_rejects_almost_everything(trained):
    store, runs, _ = trained
    set_run_threshold(runs / "t", 1.01)  # every patch called negative: all positives are disagreements
    r = runner.invoke(app, ["distill", "--teacher", "t", "--name", "s2", "--runs-dir", str(runs), "--workers", "0",
                            "--device", "cpu"], env=ENV)
    assert r.exit_code == 3, r.stderr
    assert "too few to train a student" in r.stderr and "Hint:" in r.stderr
    assert "Traceback" not in r.stderr


def test_existing_run_needs_resume_or_overwrite(trained):
    store, runs, _ = trained
    r = runner.invoke(app, ["teach", str(store), "--name", "t", "--runs-dir", str(runs), *TINY], env=ENV)
    assert r.exit_code == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr


def test_resume_of_a_finished_run_extends_it(trained, tmp_path):
    store, _, _ = trained
    runs = tmp_path / "own-runs"
    args = ["teach", str(store), "--name", "r", "--runs-dir", str(runs), *TINY]
    assert runner.invoke(app, args, env=ENV).exit_code == 0
    more = [a if a != "1" or args[i - 1] != "--epochs" else "2" for i, a in enumerate(args)]
    r = runner.invoke(app, more + ["--resume", "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    epochs = [row["epoch"] for row in json.loads(r.stdout)["history"]]
    assert epochs == [1, 2]
    env = json.loads((runs / "r" / "env.json").read_text())
    assert len(env["resumed"]) == 1  # the first session's environment stays, the resume is added
    assert env["recorded_at"] <= env["resumed"][0]["recorded_at"]


def test_cuda_requested_without_cuda_is_resource_error(tiny_store, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    r = runner.invoke(app, ["teach", str(tiny_store), "--name", "x", "--runs-dir", str(tmp_path), "--device", "cuda",
                            "--weights", "none"], env=ENV)
    assert r.exit_code == 4
    assert "CUDA" in r.stderr and "--device cpu" in r.stderr


def test_unknown_run_and_run_without_checkpoint(tmp_path):
    r = runner.invoke(app, ["eval", "nope", "--runs-dir", str(tmp_path)], env=ENV)
    assert r.exit_code == 3 and "Error:" in r.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    r = runner.invoke(app, ["eval", "empty", "--runs-dir", str(tmp_path), "--device", "cpu"], env=ENV)
    assert r.exit_code == 3 and "Error:" in r.stderr
    r = runner.invoke(app, ["distill", "--teacher", "empty", "--name", "s", "--runs-dir", str(tmp_path)], env=ENV)
    assert r.exit_code == 3 and "Error:" in r.stderr


def test_store_from_another_schema_is_refused(tiny_store, tmp_path):
    import h5py

    with h5py.File(tiny_store, "r+") as f:
        f.attrs["schema_version"] = 2
    r = runner.invoke(app, ["teach", str(tiny_store), "--name", "x", "--runs-dir", str(tmp_path),
                            "--weights", "none"], env=ENV)
    assert r.exit_code == 3 and "schema version 2" in r.stderr


def test_imagenet_weights_unavailable_offline_is_explained(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    r = runner.invoke(app, ["teach", str(tiny_store), "--name", "x", "--runs-dir", str(tmp_path), "--device", "cpu",
                            "--weights", "imagenet"], env=ENV)
    assert r.exit_code == 4
    assert "--weights none" in r.stderr or "--weights PATH" in r.stderr


def test_eval_metric_values_on_a_controlled_cam(trained, tmp_path, monkeypatch):
    """Predictions replaced by a hand-made CAM, so every count is known in advance.

    The test image c9/f0 (128 px, four 64 px patches) has clean-truth mitoses at (49.9, 69.7)
    and (74.1, 101.6). The CAM holds one blob on the first point (a true positive), one at
    (110, 15), far from both (a false positive), and nothing near the second (a false negative):
    region level TP 1, FP 1, FN 1, so P = R = F1 = 0.5. The blobs fall in patches (0, 64) and
    (64, 0), the points in (0, 64) and (64, 64): the patch level is also TP 1, FP 1, FN 1. Patch
    probabilities 0.1, 0.9, 0.9, 0.1 against an image threshold of 0.5 call patches (0, 64) and
    (64, 0) positive, while (0, 64) and (64, 64) hold mitoses: image level TP 1, FP 1, FN 1.
    """
    import uts_cli.model.predict as predict
    from uts_cli.io.store import PatchStore

    store_path, runs, _ = trained
    set_run_threshold(runs / "t", 0.5)
    s = PatchStore(store_path)
    test = s.indices("test")
    assert s.image_ids[s.image_idx[test[0]]] == "c9/f0" and s.origin[test].tolist() == [[0, 0], [0, 64], [64, 0], [64, 64]]
    np.testing.assert_allclose(s.image_points(9, truth=True, kind=0), [[49.9, 69.7], [74.1, 101.6]], atol=0.5)
    field = np.zeros((128, 128), np.float32)
    yy, xx = np.mgrid[:128, :128]
    for y, x in ((50, 70), (110, 15)):
        field[(yy - y) ** 2 + (xx - x) ** 2 <= 9] = 0.9
    cams = np.stack([field[y:y + 64, x:x + 64] for y, x in s.origin[test]])
    probs = np.array([0.1, 0.9, 0.9, 0.1], np.float32)

    def fake_predict(model, store, indices, device, **kwargs):
        order = [list(test).index(k) for k in indices]
        yield predict.PredictionBatch(np.asarray(indices), probs[order], s.label[indices], cams[order])

    monkeypatch.setattr(predict, "predict_patches", fake_predict)
    r = runner.invoke(app, ["eval", "t", "--runs-dir", str(runs), "--json", "--device", "cpu", "--threshold", "0.5",
                            "--radius-px", "10", "-o", str(tmp_path / "ev")], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    for level in ("region", "patch", "image_level"):
        c = doc[level]
        assert (c["tp"], c["fp"], c["fn"]) == (1, 1, 1), (level, c)
        assert c["precision"] == pytest.approx(0.5) and c["recall"] == pytest.approx(0.5)
        assert c["f1"] == pytest.approx(0.5)
    rows = (tmp_path / "ev" / "matches.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",")[1] for row in rows) == ["FN", "FP", "TP"]
