"""teach's --augment/--no-augment and the --use-truth research flag: recorded, effective, and checked."""
import json

import pytest
from typer.testing import CliRunner

from conftest import write_tiny_store
from uts_cli.cli.app import app
from uts_cli.config import SCHEMA_VERSION

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()
TINY = ["--weights", "none", "--n-blocks", "1", "--epochs", "1", "--batch-size", "4", "--steps-per-epoch", "3",
        "--workers", "0", "--device", "cpu", "--lr", "1e-3", "--location", "lb", "--seed", "1"]


def _teach(store, runs, name, *extra):
    return runner.invoke(app, ["teach", str(store), "--name", name, "--runs-dir", str(runs), "--json", *TINY,
                               *extra], env=ENV)


def _teach_ok(store, runs, name, *extra) -> dict:
    """A tiny run that must finish; its config.json."""
    r = _teach(store, runs, name, *extra)
    assert r.exit_code == 0, r.stderr
    return json.loads((runs / name / "config.json").read_text())


def test_no_augment_and_use_truth_are_recorded(tmp_path):
    store = write_tiny_store(tmp_path / "s.h5", with_truth=True)
    runs = tmp_path / "runs"
    cfg = _teach_ok(store, runs, "t", "--no-augment", "--use-truth")
    assert cfg["schema_version"] == SCHEMA_VERSION
    assert cfg["config"]["augment"] is False and cfg["config"]["use_truth"] is True


@pytest.mark.slow
def test_no_augment_changes_the_training(tmp_path):
    store = write_tiny_store(tmp_path / "s.h5", with_truth=True)
    runs = tmp_path / "runs"
    for name, extra in (("aug", ()), ("noaug", ("--no-augment",))):
        r = _teach(store, runs, name, *extra)
        assert r.exit_code == 0, r.stderr
    # Same seed, same batches: only the augmentation differs, so the losses must too.
    aug = json.loads((runs / "aug" / "metrics.json").read_text())["final"]
    noaug = json.loads((runs / "noaug" / "metrics.json").read_text())["final"]
    assert aug["n_train_samples"] == noaug["n_train_samples"]
    assert aug["train_loss"] != noaug["train_loss"]


def test_use_truth_is_refused_where_it_would_do_nothing(tmp_path):
    plain = write_tiny_store(tmp_path / "plain.h5")
    runs = tmp_path / "runs"
    r = _teach(plain, runs, "a", "--use-truth")
    assert r.exit_code == 2 and "clean truth" in r.stderr and "plain.h5" in r.stderr
    assert not (runs / "a").exists()
    truth = write_tiny_store(tmp_path / "truth.h5", with_truth=True)
    args = [a for a in TINY if a not in ("--location", "lb")]
    r = runner.invoke(app, ["teach", str(truth), "--name", "b", "--runs-dir", str(runs), "--use-truth", *args],
                      env=ENV)
    assert r.exit_code == 2 and "needs a location loss" in r.stderr
    assert not (runs / "b").exists()


def test_a_run_from_a_newer_uts_is_refused_with_exit_3(tmp_path):
    store = write_tiny_store(tmp_path / "s.h5", with_truth=True)
    runs = tmp_path / "runs"
    assert _teach(store, runs, "t").exit_code == 0
    cfg_path = runs / "t" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["schema_version"] = SCHEMA_VERSION + 1
    cfg_path.write_text(json.dumps(cfg))
    commands = [
        ["eval", "t", "--runs-dir", str(runs), "--device", "cpu"],
        ["teach", str(store), "--name", "t", "--runs-dir", str(runs), "--resume", *TINY],
        ["distill", "--teacher", "t", "--name", "s", "--runs-dir", str(runs), "--device", "cpu", "--workers", "0"],
    ]
    for args in commands:
        r = runner.invoke(app, args, env=ENV)
        assert r.exit_code == 3, (args[0], r.stderr)
        assert "config.json" in r.stderr and "upgrade uts" in r.stderr, args[0]
    assert not (runs / "s").exists()


def test_pixel_threshold_localization_is_chosen_by_the_region_sweep(tmp_path):
    from uts_cli.model.validate import SWEEP

    store = write_tiny_store(tmp_path / "s.h5", n_images=8, with_truth=True)
    runs = tmp_path / "runs"
    r = _teach(store, runs, "loc", "--epochs", "2")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    cfg = json.loads((runs / "loc" / "config.json").read_text())
    best = json.loads((runs / "loc" / "metrics.json").read_text())["best_epoch"]
    row = [h for h in (runs / "loc" / "history.csv").read_text().splitlines()]
    header = row[0].split(",")
    values = dict(zip(header, row[best].split(",")))
    # The defaults: the checkpoint chosen by the localization F1, the pixel threshold from its sweep.
    assert cfg["config"]["select"] == "localization" and cfg["pixel_threshold_mode"] == "localization"
    assert cfg["pixel_threshold"] in SWEEP and cfg["pixel_threshold"] == float(values["val_loc_threshold"])
    assert cfg["pixel_threshold_val_f1"] == pytest.approx(float(values["val_loc_f1"]))
    assert doc["pixel_threshold"] == cfg["pixel_threshold"] and doc["select"] == "localization"
    assert isinstance(cfg["pixel_threshold_at_edge"], bool)
    assert cfg["pixel_threshold_sweep"] == [float(SWEEP[0]), float(SWEEP[-1])]

    r = _teach(store, runs, "img", "--pixel-threshold", "image", "--select", "image")
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((runs / "img" / "config.json").read_text())
    assert cfg["pixel_threshold"] == cfg["threshold"] and cfg["pixel_threshold_at_edge"] is False


def test_a_threshold_at_the_edge_of_the_sweep_is_reported(tmp_path, monkeypatch):
    import uts_cli.model.fit as fit_module

    real = fit_module.region_sweep
    # A one-value sweep: whatever it picks is at its edge.
    monkeypatch.setattr(fit_module, "region_sweep", lambda *a, **kw: real(*a, **{**kw, "thresholds": [0.5]}))
    store = write_tiny_store(tmp_path / "s.h5", with_truth=True)
    runs = tmp_path / "runs"
    r = _teach(store, runs, "edge")
    assert r.exit_code == 0, r.stderr
    assert "edge of the sweep" in r.stderr
    cfg = json.loads((runs / "edge" / "config.json").read_text())
    metrics = json.loads((runs / "edge" / "metrics.json").read_text())
    assert cfg["pixel_threshold"] == 0.5 and cfg["pixel_threshold_at_edge"] is True
    assert metrics["pixel_threshold_at_edge"] is True


def test_group_norm_and_gce_train_evaluate_and_are_checked(tmp_path):
    store = write_tiny_store(tmp_path / "s.h5", with_truth=True)
    runs = tmp_path / "runs"
    r = _teach(store, runs, "gn", "--norm", "group", "--image-loss", "gce", "--gce-q", "0.5")
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((runs / "gn" / "config.json").read_text())["config"]
    assert (cfg["norm"], cfg["image_loss"], cfg["gce_q"]) == ("group", "gce", 0.5)
    ev = runner.invoke(app, ["eval", str(runs / "gn"), "--store", str(store), "--json", "--device", "cpu",
                             "--workers", "0"], env=ENV)
    assert ev.exit_code == 0, ev.stderr
    ev = runner.invoke(app, ["eval", str(runs / "gn"), "--store", str(store), "--bn-adapt", "--device", "cpu",
                             "--workers", "0", "--output", str(tmp_path / "adapted")], env=ENV)
    assert ev.exit_code == 2 and "BatchNorm" in ev.stderr and "drop --bn-adapt" in ev.stderr
    assert not (tmp_path / "adapted").exists()
    # GroupNorm has no statistics to re-estimate or sync, and no ImageNet file fits it.
    for extra, message in ((("--bn-reestimate", "2"), "act on BatchNorm"),
                           (("--weights", "imagenet"), "ImageNet weights")):
        r = _teach(store, runs, "bad", "--norm", "group", *extra)
        assert r.exit_code == 2 and message in r.stderr, r.stderr
        assert not (runs / "bad").exists()


def test_narrow_network_trains_evaluates_and_is_checked(tmp_path):
    store = write_tiny_store(tmp_path / "s.h5", with_truth=True)
    runs = tmp_path / "runs"
    cfg = _teach_ok(store, runs, "w32", "--width", "32")
    assert cfg["config"]["width"] == 32 and cfg["model"]["width"] == 32
    ev = runner.invoke(app, ["eval", str(runs / "w32"), "--store", str(store), "--json", "--device", "cpu",
                             "--workers", "0"], env=ENV)
    assert ev.exit_code == 0, ev.stderr
    # The ImageNet file fits width 64 only; refused before a run folder exists.
    r = _teach(store, runs, "bad", "--width", "32", "--weights", "imagenet")
    assert r.exit_code == 2 and "ImageNet" in r.stderr and "--width 64" in r.stderr, r.stderr
    assert not (runs / "bad").exists()



def test_channels_last_is_the_default_and_no_channels_last_is_recorded(tmp_path):
    """NHWC on every device by default; --no-channels-last keeps a CPU run in NCHW (as before
    2026-12-03), and a config saved without the field loads as the old CUDA-only rule."""
    from uts_cli.config import TeachConfig

    store = write_tiny_store(tmp_path / "s.h5", with_truth=True)
    runs = tmp_path / "runs"
    for name, extra, expected in (("nhwc", (), True), ("nchw", ("--no-channels-last",), False)):
        saved = _teach_ok(store, runs, name, *extra)
        assert saved["config"]["channels_last"] is expected
        assert TeachConfig.from_dict(saved).channels_last is expected
    old = json.loads((runs / "nhwc" / "config.json").read_text())
    del old["config"]["channels_last"]
    assert TeachConfig.from_dict(old).channels_last is None


def test_channels_last_trains_nearly_as_nchw(tmp_path):
    """The memory format changes float rounding, not what is learned: same batches, losses alike."""
    store = write_tiny_store(tmp_path / "s.h5", with_truth=True)
    runs = tmp_path / "runs"
    losses = {}
    for name, extra in (("nhwc", ()), ("nchw", ("--no-channels-last",))):
        r = _teach(store, runs, name, *extra)
        assert r.exit_code == 0, r.stderr
        losses[name] = json.loads((runs / name / "metrics.json").read_text())["final"]["train_loss"]
    assert losses["nhwc"] == pytest.approx(losses["nchw"], rel=1e-3)
