"""The experiment patches of benchmarks/patches/ still apply to the code (docs/science.md tells readers to apply them)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "benchmarks" / "patches").glob("*.patch"))


def test_there_are_patches():
    assert PATCHES, "benchmarks/patches/ holds no patches"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_applies(patch):
    r = subprocess.run(["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"{patch.name} no longer applies: {r.stderr.strip()}"
