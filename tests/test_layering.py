"""The layering rules of DESIGN.md: light modules must not drag torch (or the CLI) in."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _loaded(modules: list[str], probe: str) -> bool:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + f"print({probe!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.strip() == "True"


def test_cli_and_light_modules_do_not_import_torch():
    light = ["uts_cli.cli.app", "uts_cli.io.store", "uts_cli.tiling", "uts_cli.metrics", "uts_cli.localize",
             "uts_cli.config", "uts_cli.errors", "uts_cli.reporting", "uts_cli.api"]
    assert not _loaded(light, "torch")


def test_stdlib_only_modules_import_no_third_party_package():
    # errors, config, reporting, choices and io/atomic are imported by everything, the CLI at start-up
    # included; they must stay cheap and free of numpy/torch/h5py/typer.
    stdlib_only = ["uts_cli.errors", "uts_cli.config", "uts_cli.reporting", "uts_cli.choices", "uts_cli.io.atomic"]
    for probe in ("numpy", "torch", "h5py", "typer", "rich", "scipy"):
        assert not _loaded(stdlib_only, probe), probe


def test_library_layer_does_not_import_cli_libraries():
    lib = ["uts_cli.io.store", "uts_cli.tiling", "uts_cli.metrics", "uts_cli.localize", "uts_cli.api.prepare"]
    assert not _loaded(lib, "typer")
    assert not _loaded(lib, "rich")


def test_no_click_imports():
    for path in (ROOT / "uts_cli").rglob("*.py"):
        text = path.read_text()
        assert "import click" not in text and "from click" not in text, path
