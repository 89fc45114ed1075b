import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from uts_cli.cli._output import cli_errors
from uts_cli.cli.app import app

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()


def test_version_via_module():
    r = subprocess.run([sys.executable, "-m", "uts_cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stdout.startswith("uts ") and "torch" in r.stdout and "CUDA" in r.stdout


def test_help_lists_commands_and_exit_codes():
    r = runner.invoke(app, ["--help"], env=ENV)
    assert r.exit_code == 0
    for cmd in ("prepare", "normalize"):
        assert cmd in r.stdout
    assert "Exit codes" in r.stdout
    assert "\x1b[" not in r.stdout


def test_no_args_shows_help_with_usage_exit_code():
    r = runner.invoke(app, [], env=ENV)
    assert r.exit_code == 2


def test_unknown_option_is_usage_error():
    r = runner.invoke(app, ["prepare", "synthetic", "--no-such-option"], env=ENV)
    assert r.exit_code == 2


def test_help_does_not_import_torch():
    code = ("import sys; from uts_cli.cli.app import main; sys.argv=['uts','prepare','--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "TORCH False" in r.stdout
    assert "--patch-size" in r.stdout


def test_bad_device_value_is_usage_error(tiny_store):
    r = runner.invoke(app, ["normalize", str(tiny_store), "--device", "tpu"], env=ENV)
    assert r.exit_code == 2
    assert "not a device" in r.stderr


def test_json_error_object_on_stdout(tmp_path, tiny_store):
    out = tmp_path / "exists.h5"
    out.write_bytes(b"x")
    r = runner.invoke(app, ["normalize", str(tiny_store), "-o", str(out), "--json"], env=ENV)
    assert r.exit_code == 2
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["error"]["type"] == "UsageError"
    assert "exists" in doc["error"]["message"] and "--overwrite" in doc["error"]["hint"]
    assert "Error:" in r.stderr and "Hint:" in r.stderr


def test_an_unexpected_exception_is_one_line_and_exit_1(monkeypatch, capsys):
    monkeypatch.delenv("UTS_DEBUG", raising=False)

    @cli_errors("teach")
    def broken(json_output: bool = True):
        raise ValueError("boom\nsecond line")

    with pytest.raises(typer.Exit) as caught:
        broken(json_output=True)
    assert caught.value.exit_code == 1
    out, err = capsys.readouterr()
    assert "internal error: ValueError: boom" in err and "--debug" in err
    assert "Traceback" not in err and "second line" not in err  # one line, whatever the exception's text
    payload = json.loads(out)
    assert payload["ok"] is False and payload["error"]["exit_code"] == 1
