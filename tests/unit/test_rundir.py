import json
from pathlib import Path

import pytest
import torch

from uts_cli.config import SCHEMA_VERSION
from uts_cli.errors import InputDataError, UsageError
from uts_cli.io.rundir import HISTORY_FIELDS, RunDir
from uts_cli.plots import plot_history


def test_create_refuses_existing_run_without_overwrite(tmp_path):
    run = RunDir(tmp_path / "r").create()
    run.write_config({"a": 1})
    with pytest.raises(UsageError) as err:
        RunDir(tmp_path / "r").create()
    assert err.value.exit_code == 2 and "--resume" in err.value.hint and "--overwrite" in err.value.hint
    RunDir(tmp_path / "r").create(overwrite=True)
    assert not (tmp_path / "r" / "config.json").exists()
    assert (tmp_path / "r").is_dir() and not any((tmp_path / "r").iterdir())


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match="does not look like"):
        RunDir(tmp_path / "home").create(overwrite=True)
    assert (tmp_path / "home" / "thesis.tex").exists()
    RunDir(tmp_path / "empty").create()  # new or empty is fine
    RunDir(tmp_path / "empty").create()


def test_open_existing_errors(tmp_path):
    with pytest.raises(InputDataError) as err:
        RunDir(tmp_path / "nope").open_existing()
    assert err.value.exit_code == 3 and err.value.hint
    (tmp_path / "bare").mkdir()
    with pytest.raises(InputDataError, match="no config.json"):
        RunDir(tmp_path / "bare").open_existing()


def test_config_and_metrics_json(tmp_path):
    run = RunDir(tmp_path / "r").create()
    run.write_config({"b": 2, "a": [1, 2]})
    assert run.read_config() == {"a": [1, 2], "b": 2, "schema_version": SCHEMA_VERSION}
    assert json.loads(run.config_path.read_text()) == {"a": [1, 2], "b": 2, "schema_version": SCHEMA_VERSION}
    run.write_metrics({"status": "complete"})
    assert run.read_metrics()["status"] == "complete"
    assert run.open_existing().path == run.path


def test_history_append_read_truncate(tmp_path):
    run = RunDir(tmp_path / "r").create()
    assert run.read_history() == []
    for e in (1, 2, 3):
        run.append_history({"epoch": e, "train_loss": 1.0 / e, "val_f1": None, "lr": 1e-4})
    rows = run.read_history()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[1]["train_loss"] == 0.5 and rows[0]["val_f1"] is None and rows[0]["timestamp"]
    assert run.history_path.read_text().splitlines()[0] == ",".join(HISTORY_FIELDS)
    assert run.truncate_history(2) == 2
    assert [r["epoch"] for r in run.read_history()] == [1, 2]
    with pytest.raises(ValueError):
        run.append_history({"epoch": 3, "bogus": 1})


def test_checkpoint_round_trip_and_errors(tmp_path):
    run = RunDir(tmp_path / "r").create()
    with pytest.raises(InputDataError) as err:
        run.load_checkpoint("last")
    assert "--resume" in err.value.hint
    state = {"format": "uts-checkpoint", "version": 1, "model": {"w": torch.arange(3.0)}, "epoch": 2,
             "rng": torch.get_rng_state(), "params": {"lr": 1e-4, "size": (1, 2)}, "val_f1": None}
    path = run.save_checkpoint("last", state)
    assert path == run.checkpoint_path("last") and not list(run.checkpoint_dir.glob("*.tmp"))
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0)) and loaded["epoch"] == 2
    assert run.load_checkpoint("last")["params"]["lr"] == 1e-4
    run.checkpoint_path("best").write_bytes(b"garbage")
    with pytest.raises(InputDataError, match="cannot load"):
        run.load_checkpoint("best")
    torch.save({"x": 1}, run.checkpoint_path("best"))
    with pytest.raises(InputDataError, match="not a uts checkpoint"):
        run.load_checkpoint("best")
    with pytest.raises(InputDataError, match="run directory not found"):
        RunDir(tmp_path / "missing").load_checkpoint("best")


def test_log_appends_lines(tmp_path):
    run = RunDir(tmp_path / "r").create()
    run.log("first")
    run.log("second")
    lines = run.log_path.read_text().splitlines()
    assert len(lines) == 2 and lines[1].endswith("second")


def test_plot_history(tmp_path):
    run = RunDir(tmp_path / "r").create()
    for e in (1, 2):
        run.append_history({"epoch": e, "train_loss": 0.7 / e, "loss_ce": 0.7 / e, "val_loss": 0.6,
                            "val_f1": 0.5 + 0.1 * e, "val_precision": 0.5, "val_recall": 0.9})
    out = plot_history(run.history_path, run.path / "history.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(InputDataError):
        plot_history(tmp_path / "none.csv", tmp_path / "x.png")


def test_resolve_run_and_run_names(tmp_path):
    from uts_cli.errors import UsageError
    from uts_cli.io.rundir import check_run_name, resolve_run

    assert resolve_run("t1", tmp_path) == tmp_path / "t1"
    assert resolve_run("other/t1", tmp_path) == Path("other/t1")
    assert resolve_run(tmp_path / "abs", "runs") == tmp_path / "abs"
    check_run_name("teacher-1.b")
    for bad in ("", ".hidden", "a/b", "a b"):
        with pytest.raises(UsageError):
            check_run_name(bad)


def test_unknown_checkpoint_name_is_a_usage_error(tmp_path):
    from uts_cli.errors import UsageError

    with pytest.raises(UsageError, match="unknown checkpoint 'middle'") as info:
        RunDir(tmp_path / "r").checkpoint_path("middle")
    assert "best" in info.value.hint and "last" in info.value.hint


def test_collect_env_names_the_software_and_machine():
    from uts_cli.io.rundir import collect_env

    env = collect_env()
    for key in ("python", "platform", "torch", "torchvision", "torchstain", "cuda", "cudnn", "gpu", "threads",
                "hostname"):
        assert key in env, key
    assert env["threads"] >= 1 and env["python"].count(".") == 2 and env["hostname"]


def test_run_log_reporter_writes_info_lines_and_forwards_everything(tmp_path):
    from uts_cli.io.rundir import RunLogReporter

    seen = []

    class Inner:
        def start(self, d, t): seen.append(("start", d, t))
        def advance(self, n=1, **m): seen.append(("advance", n))
        def finish(self): seen.append(("finish",))
        def log(self, m): seen.append(("log", m))
        def warn(self, m): seen.append(("warn", m))

    run = RunDir(tmp_path / "r").create()
    rep = RunLogReporter(Inner(), run)
    rep.log("epoch 1: loss 0.5")
    rep.start("teacher scores", 10)
    rep.advance(4)
    rep.advance(6)
    rep.finish()
    rep.warn("careful")
    lines = [line.split(" ", 1)[1] for line in run.log_path.read_text().splitlines()]
    assert lines == ["epoch 1: loss 0.5", "teacher scores: 10/10", "WARNING: careful"]
    assert [s[0] for s in seen] == ["log", "start", "advance", "advance", "finish", "warn"]


def test_disk_full_in_the_atomic_writer_is_a_resource_error_naming_the_file(tmp_path, monkeypatch):
    import errno
    import os

    from uts_cli.errors import ResourceError
    from uts_cli.io import atomic

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    target = tmp_path / "r" / "metrics.json"
    with pytest.raises(ResourceError) as info:
        atomic.atomic_write_json(target, {"a": 1})
    assert str(target) in info.value.message and "free space" in info.value.hint
    assert not target.exists() and not list(target.parent.glob("*.tmp"))


def test_config_from_a_newer_uts_is_refused(tmp_path):
    import pytest

    from uts_cli.errors import InputDataError

    run = RunDir(tmp_path / "r").create()
    run.config_path.write_text(json.dumps({"schema_version": 7, "uts_version": "9.0"}))
    with pytest.raises(InputDataError, match="schema version 7"):
        run.read_config()
    run.config_path.write_text(json.dumps({"command": "teach"}))  # before the field existed
    assert run.read_config()["command"] == "teach"


def test_restart_reuses_an_early_killed_run_but_not_a_foreign_folder(tmp_path):
    import pytest

    from uts_cli.errors import UsageError

    run = RunDir(tmp_path / "r").create()
    run.write_config({"command": "teach"})
    run.append_history({"epoch": 1, "train_loss": 0.5})
    assert run.restart().read_history() == []
    assert RunDir(tmp_path / "new").restart().path.is_dir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    with pytest.raises(UsageError, match="does not look like a uts run"):
        RunDir(tmp_path / "mine").restart()


def test_a_resume_adds_its_environment_and_keeps_the_first(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    run.write_env({"torch": "2.4", "hostname": "a"})
    run.add_resumed_env({"torch": "2.5", "hostname": "b"})
    run.add_resumed_env({"torch": "2.6", "hostname": "c"})
    env = json.loads(run.env_path.read_text())
    assert (env["torch"], env["hostname"]) == ("2.4", "a")
    assert [e["hostname"] for e in env["resumed"]] == ["b", "c"]


def test_a_resume_without_a_readable_env_writes_its_own(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    run.env_path.write_text("{not json")
    run.add_resumed_env({"hostname": "b"})
    assert json.loads(run.env_path.read_text()) == {"hostname": "b"}
