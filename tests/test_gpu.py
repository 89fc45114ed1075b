"""CUDA path checks (skipped without a GPU): AMP training, CUDA inference and normalization.

Run on a GPU machine with `python -m pytest tests/test_gpu.py`.
"""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from uts_cli.cli.app import app

pytestmark = pytest.mark.gpu
ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()


def test_teach_eval_on_cuda_with_amp(tiny_store, tmp_path):
    args = ["--weights", "none", "--n-blocks", "2", "--epochs", "2", "--batch-size", "8", "--steps-per-epoch", "4",
            "--workers", "2", "--device", "cuda", "--runs-dir", str(tmp_path)]
    r = runner.invoke(app, ["teach", str(tiny_store), "--name", "g", "--json", *args], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["device"].startswith("cuda")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["config"]["amp"] == "auto" and cfg["device"]["requested"] == "cuda"
    r = runner.invoke(app, ["eval", str(tmp_path / "g"), "--device", "cuda", "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    # The same checkpoint scored on CPU gives the same image-level decisions (AMP only at training).
    r_cpu = runner.invoke(app, ["eval", str(tmp_path / "g"), "--device", "cpu", "--json", "-o", str(tmp_path / "c")],
                          env=ENV)
    assert json.loads(r.stdout)["image_level"]["tp"] == json.loads(r_cpu.stdout)["image_level"]["tp"]


def test_normalize_cuda_matches_cpu(tmp_path):
    from uts_cli.datasets.synthetic import SyntheticSpec, generate
    from uts_cli.io.store import PatchStore

    generate(tmp_path / "syn", SyntheticSpec(n_cases=4, fields_per_case=1, field_size=256, val_cases=1, test_cases=1))
    raw = tmp_path / "raw.h5"
    assert runner.invoke(app, ["prepare", "synthetic", "--root", str(tmp_path / "syn"), "--patch-size", "128",
                               "-o", str(raw)], env=ENV).exit_code == 0
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / f"{device}.h5"
        r = runner.invoke(app, ["normalize", str(raw), "-o", str(outs[device]), "--device", device], env=ENV)
        assert r.exit_code == 0, r.stderr
    a, b = PatchStore(outs["cpu"]), PatchStore(outs["cuda"])
    np.testing.assert_array_equal(a.normalization_ok, b.normalization_ok)
    diff = np.abs(a.read_rgb(np.arange(len(a))).astype(int) - b.read_rgb(np.arange(len(b))).astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.01
