"""kill -9 anywhere: each long command, SIGKILLed at a random (seeded) point and rerun, ends with
the same result as a run that was never interrupted.

The kill lands a random delay after a random progress line, so over seeds it hits writes, flushes,
renames and checkpoint saves. ``UTS_KILL_SEED`` picks another seed for a local soak
(``for s in $(seq 50); do UTS_KILL_SEED=$s pytest tests/cli/test_kill9.py; done``).

Stores are compared dataset by dataset and attribute by attribute, not byte by byte: every store
gets a fresh ``uuid`` and ``created_at`` (runs record the uuid to notice a regenerated store), and
a resumed HDF5 file keeps the free space of the rows it trimmed, so bytes cannot match.
"""
from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, median_train_score, set_run_threshold, write_tiny_store

SEED = int(os.environ.get("UTS_KILL_SEED", "0"))
# Attributes that differ between any two runs by design.
PER_RUN_ATTRS = {"uuid", "created_at"}
# history.csv columns that hold wall-clock times, not results.
TIMING = {"seconds", "train_seconds", "samples_per_s", "timestamp"}
TINY = ["--weights", "none", "--n-blocks", "1", "--batch-size", "4", "--steps-per-epoch", "3",
        "--workers", "0", "--device", "cpu", "--lr", "1e-3"]


def _env() -> dict:
    env = dict(os.environ, NO_COLOR="1", TERMINAL_WIDTH="120", PYTHONPATH=str(REPO))
    env.pop("UTS_DEBUG", None)
    return env


class _Done:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def uts(args: list[str], cwd: Path) -> _Done:
    """Run ``uts args`` in ``cwd`` in this process (the uninterrupted runs and the reruns).

    Only the run that is killed needs its own process; running the others here saves a torch
    import each. Training threads and seeds are set by the commands themselves, so the result
    is the same as in a fresh process (the kill tests compare exactly that).
    """
    from typer.testing import CliRunner

    from uts_cli.cli.app import app

    old = Path.cwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, args, env={"NO_COLOR": "1", "TERMINAL_WIDTH": "120"})
    finally:
        os.chdir(old)
    return _Done(r.exit_code, r.stdout, r.stderr)


def kill_at_random(args: list[str], cwd: Path, rng: random.Random, n_lines: int, max_delay: float,
                   setup: str = "") -> bool:
    """Start ``uts args``, SIGKILL it a random delay after a random stderr line.

    Returns:
        True if the process was killed, False if it finished first.
    """
    after = rng.randint(0, n_lines - 1)
    delay = rng.uniform(0.0, max_delay)
    code = f"import sys; {setup}; from uts_cli.cli.app import main; sys.argv[0] = 'uts'; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = 0
        while seen < after:
            if not proc.stderr.readline():
                break
            seen += 1
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return killed
    finally:
        proc.stderr.close()
        if proc.poll() is None:  # pragma: no cover - only if the wait above timed out
            proc.kill()


def store_contents(path: Path) -> dict:
    """Every dataset (as an array) and attribute of an HDF5 file, minus the per-run attributes."""
    out: dict = {}

    def attrs(name, obj):
        for key, value in obj.attrs.items():
            if key not in PER_RUN_ATTRS:
                out[f"{name}@{key}"] = value

    def visit(name, obj):
        attrs(name, obj)
        if isinstance(obj, h5py.Dataset):
            out[name] = obj[()]

    with h5py.File(path, "r") as f:
        attrs("/", f)
        f.visititems(visit)
    return out


def assert_same_store(a: Path, b: Path) -> None:
    ca, cb = store_contents(a), store_contents(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        va, vb = ca[key], cb[key]
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and va.shape == vb.shape, key
            np.testing.assert_array_equal(va, vb, err_msg=key)
        else:
            assert va == vb, key


def rerun_until_done(args: list[str], cwd: Path, final: Path) -> None:
    """Rerun after the kill; a kill after the final rename leaves a finished output (exit 2 then)."""
    r = uts(args, cwd)
    if r.returncode == 2 and final.exists() and "exists" in r.stderr:
        return
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr


def _two_folders(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    return a, b


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory) -> Path:
    from uts_cli.datasets.synthetic import SyntheticSpec, generate

    root = tmp_path_factory.mktemp("kill") / "syn"
    generate(root, SyntheticSpec(n_cases=4, fields_per_case=1, field_size=256, val_cases=1, test_cases=1))
    return root


@pytest.mark.parametrize("k", range(3))
def test_prepare_killed_and_rerun_equals_an_uninterrupted_run(syn_root, tmp_path, k):
    rng = random.Random(f"prepare-{SEED}-{k}")
    # The same relative output in two folders: the output path is part of the recorded config.
    clean, killed = _two_folders(tmp_path)
    args = ["prepare", "synthetic", "--root", str(syn_root), "--patch-size", "64", "-o", "out.h5"]
    r = uts(args, clean)
    assert r.returncode == 0, r.stderr
    kill_at_random(args, killed, rng, n_lines=5, max_delay=0.05)
    rerun_until_done(args, killed, killed / "out.h5")
    assert not (killed / "out.h5.partial").exists()
    assert_same_store(clean / "out.h5", killed / "out.h5")


def test_prepare_same_seed_twice_gives_the_same_store(tmp_path):
    """Generation included: the same spec and seed, generated and prepared twice."""
    import shutil

    from uts_cli.datasets.synthetic import SyntheticSpec, generate

    a, b = _two_folders(tmp_path)
    root = tmp_path / "root"  # the same path both times: the root is part of the recorded config
    for folder in (a, b):
        shutil.rmtree(root, ignore_errors=True)
        generate(root, SyntheticSpec(n_cases=4, fields_per_case=1, field_size=256, val_cases=1,
                                     test_cases=1, seed=3))
        r = uts(["prepare", "synthetic", "--root", str(root), "--seed", "3", "--patch-size", "64",
                 "-o", "out.h5"], folder)
        assert r.returncode == 0, r.stderr
    assert_same_store(a / "out.h5", b / "out.h5")


@pytest.fixture(scope="module")
def raw_store(syn_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "raw.h5"
    r = uts(["prepare", "synthetic", "--root", str(syn_root), "--patch-size", "64", "-o", str(out)], out.parent)
    assert r.returncode == 0, r.stderr
    return out


def test_normalize_killed_and_rerun_equals_an_uninterrupted_run(raw_store, tmp_path, monkeypatch):
    import uts_cli.api.normalize as normalize_api

    rng = random.Random(f"normalize-{SEED}")
    # Blocks of 12 patches (chunks hold 10), so the 64 patches make 6 resume units.
    monkeypatch.setattr(normalize_api, "BLOCK", 12)
    clean, killed = _two_folders(tmp_path)
    args = ["normalize", str(raw_store), "--device", "cpu", "--batch-size", "8", "-o", "out.h5"]
    r = uts(args, clean)
    assert r.returncode == 0, r.stderr
    # The first lines come after torch and torchstain are imported; a kill there or later.
    kill_at_random(args, killed, rng, n_lines=6, max_delay=0.3,
                   setup="import uts_cli.api.normalize as m; m.BLOCK = 12")
    rerun_until_done(args, killed, killed / "out.h5")
    assert_same_store(clean / "out.h5", killed / "out.h5")


def _history_values(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    import torch

    ca = torch.load(a, map_location="cpu", weights_only=True)
    cb = torch.load(b, map_location="cpu", weights_only=True)
    assert ca["epoch"] == cb["epoch"] and ca["best_epoch"] == cb["best_epoch"]
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


def assert_same_run(a: Path, b: Path) -> None:
    assert _history_values(a) == _history_values(b)
    for name in ("last", "best"):
        _assert_same_checkpoint(a / "checkpoints" / f"{name}.pt", b / "checkpoints" / f"{name}.pt")


@pytest.fixture(scope="module")
def train_store(tmp_path_factory) -> Path:
    return write_tiny_store(tmp_path_factory.mktemp("teach") / "tiny.h5", n_images=10, with_truth=True)


def run_clean_then_killed_and_resumed(args: list[str], cwd: Path, rng: random.Random) -> None:
    """``uts args --name clean``; then ``--name killed`` SIGKILLed at random and rerun with ``--resume``."""
    clean = uts(args + ["--name", "clean"], cwd)
    assert clean.returncode == 0, clean.stderr
    n_lines = len(clean.stderr.splitlines())
    kill_at_random(args + ["--name", "killed"], cwd, rng, n_lines=n_lines, max_delay=0.2)
    r = uts(args + ["--name", "killed", "--resume"], cwd)
    assert r.returncode == 0, r.stderr


def test_teach_killed_and_resumed_equals_an_uninterrupted_run(train_store, tmp_path):
    rng = random.Random(f"teach-{SEED}")
    args = ["teach", str(train_store), "--runs-dir", "runs", "--epochs", "3", *TINY]
    run_clean_then_killed_and_resumed(args, tmp_path, rng)
    assert_same_run(tmp_path / "runs" / "clean", tmp_path / "runs" / "killed")


def test_teach_same_seed_twice_gives_the_same_run_and_metrics(train_store, tmp_path):
    args = ["teach", str(train_store), "--runs-dir", "runs", "--epochs", "1", "--seed", "5", *TINY]
    for name in ("a", "b"):
        r = uts(args + ["--name", name], tmp_path)
        assert r.returncode == 0, r.stderr
    assert_same_run(tmp_path / "runs" / "a", tmp_path / "runs" / "b")
    docs = []
    for name in ("a", "b"):
        r = uts(["eval", name, "--runs-dir", "runs", "--device", "cpu", "--json", "-o", f"ev-{name}"], tmp_path)
        assert r.returncode == 0, r.stderr
        import json

        doc = json.loads(r.stdout)
        docs.append({k: doc[k] for k in ("patch", "region", "image_level", "threshold")})
    assert docs[0] == docs[1]


@pytest.mark.slow  # a teacher and two students: about 15 s on an idle 2-core machine, 40 s loaded
def test_distill_killed_and_resumed_equals_an_uninterrupted_run(train_store, tmp_path):
    rng = random.Random(f"distill-{SEED}")
    teacher = uts(["teach", str(train_store), "--runs-dir", "runs", "--name", "t", "--epochs", "1", *TINY],
                  tmp_path)
    assert teacher.returncode == 0, teacher.stderr
    run = tmp_path / "runs" / "t"
    set_run_threshold(run, median_train_score(run, train_store))  # both classes among the pseudo-labels
    args = ["distill", "--teacher", "t", "--runs-dir", "runs", "--pseudolabel", "--epochs", "2",
            "--workers", "0", "--device", "cpu"]
    run_clean_then_killed_and_resumed(args, tmp_path, rng)
    runs = tmp_path / "runs"
    assert_same_run(runs / "clean", runs / "killed")
    assert (runs / "clean" / "distill" / "removed.csv").read_text() == \
        (runs / "killed" / "distill" / "removed.csv").read_text()
