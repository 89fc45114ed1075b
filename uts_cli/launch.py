"""Several processes on one machine without torchrun (``uts predict --devices 0,1`` or ``cpu,cpu``).

The parent starts one fresh interpreter per device (multiprocessing's *spawn*, so no CUDA or
thread state is inherited) and gives each the variables torchrun would set (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so the children run exactly
the code a torchrun job runs (:func:`uts_cli.distributed.session`). The children send their
progress, their result and their errors back through a queue; the parent replays the progress on
its own reporter, returns rank 0's result and raises the error that explains a failure, so the
user sees one progress bar, one result and one error.

Every rank of a GPU job sees the listed GPUs in the listed order (``CUDA_VISIBLE_DEVICES``), so
the GPU numbered by its ``LOCAL_RANK`` is the one listed for it.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from uts_cli.errors import ResourceError, UsageError, UtsError, resource_error
from uts_cli.reporting import Reporter

# Once one process has ended badly, the others get this long to finish or to notice (a
# collective with a dead partner fails within seconds), then they are terminated.
GRACE_S = 30.0
# After a Ctrl-C or SIGTERM the children are given this long to stop by themselves (the
# terminal's Ctrl-C reaches them directly) before the parent forwards the signal.
FORWARD_AFTER_S = 3.0
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class DevicePlan:
    """The processes ``--devices`` asks for: one per entry, all on the CPU or each on one GPU."""

    kind: str                  # "cpu" or "cuda"
    gpus: tuple[int, ...] = ()  # per rank, the GPU's number among those this process sees
    n_cpu: int = 0

    @property
    def world_size(self) -> int:
        return len(self.gpus) if self.kind == "cuda" else self.n_cpu

    @property
    def rank_device_spec(self) -> str:
        """The ``--device`` each rank passes to :func:`uts_cli.distributed.session`."""
        return "cuda" if self.kind == "cuda" else "cpu"

    def single_device(self) -> str:
        """The ``--device`` of a one-entry plan (run in this process, no group)."""
        return f"cuda:{self.gpus[0]}" if self.kind == "cuda" else "cpu"

    def describe(self, rank: int) -> str:
        return f"cuda:{self.gpus[rank]}" if self.kind == "cuda" else "cpu"


def plan_devices(values: Sequence[str], device_spec: str = "auto") -> DevicePlan:
    """Check a ``--devices`` list and say which processes it means.

    Args:
        values: the entries, e.g. ``["0", "1"]``, ``["cuda:0", "cuda:2"]`` or ``["cpu", "cpu"]``.
        device_spec: the ``--device`` value given with it (``auto`` unless the user set one).

    Raises:
        UsageError: an empty or malformed list, CPU and GPUs mixed, a GPU listed twice, GPUs on a
            machine without CUDA (or a number beyond the visible GPUs), a ``--device`` that
            contradicts the list, or a process already started by torchrun.
    """
    items = [str(v).strip().lower() for v in values]
    example = "use GPU numbers (--devices 0,1), or --devices cpu,cpu for CPU processes"
    if not items or any(not v for v in items):
        raise UsageError(f"--devices needs a comma-separated list of devices (got {','.join(items)!r})",
                         hint=example)
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        raise UsageError("--devices starts its own processes, but this one was started by torchrun",
                         hint="leave --devices out under torchrun (it already runs one process per "
                              "device), or run without torchrun")
    spec = str(device_spec).strip().lower()
    if all(v == "cpu" for v in items):
        if spec not in ("auto", "cpu"):
            raise UsageError(f"--devices {','.join(items)} contradicts --device {device_spec}",
                             hint="leave --device out when --devices lists the devices")
        return DevicePlan("cpu", n_cpu=len(items))
    if "cpu" in items:
        raise UsageError(f"--devices mixes the CPU and GPUs ({','.join(items)})", hint=example)
    gpus = []
    for v in items:
        text = v[5:] if v.startswith("cuda:") else v
        if not text.isdigit():
            raise UsageError(f"--devices: {v!r} is not a device", hint=example)
        gpus.append(int(text))
    if len(set(gpus)) != len(gpus):
        raise UsageError(f"--devices lists a GPU twice ({','.join(items)})",
                         hint="one process per GPU: list each GPU once")
    if spec not in ("auto", "cuda"):
        raise UsageError(f"--devices {','.join(items)} contradicts --device {device_spec}",
                         hint="leave --device out when --devices lists the devices")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--devices {','.join(items)} asks for GPUs, but torch sees no CUDA device here",
                         hint="use --devices cpu,cpu to run several CPU processes, or leave --devices out")
    count = torch.cuda.device_count()
    if max(gpus) >= count:
        raise UsageError(f"--devices {','.join(items)}: only {count} GPU(s) visible (0..{count - 1})",
                         hint="list visible GPU numbers; CUDA_VISIBLE_DEVICES decides which are visible")
    return DevicePlan("cuda", gpus=tuple(gpus))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for rank 0's rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity outside Linux
        return max(1, os.cpu_count() or 1)


def rank_env(plan: DevicePlan, rank: int, port: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables rank ``rank`` runs with (what torchrun would set, plus devices).

    Args:
        plan: the processes.
        rank: this process's rank.
        port: the rendezvous port on 127.0.0.1.
        environ: the parent's environment (default ``os.environ``): its ``CUDA_VISIBLE_DEVICES``
            decides what the GPU numbers mean, its ``OMP_NUM_THREADS`` is kept.
    """
    environ = dict(os.environ if environ is None else environ)
    n = plan.world_size
    env = {"RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(n),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if plan.kind == "cuda":
        visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if not visible:
            visible = [str(i) for i in range(max(plan.gpus) + 1)]
        # Listed in rank order, so that LOCAL_RANK numbers this rank's own GPU.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[g] for g in plan.gpus)
    if "OMP_NUM_THREADS" not in environ:
        # N processes each using every core would oversubscribe the CPU.
        env["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // n))
    return env


class _QueueReporter:
    """A child's reporter: every call goes to the parent, which replays it on its own reporter."""

    def __init__(self, events):
        self._events = events

    def _send(self, method: str, *args, **kwargs) -> None:
        self._events.put(("call", method, args, kwargs))

    def start(self, description: str, total: int | None) -> None:
        self._send("start", description, total)

    def advance(self, n: int = 1, **metrics: float) -> None:
        self._send("advance", n, **metrics)

    def finish(self) -> None:
        self._send("finish")

    def log(self, message: str) -> None:
        self._send("log", message)

    def warn(self, message: str) -> None:
        self._send("warn", message)


def _rank_main(fn: Callable[[Any, Reporter], Any], arg: Any, env: dict[str, str], events, rank: int) -> None:
    """Body of a child: set the rank's environment, run ``fn``, send back its result or error."""
    for k in _DIST_VARS:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        value = fn(arg, _QueueReporter(events))
    except UtsError as exc:
        events.put(("error", rank, (type(exc), exc.message, exc.hint, bool(getattr(exc, "mirrored", False)))))
        code = exc.exit_code
    except KeyboardInterrupt:
        events.put(("interrupted", rank, None))
        code = 130
    except BaseException as exc:  # a bug, or a disk/memory failure: say so, do not hang the parent
        mapped = resource_error(exc)
        if mapped is not None:
            events.put(("error", rank, (type(mapped), mapped.message, mapped.hint, False)))
            code = mapped.exit_code
        else:
            if os.environ.get("UTS_DEBUG") == "1":
                import traceback

                traceback.print_exc()
            events.put(("error", rank, (UtsError, f"internal error: {type(exc).__name__}: {exc}",
                                        "rerun with UTS_DEBUG=1 for a traceback and report it", False)))
            code = 1
    else:
        events.put(("result", rank, value))
        code = 0
    events.close()
    events.join_thread()  # everything sent is in the pipe before the process ends
    sys.exit(code)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def _pick_error(errors: dict[int, tuple]) -> tuple[int, tuple]:
    """The error that explains the failure: not one repeated from rank 0, not a lost partner."""
    from uts_cli.distributed import PeerLost

    def key(item):
        rank, (cls, _msg, _hint, mirrored) = item
        return (bool(mirrored), issubclass(cls, PeerLost), rank)

    return min(errors.items(), key=key)


def run_ranks(fn: Callable[[Any, Reporter], Any], arg: Any, plan: DevicePlan, reporter: Reporter,
              rerun_hint: str = "see the messages above") -> Any:
    """Run ``fn(arg, reporter)`` in one spawned process per device of ``plan``; return rank 0's value.

    ``fn`` must be a module-level function (it is pickled by reference) that joins the group
    through :func:`uts_cli.distributed.session`; ``arg`` must be picklable.

    Raises:
        UtsError: the error of the rank that failed first in the sense of :func:`_pick_error`
            (the others' different messages are warned about), or a ResourceError for a process
            that died without a word (killed, out of host memory).
        KeyboardInterrupt: the user or a scheduler stopped the job (Ctrl-C, SIGTERM).
    """
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    port = free_port()
    results: dict[int, Any] = {}
    errors: dict[int, tuple] = {}
    interrupted: set[int] = set()
    stop = {"signal": None, "at": None, "forwarded": False}
    procs: list = []

    def on_signal(signum, frame):
        if stop["signal"] is None:
            stop["signal"], stop["at"] = signum, time.monotonic()
        if signum == signal.SIGTERM and not stop["forwarded"]:
            # A scheduler signals the parent only: pass it on at once.
            stop["forwarded"] = True
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)

    def handle(event) -> None:
        kind = event[0]
        if kind == "call":
            _, method, args, kwargs = event
            getattr(reporter, method)(*args, **kwargs)
        elif kind == "result":
            results[event[1]] = event[2]
        elif kind == "error":
            errors[event[1]] = event[2]
        elif kind == "interrupted":
            interrupted.add(event[1])

    def drain(timeout: float) -> None:
        try:
            handle(events.get(timeout=timeout))
            while True:
                handle(events.get_nowait())
        except queue_mod.Empty:
            pass

    first_bad: float | None = None
    try:
        for rank in range(plan.world_size):
            p = ctx.Process(target=_rank_main, args=(fn, arg, rank_env(plan, rank, port), events, rank),
                            name=f"uts-rank{rank}")
            p.start()
            procs.append(p)
        while True:
            drain(0.2)
            now = time.monotonic()
            alive = [p for p in procs if p.is_alive()]
            if not alive:
                break
            if first_bad is None and (errors or interrupted
                                      or any(p.exitcode not in (None, 0) for p in procs)):
                first_bad = now
            if stop["at"] is not None and not stop["forwarded"] and now - stop["at"] > FORWARD_AFTER_S:
                stop["forwarded"] = True  # the signal reached the parent only (e.g. kill -INT)
                for p in alive:
                    os.kill(p.pid, stop["signal"])
            marks = [t for t in (first_bad, stop["at"]) if t is not None]
            if marks and now - min(marks) > GRACE_S:
                for p in alive:
                    p.terminate()
                break
        drain(0.05)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        drain(0.01)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        events.close()
    if stop["signal"] is not None or interrupted:
        raise KeyboardInterrupt
    if errors:
        rank, (cls, message, hint, _) = _pick_error(errors)
        # Errors that are the same on every rank (bad option, missing run) read as rank 0's; a
        # rank's own (its GPU, a lost partner, a bug) names the rank.
        if rank != 0 and cls.exit_code not in (2, 3):
            message = f"rank {rank} ({plan.describe(rank)}): {message}"
        shown = {message}
        for r, (_c, m, _h, mirrored) in sorted(errors.items()):
            if r != rank and not mirrored and m not in shown and m != errors[rank][1]:
                shown.add(m)
                reporter.warn(f"rank {r} ({plan.describe(r)}): {m}")
        raise cls(message, hint=hint)
    dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in results]
    if dead:
        r, code = dead[0]
        raise ResourceError(f"rank {r} ({plan.describe(r)}) ended with {_describe_exit(code)} before it "
                            "finished (killed, or out of host memory?)", hint=rerun_hint)
    return results[0]
