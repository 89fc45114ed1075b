"""`uts teach` under torchrun with two CPU processes (gloo), against one process.

These start real process groups through ``python -m torch.distributed.run``, as a user would.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uts_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
COMMON = ["--weights", "none", "--n-blocks", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu",
          "--no-augment"]


def _env() -> dict:
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(nproc: int, *args: str) -> list[str]:
    # --standalone picks a free port: parallel test runs do not collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "uts_cli", *args]


def _history(run: Path) -> list[dict]:
    import csv

    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_two_processes_match_one_with_the_same_global_batch(tiny_store, tmp_path):
    runs = tmp_path / "runs"
    args = ["teach", str(tiny_store), "--epochs", "1", "--steps-per-epoch", "3", "--runs-dir", str(runs), *COMMON]
    r = CliRunner().invoke(app, [*args, "--name", "one"], env=ENV)
    assert r.exit_code == 0, r.stderr
    p = subprocess.run(_torchrun(2, *args, "--name", "two", "--json"), capture_output=True, text=True,
                       env=_env(), timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    # Rank 0 alone prints the result: exactly one JSON document on stdout.
    doc = json.loads(p.stdout)
    assert doc["ok"] and doc["status"] == "complete"

    one, two = runs / "one", runs / "two"
    for name in ("config.json", "env.json", "history.csv", "metrics.json", "log.txt", "history.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (two / name).is_file(), name
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert json.loads((two / "metrics.json").read_text())["status"] == "complete"
    log = (two / "log.txt").read_text()
    assert log.count("teach started") == 1 and "2 processes (gloo)" in log

    h1, h2 = _history(one), _history(two)
    assert len(h1) == len(h2) == 1
    # Same global batches: the same number of samples seen; losses differ only by BatchNorm
    # statistics taken per half batch and summation order.
    assert h1[0]["n_train_samples"] == h2[0]["n_train_samples"]
    for key in ("train_loss", "val_loss"):
        a, b = float(h1[0][key]), float(h2[0][key])
        assert abs(a - b) < 0.05 * max(1.0, abs(a)), (key, a, b)

    # The checkpoint of the 2-process run resumes in one process.
    r = CliRunner().invoke(app, ["teach", str(tiny_store), "--name", "two", "--runs-dir", str(runs), "--epochs", "2",
                                 "--steps-per-epoch", "3", "--resume", *COMMON, "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert [int(row["epoch"]) for row in _history(two)] == [1, 2]


def _rank_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the worker processes torchrun ``parent`` started."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(entry.name)
    return out


def _start_long_run(tiny_store, runs: Path, name: str) -> subprocess.Popen:
    args = ["teach", str(tiny_store), "--name", name, "--runs-dir", str(runs), "--epochs", "50",
            "--steps-per-epoch", "3", *COMMON]
    return subprocess.Popen(_torchrun(2, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env())


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.is_file():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the ranks")
def test_killed_rank_stops_the_others_and_the_run_resumes(tiny_store, tmp_path):
    runs = tmp_path / "runs"
    proc = _start_long_run(tiny_store, runs, "k")
    try:
        _wait_for(runs / "k" / "checkpoints" / "last.pt", proc)
        ranks = _rank_pids(proc.pid)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        t_kill = time.monotonic()
        out, _ = proc.communicate(timeout=90)
        waited = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
    assert waited < 60, waited
    assert proc.returncode != 0
    # torchrun names the rank that died, the survivor says why it stops; no worker is left behind.
    assert "exitcode  : -9" in out and "SIGKILL" in out, out[-3000:]
    assert "Error: rank 0 of 2 lost its partners" in out and "--resume" in out, out[-3000:]
    assert json.loads((runs / "k" / "metrics.json").read_text())["status"] == "failed"
    assert not _rank_pids(proc.pid)
    # The last checkpoint is whole, and the run resumes (in one process: another world size).
    r = CliRunner().invoke(app, ["teach", str(tiny_store), "--name", "k", "--runs-dir", str(runs), "--epochs", "3",
                                 "--steps-per-epoch", "3", "--resume", *COMMON, "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    epochs = [int(row["epoch"]) for row in _history(runs / "k")]
    assert epochs == list(range(1, len(epochs) + 1)) and epochs[-1] >= 3


@pytest.mark.slow
def test_sigterm_stops_every_rank_together_and_saves(tiny_store, tmp_path):
    # Slurm preemption: the launcher gets SIGTERM and passes it on to every worker.
    runs = tmp_path / "runs"
    proc = _start_long_run(tiny_store, runs, "t")
    try:
        _wait_for(runs / "t" / "checkpoints" / "last.pt", proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    metrics = json.loads((runs / "t" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted", out[-3000:]
    assert out.count("Error: training interrupted") == 1, out[-3000:]
    assert "--resume" in out


@pytest.mark.slow
def test_distill_under_torchrun_scores_like_one_process(tiny_store, tmp_path):
    import numpy as np

    runs = tmp_path / "runs"
    r = CliRunner().invoke(app, ["teach", str(tiny_store), "--name", "t", "--runs-dir", str(runs), "--epochs", "1",
                                 *COMMON], env=ENV)
    assert r.exit_code == 0, r.stderr
    # --pseudolabel relabels instead of removing, so even this weak teacher leaves a student to train.
    args = ["distill", "--teacher", "t", "--runs-dir", str(runs), "--pseudolabel", "--epochs", "1",
            "--workers", "0", "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "--name", "s1"], env=ENV)
    assert r.exit_code == 0, r.stderr
    p = subprocess.run(_torchrun(2, *args, "--name", "s2"), capture_output=True, text=True, env=_env(), timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    a = np.load(runs / "s1" / "distill" / "teacher_scores.npz")
    b = np.load(runs / "s2" / "distill" / "teacher_scores.npz")
    for key in a.files:
        if a[key].dtype.kind == "f":
            np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for name in ("kept_train.npy", "kept_val.npy"):
        np.testing.assert_array_equal(np.load(runs / "s1" / "distill" / name), np.load(runs / "s2" / "distill" / name))
    assert json.loads((runs / "s2" / "metrics.json").read_text())["status"] == "complete"
    assert json.loads((runs / "s2" / "config.json").read_text())["distributed"]["world_size"] == 2


@pytest.mark.slow
def test_refusals_under_torchrun_are_printed_once_and_leave_no_run(tiny_store, tmp_path):
    runs = tmp_path / "runs"
    p = subprocess.run(_torchrun(2, "teach", str(tiny_store), "--name", "sb", "--runs-dir", str(runs), "--epochs", "1",
                                 "--sync-bn", *COMMON), capture_output=True, text=True, env=_env(), timeout=240)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert out.count("Error: --sync-bn needs GPUs") == 1, out[-3000:]
    assert not (runs / "sb").exists()
