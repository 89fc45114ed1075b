"""`uts distill`: options checked before the teacher is scored, exact resume, review files first,
and the resource errors (out of memory, full disk) of the training commands."""
import errno
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import median_train_score, set_run_threshold, tiny_teach_args, train_tiny_teacher, write_tiny_store
from uts_cli.cli.app import app

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()
TINY = tiny_teach_args()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny store and a trained teacher whose threshold splits its train scores in half."""
    store, runs, _ = train_tiny_teacher(tmp_path_factory.mktemp("distill"), n_images=6)
    set_run_threshold(runs / "t", median_train_score(runs / "t", store))  # both classes among its decisions
    return store, runs


def _distill(runs, name, *extra):
    return runner.invoke(app, ["distill", "--teacher", "t", "--name", name, "--runs-dir", str(runs),
                               "--workers", "0", "--device", "cpu", *extra], env=ENV)


def _no_scoring(monkeypatch):
    """Make loading or scoring the teacher fail loudly, so a test proves neither happened."""
    import uts_cli.api.distill as dist

    def boom(*args, **kwargs):
        raise AssertionError("the teacher was loaded or scored")

    monkeypatch.setattr(dist, "_load_teacher", boom)
    monkeypatch.setattr(dist, "_score_teacher", boom)


def test_teach_records_env_and_log(teacher):
    _, runs = teacher
    env = json.loads((runs / "t" / "env.json").read_text())
    for key in ("python", "platform", "torch", "torchvision", "torchstain", "cuda", "cudnn", "gpu", "threads",
                "hostname"):
        assert key in env, key
    assert env["device"] == "cpu"
    log = (runs / "t" / "log.txt").read_text()
    assert "teach started" in log and "epoch 1:" in log


@pytest.mark.parametrize("extra, message", [
    (["--name", "bad/name"], "invalid run name"),
    (["--radius-px", "0"], "--radius-px 0.0 must be positive"),
    (["--pixel-threshold", "bogus"], "'bogus' is not one of"),
    (["--weights", "no-such-file.pt"], "--weights must be"),
    (["--resume", "--overwrite"], "exclude each other"),
])
def test_bad_options_fail_before_the_teacher_is_loaded(teacher, monkeypatch, extra, message):
    _, runs = teacher
    _no_scoring(monkeypatch)
    args = ["distill", "--teacher", "t", "--runs-dir", str(runs), "--device", "cpu"]
    if "--name" not in extra:
        args += ["--name", "fresh"]
    r = runner.invoke(app, args + extra, env=ENV)
    assert r.exit_code == 2, r.stderr
    assert message in r.stderr
    # Typer rejects a bad choice itself (with its own usage text); the rest come with our hint.
    assert "Hint:" in r.stderr or "Invalid value" in r.stderr
    assert not (runs / "fresh").exists()


def test_existing_student_is_refused_before_scoring(teacher, monkeypatch):
    _, runs = teacher
    (runs / "taken").mkdir(parents=True)
    (runs / "taken" / "log.txt").write_text("x\n")
    _no_scoring(monkeypatch)
    r = _distill(runs, "taken")
    assert r.exit_code == 2
    assert "student run exists" in r.stderr and "--resume" in r.stderr and "--overwrite" in r.stderr
    r = _distill(runs, "t")
    assert r.exit_code == 2 and "replace its teacher" in r.stderr


def test_review_files_survive_an_interrupted_student_and_resume_reuses_the_scores(teacher, monkeypatch):
    import uts_cli.api.teach as teach_api

    _, runs = teacher
    real_train_run = teach_api.train_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(teach_api, "train_run", interrupted)
    r = _distill(runs, "s", "--pseudolabel")
    assert r.exit_code == 130 and "--resume" in r.stderr
    out = runs / "s" / "distill"
    for name in ("removed.csv", "summary.json", "teacher_scores.npz", "kept_train.npy", "kept_val.npy"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    kept = np.load(out / "kept_train.npy")
    assert summary["n_train_kept"] == len(kept) == summary["n_train_before"]  # pseudo-labels keep all
    with np.load(out / "teacher_scores.npz") as z:
        key = json.loads(str(z["key_json"]))
        assert len(key["score"]["teacher_checkpoint_sha256"]) == 64 and key["score"]["store_uuid"]
        assert len(z["train_probs"]) == len(z["train_indices"]) == summary["n_train_before"]
    removed = (out / "removed.csv").read_text().splitlines()
    assert removed[0].startswith("patch,split,image")
    assert len(removed) - 1 == sum(summary["removed_by_reason"].values())

    monkeypatch.setattr(teach_api, "train_run", real_train_run)
    _no_scoring(monkeypatch)
    r = _distill(runs, "s", "--pseudolabel", "--resume", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["reused_scores"] is True and doc["n_train_kept"] == len(kept)
    assert (runs / "s" / "checkpoints" / "best.pt").is_file()
    np.testing.assert_array_equal(np.load(out / "kept_train.npy"), kept)
    assert "reusing the teacher's scores" in (runs / "s" / "log.txt").read_text()

    # The student is trained now: other filter settings would no longer describe it.
    r = _distill(runs, "s", "--resume")
    assert r.exit_code == 2 and "other filter settings" in r.stderr


def test_out_of_memory_while_scoring_is_a_resource_error(teacher, monkeypatch):
    import torch

    import uts_cli.api.distill as dist

    _, runs = teacher

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dist, "_score_teacher", oom)
    r = _distill(runs, "oom")
    assert r.exit_code == 4, r.stderr
    assert "out of accelerator memory" in r.stderr and "--batch-size" in r.stderr
    assert "Traceback" not in r.stderr


def test_out_of_memory_in_a_training_step_is_a_resource_error(tmp_path, monkeypatch):
    from uts_cli.model import fit as train

    store = write_tiny_store(tmp_path / "s.h5")

    def oom(self, batch):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 1 GiB total)")

    monkeypatch.setattr(train._Trainer, "train_step", oom)
    r = runner.invoke(app, ["teach", str(store), "--name", "x", "--runs-dir", str(tmp_path / "runs"), *TINY],
                      env=ENV)
    assert r.exit_code == 4, r.stderr
    assert "use a smaller --batch-size" in r.stderr


def test_out_of_memory_in_eval_is_a_resource_error(teacher, monkeypatch):
    import torch

    import uts_cli.model.predict as predict

    _, runs = teacher

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
        yield  # a generator, like the real one

    monkeypatch.setattr(predict, "predict_patches", oom)
    r = runner.invoke(app, ["eval", "t", "--runs-dir", str(runs), "--device", "cpu"], env=ENV)
    assert r.exit_code == 4 and "--batch-size" in r.stderr


def test_full_disk_while_writing_a_run_is_a_resource_error_naming_the_file(tmp_path, monkeypatch):
    from uts_cli.io import atomic

    store = write_tiny_store(tmp_path / "s.h5")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    r = runner.invoke(app, ["teach", str(store), "--name", "x", "--runs-dir", str(tmp_path / "runs"), *TINY],
                      env=ENV)
    assert r.exit_code == 4, r.stderr
    assert "disk full" in r.stderr and str(tmp_path / "runs" / "x") in r.stderr and "free space" in r.stderr


def test_interrupt_hints_say_how_to_continue(tiny_store, tmp_path, monkeypatch):
    import uts_cli.api.teach as teach_api

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(teach_api, "PatchStore", interrupt)
    r = runner.invoke(app, ["teach", str(tiny_store), "--name", "x", "--runs-dir", str(tmp_path), *TINY], env=ENV)
    assert r.exit_code == 130 and "with --resume" in r.stderr


def test_eval_warns_when_the_store_stain_differs_from_the_runs(teacher, tmp_path):
    import shutil

    _, runs = teacher
    run = tmp_path / "t-macenko"
    shutil.copytree(runs / "t", run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["stain"]["method"] == "none"
    cfg["stain"]["method"] = "macenko"  # as if trained on a normalized store
    (run / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["eval", str(run), "--device", "cpu", "-o", str(tmp_path / "ev")], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert "stain method 'macenko'" in r.stderr and "'none'" in r.stderr
    r = runner.invoke(app, ["eval", "t", "--runs-dir", str(runs), "--device", "cpu", "-o", str(tmp_path / "e2")],
                      env=ENV)
    assert r.exit_code == 0 and "stain method" not in r.stderr


def test_student_interrupted_mid_training_resumes_from_its_checkpoint_without_rescoring(teacher, monkeypatch):
    from uts_cli.model import fit as train

    _, runs = teacher
    real_epoch = train._Trainer.run_epoch

    def stop_in_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(train._Trainer, "run_epoch", stop_in_epoch_2)
    r = _distill(runs, "s2", "--pseudolabel", "--epochs", "2", "--steps-per-epoch", "2")
    assert r.exit_code == 130 and "--resume" in r.stderr
    assert (runs / "s2" / "checkpoints" / "last.pt").is_file()
    assert (runs / "s2" / "distill" / "removed.csv").is_file()

    monkeypatch.setattr(train._Trainer, "run_epoch", real_epoch)
    _no_scoring(monkeypatch)
    r = _distill(runs, "s2", "--pseudolabel", "--epochs", "2", "--steps-per-epoch", "2", "--resume", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["reused_scores"] is True and doc["student"]["epochs_done"] == 2
    history = (runs / "s2" / "history.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in history] == [1, 2]
