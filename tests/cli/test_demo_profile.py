"""`uts demo --profile`: the profile sets the training length, explicit options win (api mocked)."""
import json

import pytest
from typer.testing import CliRunner

from uts_cli.api import demo as demo_api
from uts_cli.cli.app import app
from uts_cli.errors import UsageError

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()


@pytest.fixture
def captured(monkeypatch, tmp_path):
    seen = {}

    def fake_demo(cfg, reporter=None):
        seen["cfg"] = cfg
        counts = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 1, "fp": 0, "fn": 0}
        model = {"run": "r", "threshold": 0.5, "region": counts, "patch": counts, "image_level": counts}
        return demo_api.DemoResult(workdir=tmp_path, store=tmp_path / "s.h5", teacher=model, student=model,
                                   distill={"n_train_kept": 1, "n_train_before": 2, "removed_true_lookalikes": 1,
                                            "removed_true_mitoses": 0}, seconds=1.0,
                                   test_set={"held_out": cfg.heldout_cases > 0, "cases": cfg.heldout_cases,
                                             "fields": 4 * cfg.heldout_cases, "mitoses": 7})

    monkeypatch.setattr(demo_api, "demo", fake_demo)
    return seen


@pytest.mark.parametrize("args, expected", [
    ([], demo_api.PROFILES["default"]),
    (["--profile", "full"], demo_api.PROFILES["full"]),
    (["--profile", "full", "--epochs", "3"], {**demo_api.PROFILES["full"], "epochs": 3}),
    (["--heldout-cases", "0"], {**demo_api.PROFILES["default"], "heldout_cases": 0}),
    (["--width", "64"], {**demo_api.PROFILES["default"], "width": 64}),
    (["--profile", "full", "--n-cases", "48", "--steps-per-epoch", "50"],
     {**demo_api.PROFILES["full"], "n_cases": 48, "steps_per_epoch": 50}),
])
def test_profile_sets_the_training_length(captured, tmp_path, args, expected):
    r = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "w"), "--json", *args], env=ENV)
    assert r.exit_code == 0, r.stderr
    cfg = captured["cfg"]
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.profile == (args[1] if args[:1] == ["--profile"] else "default")
    assert cfg.heldout_cases == expected.get("heldout_cases", 20)
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["test_set"]["cases"] == cfg.heldout_cases


def test_table_names_what_was_scored(captured, tmp_path):
    r = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "w")], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert "held-out test set (20 cases, 80 fields, 7 mitoses)" in " ".join(r.stdout.split())
    r = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "w"), "--heldout-cases", "0"], env=ENV)
    assert r.exit_code == 0 and "test split (0 fields)" in " ".join(r.stdout.split())


def test_unknown_profile():
    with pytest.raises(UsageError, match="unknown demo profile"):
        demo_api.profile_config("huge")
    r = runner.invoke(app, ["demo", "--profile", "huge"], env=ENV)
    assert r.exit_code == 2


def test_too_few_cases_is_a_usage_error(captured, tmp_path):
    r = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "w"), "--n-cases", "5"], env=ENV)
    assert r.exit_code == 2 and "cfg" not in captured


def test_demo_dataset_size_reaches_the_renderer():
    """The demo's 192 cases hold 32 val and 32 test cases; the renderer's own default (12) adds no options."""
    assert demo_api.DemoConfig().n_cases == 192 == demo_api.PROFILES["default"]["n_cases"]
    assert demo_api._case_options(192) == {"n_cases": 192, "val_cases": 32, "test_cases": 32}
    assert demo_api._case_options(96) == {"n_cases": 96, "val_cases": 16, "test_cases": 16}
    assert demo_api._case_options(48) == {"n_cases": 48, "val_cases": 8, "test_cases": 8}
    assert demo_api._case_options(24) == {"n_cases": 24, "val_cases": 4, "test_cases": 4}
    assert demo_api._case_options(12) == {}
    assert demo_api._case_options(6) == {"n_cases": 6, "val_cases": 2, "test_cases": 2}


def test_demo_teacher_gets_the_stability_options_the_location_loss_and_trimming(tmp_path):
    cfg = demo_api.profile_config("default", workdir=tmp_path)
    t = demo_api.teacher_config(cfg, tmp_path / "s.h5", "t", tmp_path / "runs")
    assert {k: getattr(t, k) for k in demo_api.STABILITY_OPTIONS} == demo_api.STABILITY_OPTIONS
    assert t.location == "l2" and demo_api.DEMO_TEACH_OPTIONS["location"] == "l2"
    assert t.trim_positives == demo_api.DEMO_TEACH_OPTIONS["trim_positives"] == 0.25
    assert (t.n_blocks, t.width, t.weights, t.epochs, t.steps_per_epoch) == (2, 32, "none", 8, 200)
    # The full profile: twice the cases and steps at the same width; a teach option given to the demo still wins.
    full = demo_api.profile_config("full", workdir=tmp_path)
    t = demo_api.teacher_config(full, tmp_path / "s.h5", "t", tmp_path / "runs")
    assert (t.width, t.steps_per_epoch, full.n_cases, full.heldout_cases) == (32, 400, 384, 40)
    assert demo_api.teacher_config(cfg, tmp_path / "s.h5", "t", tmp_path / "runs", width=16).width == 16
    t = demo_api.teacher_config(cfg, tmp_path / "s.h5", "t", tmp_path / "runs", ema_decay=0.0)
    assert t.ema_decay == 0.0


def test_demo_dataset_options_reach_prepare_and_name_the_store(tmp_path, monkeypatch):
    import uts_cli.api.normalize as normalize_api
    import uts_cli.api.prepare as prepare_api

    seen = []
    monkeypatch.setattr(prepare_api, "prepare", lambda cfg, reporter=None: seen.append(cfg))
    monkeypatch.setattr(normalize_api, "normalize", lambda cfg, reporter=None: None)
    default = demo_api.demo_store(demo_api.profile_config("default", workdir=tmp_path))
    assert default.name == "synthetic-s0-c192-p128-norm.h5"  # no options: the names of before
    assert seen[-1].dataset_options == {"seed": 0, "n_cases": 192, "val_cases": 32, "test_cases": 32}
    looks = {"lookalikes_per_field": 5.0, "nucleus_density": 1.5, "stain_spread": 2.0}
    cfg = demo_api.profile_config("default", workdir=tmp_path, seed=1, n_cases=24, dataset_options=looks)
    store = demo_api.demo_store(cfg)
    assert store.name == "synthetic-s1-c24-stain2-nuc1.5-look5-p128-norm.h5"
    assert seen[-1].root.name == "synthetic-s1-c24-stain2-nuc1.5-look5"
    assert seen[-1].dataset_options == {"seed": 1, "n_cases": 24, "val_cases": 4, "test_cases": 4, **looks}
    assert demo_api._look_suffix({"stain_spread": 0.0}) == "-stain0"
    assert demo_api._look_suffix({"nucleus_density": 0.75, "stain_spread": None}) == "-nuc0.75"
    with pytest.raises(UsageError, match="seed"):
        demo_api.demo_store(demo_api.profile_config("default", workdir=tmp_path, dataset_options={"seed": 3}))
