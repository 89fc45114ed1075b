"""benchmarks/gpu_check: FLOP count and device peaks (fast), and the --smoke run on the CPU (slow)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_flops_of_the_default_model_at_500_px():
    import gpu_check

    forward, step = gpu_check.count_flops("resnet18", 3, 500)
    assert forward == pytest.approx(14.2, abs=0.1)
    # Forward + backward; the first convolution needs no input gradient, hence a bit under 3x.
    assert 2.8 * forward < step < 3.0 * forward


def test_peak_lookup_prefers_the_specific_name():
    import gpu_check

    assert gpu_check.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_check.peak_tflops("Some Future GPU", None) is None
    assert gpu_check.peak_tflops("Some Future GPU", 123.0) == 123.0


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "NO_COLOR": "1"}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path / "g.json")],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for line in ("device:", "model-only training:", "teach:", "normalize:", "predict: skipped", "of bf16 peak"):
        assert line in p.stdout, line
    assert (tmp_path / "g.json").is_file()
