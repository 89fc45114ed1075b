"""Running ``teach``/``distill`` (and later ``predict``) as one process per device under torchrun.

torchrun (``python -m torch.distributed.run``) starts the processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment; nothing
here launches processes. :func:`session` joins the process group those variables describe
(NCCL on CUDA, gloo on CPU) and picks this rank's device; without them every helper below
degrades to the single-process case, so library code calls them unconditionally.

Conventions every caller keeps:

* files (run folder, checkpoints, history, logs, plots) are written by rank 0 only, and errors
  rank 0 hits while doing so are re-raised on every rank (:func:`on_main`), so no rank waits for
  a partner that already gave up;
* the decision to stop (Ctrl-C, SIGTERM from a scheduler) is taken together (:class:`StopVote`);
* a collective that fails because a partner died becomes :class:`PeerLost` (a ResourceError).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from uts_cli.errors import ResourceError, UsageError, UtsError
from uts_cli.reporting import NullReporter

# Seconds a collective may wait for its partners before the group gives up. Long, because
# rank 0 validates and writes checkpoints while the others wait; a dead partner is normally
# noticed much sooner (torchrun stops the other workers, gloo sees the closed socket).
DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "UTS_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()
_CURRENT: DistContext = SINGLE
# Set once a partner is known to be lost: the SIGTERM torchrun then sends must not kill this
# process before it has said why it stops.
_FAILING = False


class PeerLost(ResourceError):
    """A collective failed: another process of the job died or stopped (exit 4)."""


def env_context() -> DistContext:
    """The rank layout torchrun's environment variables describe (no process group joined).

    Raises:
        UsageError: the variables are present but not integers, or inconsistent.
    """
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return SINGLE
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("RANK/WORLD_SIZE/LOCAL_RANK must be integers",
                         hint="start distributed runs with torchrun, which sets them") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UsageError(f"inconsistent RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}",
                         hint="start distributed runs with torchrun, which sets them")
    return DistContext(rank=rank, world_size=world, local_rank=local)


def current() -> DistContext:
    """The context of the process group joined by :func:`session` (single process otherwise)."""
    return _CURRENT


def _timeout() -> _dt.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds",
                         hint=f"unset it or give seconds, e.g. {TIMEOUT_ENV}=600") from None
    return _dt.timedelta(seconds=seconds)


def rank_device(spec: str, ctx: DistContext):
    """The ``torch.device`` of this rank: the GPU numbered ``LOCAL_RANK``, or the CPU.

    Args:
        spec: the ``--device`` value (``auto``, ``cpu``, ``cuda``); ``cuda:N`` is refused under
            torchrun because each process owns the GPU of its local rank.
        ctx: the rank layout.

    Raises:
        UsageError: ``cuda:N`` with more than one process.
        ResourceError: CUDA asked for but missing, or fewer GPUs than local ranks.
    """
    import torch

    from uts_cli.devices import resolve_device

    text = str(spec).strip().lower()
    if text.startswith("cuda:"):
        raise UsageError(f"--device {spec} cannot be used with {ctx.world_size} processes: each uses "
                         "the GPU numbered by its LOCAL_RANK",
                         hint="use --device cuda (or auto) and pick GPUs with CUDA_VISIBLE_DEVICES")
    device = resolve_device(text)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if ctx.local_rank >= count:
        raise ResourceError(f"local rank {ctx.local_rank} has no GPU: only {count} visible on this node",
                            hint="start at most one process per GPU (torchrun --nproc-per-node), "
                                 "or use --device cpu")
    return torch.device("cuda", ctx.local_rank)


@contextlib.contextmanager
def session(device_spec: str = "auto") -> Iterator[tuple[DistContext, Any]]:
    """Join torchrun's process group for the duration of the block, and pick this rank's device.

    Without torchrun's variables (or with ``WORLD_SIZE=1``) no group is created and the device is
    ``resolve_device(device_spec)``. A nested session reuses the group of the outer one (distill
    trains its student inside its own session).

    Yields:
        ``(context, torch.device)``.
    """
    import torch

    from uts_cli.devices import resolve_device

    global _CURRENT
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield _CURRENT, rank_device(device_spec, _CURRENT) if _CURRENT.enabled else resolve_device(device_spec)
        return
    ctx = env_context()
    if not ctx.enabled:
        yield SINGLE, resolve_device(device_spec)
        return
    if not dist.is_available():
        raise ResourceError("this torch build has no torch.distributed",
                            hint="install a torch wheel with distributed support, or run one process")
    device = rank_device(device_spec, ctx)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and every later .cuda() use this rank's GPU
    try:
        dist.init_process_group(backend=backend, timeout=_timeout(),
                                **({"device_id": device} if device.type == "cuda" else {}))
    except (RuntimeError, ValueError) as exc:
        raise ResourceError(f"could not join the process group ({backend}, rank {ctx.rank} of "
                            f"{ctx.world_size}): {_first_line(exc)}",
                            hint="check MASTER_ADDR/MASTER_PORT or --rdzv-endpoint, and that every "
                                 "node can reach it") from None
    _CURRENT = DistContext(ctx.rank, ctx.world_size, ctx.local_rank, backend)
    previous = _install_sigterm()
    try:
        yield _CURRENT, device
    finally:
        _CURRENT = SINGLE
        if previous is not None and not _FAILING:
            signal.signal(signal.SIGTERM, previous)
        # After a lost partner the group may be unusable and destroying it can block: the
        # process is about to exit anyway.
        if not _FAILING:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _on_sigterm(signum, frame) -> None:
    # Outside the training loop (which votes on it), SIGTERM stops like Ctrl-C; once a partner
    # is lost it is ignored, so the error reaches the user (torchrun's SIGKILL follows anyway).
    if not _FAILING:
        raise KeyboardInterrupt


def _install_sigterm():
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def is_peer_failure(exc: BaseException) -> bool:
    """True when ``exc`` is a collective that failed because the job lost a process."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("connection closed by peer", "connection reset", "broken pipe", "gloo",
                            "nccl", "timed out", "socket", "process group"))


def peer_lost(exc: BaseException, ctx: DistContext | None = None, resume_hint: str | None = None) -> PeerLost:
    """The user-facing error for a failed collective (from now on SIGTERM is not fatal, see :func:`session`)."""
    global _FAILING
    _FAILING = True
    ctx = ctx or current()
    return PeerLost(f"rank {ctx.rank} of {ctx.world_size} lost its partners (another process died "
                    f"or was stopped): {_first_line(exc)}",
                    hint=resume_hint or "see the first failing rank's output above; rerun the same "
                                        "command with --resume to continue from the last checkpoint")


@contextlib.contextmanager
def peer_guard(resume_hint: str | None = None):
    """Turn a collective's failure inside the block into :class:`PeerLost`."""
    try:
        yield
    except UtsError:
        raise
    except Exception as exc:
        if current().enabled and is_peer_failure(exc):
            raise peer_lost(exc, resume_hint=resume_hint) from None
        raise


class SilentReporter(NullReporter):
    """The reporter of ranks other than 0: they would only repeat rank 0's lines."""

    def log(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass


def rank_reporter(reporter):
    """``reporter`` on rank 0, a :class:`SilentReporter` on the others."""
    return reporter if current().is_main else SilentReporter()


# --------------------------------------------------------------------------------------------
# Collectives (all no-ops in a single process)
# --------------------------------------------------------------------------------------------


def barrier() -> None:
    """Wait until every rank gets here."""
    if current().enabled:
        import torch.distributed as dist

        with peer_guard():
            dist.barrier()


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s (picklable) ``obj`` on every rank."""
    if not current().enabled:
        return obj
    import torch.distributed as dist

    box = [obj if current().rank == src else None]
    with peer_guard():
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    ctx = current()
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    with peer_guard():
        dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values, device) -> list[float]:
    """Element-wise sum of a list of numbers over the ranks (float64)."""
    if not current().enabled:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    with peer_guard():
        dist.all_reduce(t)
    return t.tolist()


class MirroredError(Exception):
    """Marks an error that rank 0 raised and the other ranks repeat (the CLI prints it once)."""


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give its result (or its UtsError) to every rank.

    The other ranks wait; when ``fn`` raises a :class:`~uts_cli.errors.UtsError`, each of them
    raises one of the same type and text, flagged ``mirrored`` so that only rank 0 prints it.
    Other exceptions on rank 0 are re-raised there and reported to the others as an internal error.
    """
    ctx = current()
    if not ctx.enabled:
        return fn()
    outcome: tuple[str, Any]
    error: BaseException | None = None
    # Everyone arrives first: a rank still reading what fn is about to change (e.g. checking
    # that a run folder is empty) must be done before rank 0 changes it.
    barrier()
    if ctx.is_main:
        try:
            outcome = ("ok", fn())
        except UtsError as exc:
            error = exc
            outcome = ("error", (type(exc), exc.message, exc.hint))
        except BaseException as exc:  # still tell the others, then fail here
            error = exc
            outcome = ("error", (UtsError, f"rank 0 failed: {type(exc).__name__}: {_first_line(exc)}",
                                 "see rank 0's output"))
    else:
        outcome = ("wait", None)
    outcome = broadcast_object(outcome)
    if outcome[0] == "ok":
        return outcome[1]
    if error is not None:
        raise error
    cls, message, hint = outcome[1]
    mirrored = cls(message, hint=hint)
    mirrored.mirrored = True  # type: ignore[attr-defined]
    raise mirrored


# --------------------------------------------------------------------------------------------
# Agreeing to stop
# --------------------------------------------------------------------------------------------


class StopVote:
    """Decide together, once per step, whether any rank wants to stop.

    Every rank calls :meth:`vote` after each step with its own wish; all of them get the same
    answer at the same step, so they stop together and no rank waits in a collective for a
    partner that left. On CUDA the answer is the vote of the *previous* step, read through
    pinned memory, so the host never waits for the step just queued (one step later, then);
    on CPU it is the current vote.
    """

    def __init__(self, device):
        import torch

        self.ctx = current()
        self.device = device
        self.cuda = device.type == "cuda"
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.host = torch.zeros(1, dtype=torch.int32, pin_memory=self.cuda)
        self.event = None

    def vote(self, wish: bool) -> bool:
        if not self.ctx.enabled:
            return bool(wish)
        import torch
        import torch.distributed as dist

        with peer_guard():
            if not self.cuda:
                self.flag.fill_(int(bool(wish)))
                dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
                return bool(self.flag.item())
            previous = False
            if self.event is not None:
                self.event.synchronize()  # long done: it was recorded a step ago
                previous = bool(self.host.item())
            self.flag.fill_(int(bool(wish)))
            dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
            self.host.copy_(self.flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            return previous

    def settle(self, wish: bool) -> bool:
        """A final, synchronous vote (at the end of an epoch, where a sync costs nothing)."""
        if not self.ctx.enabled:
            return bool(wish)
        import torch.distributed as dist

        with peer_guard():
            if self.event is not None:
                self.event.synchronize()
                wish = wish or bool(self.host.item())
                self.event = None
            self.flag.fill_(int(bool(wish)))
            dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
            return bool(self.flag.item())


# --------------------------------------------------------------------------------------------
# Sharding (pure functions)
# --------------------------------------------------------------------------------------------


def shard_by_size(sizes: Sequence[float], world_size: int, rank: int) -> list[int]:
    """Positions of the items rank ``rank`` processes, balanced by size so ranks finish together.

    Largest first, each item goes to the rank with the least total so far (ties: the lower
    rank); equal sizes keep their input order. The result depends only on ``sizes`` and
    ``world_size``, so every rank computes the same split without talking to the others, each
    item lands on exactly one rank, and a rank with nothing to do gets an empty list.

    Args:
        sizes: a cost per item (e.g. slide pixels); must be finite and >= 0.
        world_size: number of ranks (>= 1).
        rank: this rank, ``0 <= rank < world_size``.

    Returns:
        This rank's item positions, in increasing order.

    Raises:
        ValueError: a bad world size or rank, or a negative or non-finite size.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    s = np.asarray(sizes, dtype=np.float64).reshape(-1)
    if len(s) and (not np.all(np.isfinite(s)) or s.min() < 0):
        raise ValueError("sizes must be finite and >= 0")
    order = np.argsort(-s, kind="stable")
    load = np.zeros(world_size)
    mine = []
    for i in order:
        r = int(np.argmin(load))  # argmin returns the first (lowest) rank on ties
        load[r] += s[i]
        if r == rank:
            mine.append(int(i))
    return sorted(mine)


def shard_strided(n: int, world_size: int, rank: int) -> np.ndarray:
    """Positions ``rank, rank + world, ...`` of ``n`` items (equal-cost items, e.g. patches)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    return np.arange(rank, n, world_size, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Model and random streams
# --------------------------------------------------------------------------------------------


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed for rank ``rank``'s own random stream (augmentation); rank 0 at step 0 keeps ``seed``."""
    if rank == 0 and step == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1)[0])


def wrap_model(model, device, sync_bn: bool = False):
    """``model`` wrapped in DistributedDataParallel when distributed (else ``model`` itself).

    With ``sync_bn`` the BatchNorm layers are replaced in place by SyncBatchNorm first, so batch
    statistics are computed over the global batch (``model`` keeps its identity and state keys).
    """
    ctx = current()
    if not ctx.enabled:
        return model
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    cuda = device.type == "cuda"
    if sync_bn and not cuda:
        raise UsageError("--sync-bn needs GPUs (torch's SyncBatchNorm does not run on CPU)",
                         hint="drop --sync-bn, or run on CUDA devices")
    if sync_bn:
        for name, child in list(model.named_children()):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    cuda = device.type == "cuda"
    # gradient_as_bucket_view: gradients live in DDP's communication buckets (no extra copy).
    return DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                   output_device=device.index if cuda else None,
                                   gradient_as_bucket_view=True)
