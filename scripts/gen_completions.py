"""Generate the shell completion scripts in completions/ (or check they are current with --check).

Typer's scripts are small shims that call `uts` back at TAB time, so they only change when the
program name or Typer's templates change, not when options change.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"bash": "uts.bash", "zsh": "_uts", "fish": "uts.fish"}


def render(shell: str) -> str:
    env = dict(os.environ, _UTS_COMPLETE=f"source_{shell}")
    out = subprocess.run([sys.executable, "-m", "uts_cli"], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    # zsh only autoloads a completion file whose first line is "#compdef"; Typer emits a blank line first.
    return out.stdout.lstrip("\n")


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for shell, name in TARGETS.items():
        text = render(shell)
        path = ROOT / "completions" / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale completion scripts: " + ", ".join(stale) + "; run python scripts/gen_completions.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
