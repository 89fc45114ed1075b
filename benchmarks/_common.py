"""Shared helpers of the benchmark scripts: child processes with peak memory, reports, test data.

Every measured step runs in a fresh child process so that its peak memory is its own. The
child's ``ru_maxrss`` cannot simply be read by this (large) process: Linux carries the parent's
high-water mark over into a child started with fork/vfork + exec, and ``getrusage
(RUSAGE_CHILDREN)`` is the maximum over *all* children reaped so far. So each child is started
through a tiny launcher (``_LAUNCHER``, what ``/usr/bin/time`` does): a small Python process
forks, execs the command, reaps it with ``os.wait4`` and writes its ``ru_maxrss`` (largest single
process of its tree, plus the launcher's ~10 MB at fork time) to a file. A sampler thread also
records the peak PSS summed over the command's whole process tree (DataLoader workers included;
PSS splits shared pages between processes, so forked copies are not counted twice).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
TUPAC_FIELD = 2000  # side of a TUPAC16 high-power field in pixels
TUPAC_PER_CASE = 4  # ROIs per generated case folder


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------


@dataclass
class ChildResult:
    """What one measured child process did."""

    argv: list[str]
    returncode: int
    wall_s: float
    maxrss_mb: float        # ru_maxrss of the child (largest single process of its tree)
    tree_pss_mb: float      # peak of the PSS summed over the process tree (sampled)
    stdout: str
    stderr: str

    def json_tail(self) -> dict:
        """The last stdout line parsed as JSON (children report their own figures that way)."""
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        if not lines:
            return {}
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            # `uts --json` prints one (possibly indented) object: parse all of stdout.
            return json.loads(self.stdout)


def _children(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        found += [int(c) for c in text.split()]
    return found


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_pss_mb(pid: int, include_root: bool = True) -> float:
    """PSS of ``pid`` and all its descendants, in MB (0 where /proc does not tell)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        if p != pid or include_root:
            total += _pss_kb(p)
        todo += _children(p)
    return total / 1024


# argv: MAXRSS_FILE CMD ARGS...; exits with the command's status (128 + signal when killed).
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def run_child(argv: list[str], *, cwd: Path | None = None, env: dict | None = None,
              sample_every: float = 0.2, check: bool = True) -> ChildResult:
    """Run ``argv`` to completion and measure its wall time and peak memory.

    Args:
        argv: the command line.
        cwd: working directory (default: the repository root).
        env: extra environment variables.
        sample_every: seconds between PSS samples of the process tree.
        check: raise when the child fails.

    Returns:
        The :class:`ChildResult`.

    Raises:
        RuntimeError: the child exited with a non-zero status and ``check`` is set.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path, rss_path = (Path(tmp) / n for n in ("stdout", "stderr", "maxrss"))
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(rss_path)]
        with open(out_path, "w") as out, open(err_path, "w") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(launcher + list(argv), cwd=cwd or REPO,
                                    env={**os.environ, **(env or {})}, stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL)
            peak = [0.0]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(sample_every):
                    peak[0] = max(peak[0], tree_pss_mb(proc.pid, include_root=False))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            returncode = proc.wait()
            wall = time.perf_counter() - t0
            done.set()
            sampler.join()
        maxrss_kb = float(rss_path.read_text()) if rss_path.exists() else float("nan")
        result = ChildResult(argv=list(argv), returncode=returncode, wall_s=wall,
                             maxrss_mb=maxrss_kb / 1024, tree_pss_mb=peak[0],
                             stdout=out_path.read_text(), stderr=err_path.read_text())
    if check and result.returncode != 0:
        raise RuntimeError(f"child failed (exit {result.returncode}): {shlex.join(argv)}\n"
                           f"{result.stderr[-3000:]}")
    return result


def python_child(code: str, **kwargs) -> ChildResult:
    """Run a snippet of Python in a fresh interpreter with ``benchmarks/`` importable."""
    prelude = f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r})\n"
    return run_child([sys.executable, "-c", prelude + code], **kwargs)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU, OS and library versions, for the report header."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_model": model, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__}
    for name in ("torch", "h5py", "skimage", "torchstain", "imageio", "tifffile"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    try:
        info["load_avg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are shown with 3 significant decimals."""

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def header_block(title: str, machine: dict) -> str:
    """Title, the exact command line and the machine description."""
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    load = machine.get("load_avg_at_start")
    return "\n".join([
        f"# {title}", "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  ",
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs "
        f"({machine['cpus_usable']} usable), {machine['platform']}  ",
        f"Python {machine['python']}, torch {machine['torch']}, numpy {machine['numpy']}, "
        f"h5py {machine['h5py']}, scikit-image {machine['skimage']}, torchstain {machine['torchstain']}  ",
        f"Load average at start: {load}" if load else "", ""])


def write_report(out: Path, markdown: str, data: dict) -> Path:
    """Write ``out`` (markdown) and the JSON twin next to it; return the JSON path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown + "\n", encoding="utf-8")
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return json_path


def _jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, ChildResult):
        d = asdict(obj)
        d.pop("stdout"), d.pop("stderr")
        return d
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def render_field(index: int, size: int, seed: int = 0, mitoses_per_mpx: float = 0.75,
                 lookalikes_per_mpx: float = 1.0):
    """One rendered H&E field (the ``uts prepare synthetic`` renderer) and its mitosis centres.

    Stain varies per case (every ``TUPAC_PER_CASE`` fields) as in the synthetic dataset. Mitoses
    and look-alikes are drawn per million pixels (the defaults give about 3 and 4 per 2000 px
    field, near TUPAC16's 2.4 mitoses per field).

    Returns:
        ``(rgb uint8 (size, size, 3), mitoses (K, 2) float yx 0-based)``.
    """
    from uts_cli.datasets import _render

    case = index // TUPAC_PER_CASE
    stain = _render.case_stain(np.random.default_rng([seed, case, 0]))
    rng = np.random.default_rng([seed, case, index + 1])
    mpx = size * size / 1e6
    n_mit = int(rng.poisson(mitoses_per_mpx * mpx))
    n_look = int(rng.poisson(lookalikes_per_mpx * mpx))
    rgb, objects = _render.render_field(rng, size, _render.field_stain(stain, rng), n_mit, n_look,
                                        edge=index % 5 == 4)
    mitoses = np.array([(o.y, o.x) for o in objects if o.is_mitosis], np.float64).reshape(-1, 2)
    return rgb, mitoses


def tupac16_names(index: int) -> tuple[str, str]:
    """(case folder, ROI stem) of the ``index``-th generated field: 01/01, 01/02, ... 01/04, 02/01."""
    return f"{index // TUPAC_PER_CASE + 1:02d}", f"{index % TUPAC_PER_CASE + 1:02d}"


def make_tupac16(root: Path, n_fields: int, *, field_size: int = TUPAC_FIELD, seed: int = 0,
                 source: Path | None = None, log=print) -> Path:
    """Write (or reuse) a TUPAC16-layout raw dataset of ``n_fields`` rendered fields.

    Layout: ``mitoses_train_image_data/mitoses_train_image_data_part_1/<case>/<roi>.tif``
    (uncompressed RGB TIFF, as the real fields) and ``mitoses_ground_truth/<case>/<roi>.csv``
    (``row,col`` 1-based, no header). A ``done.json`` marker makes the folder reusable.

    Args:
        root: dataset folder to create.
        n_fields: number of high-power fields.
        field_size: side in pixels.
        seed: generator seed.
        source: an existing larger dataset made with the same settings: its first fields are
            hard-linked (or copied) instead of rendered again.
        log: progress sink.

    Returns:
        ``root``.
    """
    import shutil

    import tifffile

    marker = root / "done.json"
    spec = {"n_fields": n_fields, "field_size": field_size, "seed": seed, "version": 2}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return root
    if root.exists():
        shutil.rmtree(root)
    images = root / "mitoses_train_image_data" / "mitoses_train_image_data_part_1"
    truth = root / "mitoses_ground_truth"
    t0 = time.perf_counter()
    for i in range(n_fields):
        case, roi = tupac16_names(i)
        tif, csv = images / case / f"{roi}.tif", truth / case / f"{roi}.csv"
        tif.parent.mkdir(parents=True, exist_ok=True)
        csv.parent.mkdir(parents=True, exist_ok=True)
        src_tif = None if source is None else source / tif.relative_to(root)
        if src_tif is not None and src_tif.exists():
            for a, b in ((src_tif, tif), (source / csv.relative_to(root), csv)):
                try:
                    os.link(a, b)
                except OSError:
                    shutil.copyfile(a, b)
            continue
        rgb, mitoses = render_field(i, field_size, seed)
        tifffile.imwrite(tif, rgb, photometric="rgb")
        rows = np.clip(np.rint(mitoses) + 1, 1, field_size).astype(int)
        csv.write_text("".join(f"{r},{c}\n" for r, c in rows), encoding="utf-8")
        if (i + 1) % 8 == 0 or i + 1 == n_fields:
            log(f"  rendered {i + 1}/{n_fields} fields ({time.perf_counter() - t0:.0f} s)")
    marker.write_text(json.dumps(spec), encoding="utf-8")
    return root


def log(msg: str) -> None:
    """Progress line on stderr (stdout carries the report)."""
    print(msg, file=sys.stderr, flush=True)
