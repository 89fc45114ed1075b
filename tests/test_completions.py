import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_completions_up_to_date():
    r = subprocess.run([sys.executable, "scripts/gen_completions.py", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (ROOT / "completions" / "_uts").read_text().startswith("#compdef uts")


def _complete(words: str, cword: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, _UTS_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(cword))
    code = ("import sys, runpy; sys.argv=['uts']; runpy.run_module('uts_cli', run_name='__main__')")
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: sys.stderr.write('TORCH_LOADED=%s' % ('torch' in sys.modules)))\n"
             + code)
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=ROOT)


def test_tab_completion_lists_commands_without_importing_torch():
    r = _complete("uts pre", 1)
    assert "prepare" in r.stdout
    assert "TORCH_LOADED=False" in r.stderr


def test_tab_completion_of_dataset_names():
    r = _complete("uts prepare MID", 2)
    assert "MIDOG21" in r.stdout or "midog21" in r.stdout.lower()
