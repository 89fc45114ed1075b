"""`uts predict` split over two CPU processes (gloo): under torchrun and with --devices cpu,cpu.

Both must give, slide for slide, the detections and the summary.csv rows of one process, and a
bad slide among them must fail alone (exit 3, the others done).
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_tiny_store
from uts_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()
TINY = ["--weights", "none", "--n-blocks", "1", "--epochs", "1", "--batch-size", "4", "--steps-per-epoch", "2",
        "--workers", "0", "--device", "cpu", "--lr", "1e-3"]
# Slide outcomes and counts are compared exactly; timings are not.
VOLATILE = {"seconds"}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny run, four fields of two sizes plus one unreadable file, and one process's predictions."""
    from uts_cli.io.store import PatchStore

    root = tmp_path_factory.mktemp("ranks")
    store_path = write_tiny_store(root / "tiny.h5", n_images=6)
    r = runner.invoke(app, ["teach", str(store_path), "--name", "t", "--runs-dir", str(root / "runs"), *TINY],
                      env=ENV)
    assert r.exit_code == 0, r.stderr
    store = PatchStore(store_path)
    fields = root / "fields"
    fields.mkdir()
    tiles = []
    for img in range(4):  # each field put back together from its patches
        h, w = (int(v) for v in store.image_shape[img][:2])
        field = np.full((h, w, 3), 255, np.uint8)
        for k in store.image_patches(img):
            y, x = (int(v) for v in store.origin[k])
            field[y:y + store.patch_size, x:x + store.patch_size] = store.read_rgb(int(k))[: h - y, : w - x]
        tiles.append(field)
    inputs = []
    for i, field in enumerate(tiles[:3]):
        inputs.append(fields / f"f{i}.png")
        iio.imwrite(inputs[-1], field)
    inputs.append(fields / "wide.png")  # twice the pixels: the size split has something to balance
    iio.imwrite(inputs[-1], np.concatenate([tiles[3], tiles[0]], axis=1))
    inputs.insert(2, fields / "bad.png")
    inputs[2].write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    # A low threshold, so that every field has detections to compare.
    args = [*map(str, inputs), "--run", str(root / "runs" / "t"), "--threshold", "0.3", "--assume-run-mpp",
            "--workers", "0", "--batch-size", "4"]
    one = root / "one"
    r = runner.invoke(app, ["predict", *args, "-o", str(one), "--device", "cpu", "--json"], env=ENV)
    assert r.exit_code == 3, r.stderr
    doc = json.loads(r.stdout)
    assert doc["n_done"] == 4 and doc["n_failed"] == 1 and doc["world_size"] == 1
    return {"root": root, "args": args, "one": one, "names": [p.stem for p in inputs]}


def _env() -> dict:
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        env.pop(k, None)
    return env


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _close(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return abs(float(a) - float(b)) <= 1e-4 * max(1.0, abs(float(a)))
    except ValueError:
        return False


def _assert_same_as_one_process(job, out: Path) -> None:
    one = job["one"]
    for name in job["names"]:
        if name == "bad":
            assert not (out / name).exists() and not list(out.glob(".bad.*"))
            continue
        a, b = _rows(one / name / "detections.csv"), _rows(out / name / "detections.csv")
        assert len(a) == len(b) > 0, name
        for ra, rb in zip(a, b):  # other thread counts may change the last bits of a score
            assert ra.keys() == rb.keys() and all(_close(ra[k], rb[k]) for k in ra), (name, ra, rb)
    ta, tb = _rows(one / "summary.csv"), _rows(out / "summary.csv")
    assert [r["slide"] for r in tb] == job["names"]  # input order, one row per slide
    assert ta[0].keys() == tb[0].keys()
    for ra, rb in zip(ta, tb):
        for k in ra.keys() - VOLATILE:
            assert _close(ra[k], rb[k]), (ra["slide"], k, ra[k], rb[k])
    assert [r["status"] for r in tb] == ["done", "done", "failed", "done", "done"]


def test_torchrun_two_processes_match_one(job):
    out = job["root"] / "torchrun"
    # "--" ends torchrun's own options: it would take predict's --run for an abbreviation of --run-path.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "--", "uts_cli", "predict", *job["args"], "-o", str(out), "--device", "cpu", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
    # Each rank exits 3 (torchrun itself then exits 1 and lists them); rank 0 alone printed. The
    # first rank to exit makes torchrun stop the other, so it may list one rank or both.
    assert p.returncode != 0, p.stderr[-3000:]
    assert p.stderr.count("exitcode  : 3") >= 1, p.stderr[-3000:]
    assert "internal error" not in p.stderr and "lost its partners" not in p.stderr, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["world_size"] == 2 and doc["n_done"] == 4 and doc["n_failed"] == 1 and not doc["ok"]
    assert [s["name"] for s in doc["slides"]] == job["names"]
    assert "rank 1: " in p.stderr or "[3/5] bad" in p.stderr  # the bad slide was reported by its rank
    _assert_same_as_one_process(job, out)


def test_devices_cpu_cpu_matches_one_and_reruns_skip(job):
    out = job["root"] / "devices"
    cmd = [sys.executable, "-m", "uts_cli", "predict", *job["args"], "-o", str(out), "--devices", "cpu,cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
    assert p.returncode == 3, p.stderr[-3000:]
    # The parent prints the one table and the one verdict.
    assert p.stdout.count("predict with") == 1 and "2 processes" in p.stdout, p.stdout
    assert p.stderr.count("1 of 5 inputs failed: bad") == 1, p.stderr
    assert "bad" in p.stderr.split("inputs failed")[0]  # the failure itself was reported as it happened
    _assert_same_as_one_process(job, out)

    p = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=_env(), timeout=180)
    assert p.returncode == 3, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["n_skipped"] == 4 and doc["n_failed"] == 1 and doc["world_size"] == 2
    assert [s["status"] for s in doc["slides"]] == ["skipped", "skipped", "failed", "skipped", "skipped"]


def test_devices_usage_errors(job, monkeypatch):
    import torch

    base = ["predict", *job["args"], "-o", str(job["root"] / "never")]
    if not torch.cuda.is_available():
        r = runner.invoke(app, [*base, "--devices", "0,1"], env=ENV)
        assert r.exit_code == 2 and "no CUDA device" in r.stderr and "--devices cpu,cpu" in r.stderr, r.stderr
    for bad, text in (("cpu,0", "mixes the CPU and GPUs"), ("cpu,,cpu", "comma-separated"),
                      ("gpu1", "is not a device")):
        r = runner.invoke(app, [*base, "--devices", bad], env=ENV)
        assert r.exit_code == 2 and text in r.stderr, (bad, r.stderr)
    r = runner.invoke(app, [*base, "--devices", "cpu,cpu", "--device", "cuda"], env=ENV)
    assert r.exit_code == 2 and "contradicts --device" in r.stderr, r.stderr
    monkeypatch.setenv("WORLD_SIZE", "1")
    r = runner.invoke(app, [*base, "--devices", "cpu,cpu"], env=ENV)
    assert r.exit_code == 2 and "torchrun" in r.stderr, r.stderr
    assert not (job["root"] / "never").exists()
