"""Device selection, CPU thread count and mixed-precision choice for training and inference."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from uts_cli.choices import AMP_MODES
from uts_cli.errors import ResourceError, UsageError

DEVICE_SPECS = "auto, cpu, cuda or cuda:N"
_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a ``--device`` value into a ``torch.device``.

    Args:
        spec: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        The device to use.

    Raises:
        ResourceError: CUDA was asked for but is not available, or ``N`` is not a visible GPU.
        UsageError: ``spec`` is none of the accepted forms.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = _CUDA_RE.match(text)
    if m is None:
        raise UsageError(f"unknown device {spec!r}", hint=f"use one of: {DEVICE_SPECS}")
    if not torch.cuda.is_available():
        raise ResourceError("CUDA requested but torch.cuda.is_available() is False",
                            hint="use --device cpu or auto")
    if m.group(1) is None:
        return torch.device("cuda")
    index = int(m.group(1))
    count = torch.cuda.device_count()
    if index >= count:
        raise ResourceError(f"CUDA device {index} requested but only {count} visible",
                            hint="pick cuda:0..cuda:%d, or choose GPUs with CUDA_VISIBLE_DEVICES"
                                 % (count - 1))
    return torch.device("cuda", index)


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def configure_cpu_threads(num_threads: int | None = None) -> int:
    """Set the number of intra-op CPU threads torch uses, and return it.

    An explicit ``num_threads`` wins. Otherwise a thread count the user already chose stays:
    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` in the environment, or a ``torch.set_num_threads`` value
    at or below the CPUs this process may use. Torch's own default counts the host's cores even
    inside a container limited to fewer, so only a count above the affinity set is lowered.

    Args:
        num_threads: threads to use, or None to keep/cap the current setting.

    Returns:
        The thread count now in effect.

    Raises:
        UsageError: ``num_threads`` is below 1.
    """
    if num_threads is not None:
        if num_threads < 1:
            raise UsageError(f"thread count must be >= 1 (got {num_threads})", hint="pass a positive number")
        torch.set_num_threads(int(num_threads))
    elif not (os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")):
        cpus = available_cpus()
        if torch.get_num_threads() > cpus:
            torch.set_num_threads(cpus)
    return torch.get_num_threads()


@dataclass(frozen=True)
class AmpPolicy:
    """How to run autocast on a device: ``dtype`` None means full float32."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def needs_scaler(self) -> bool:
        # bf16 has float32's exponent range, so only fp16 gradients need loss scaling.
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        """A ``torch.autocast`` context (a no-op one when AMP is off)."""
        return torch.autocast(device_type=self.device_type, dtype=self.dtype or torch.float32,
                              enabled=self.enabled)


def resolve_amp(amp: str | bool, device: torch.device) -> AmpPolicy:
    """Choose the mixed-precision mode.

    ``auto`` is bf16 on a CUDA device that supports it, fp16 (with a GradScaler) on older GPUs,
    and off on CPU (CPU autocast is rarely faster for convolutions and changes numerics).

    Args:
        amp: one of ``AMP_MODES``, or a bool (True = auto, False = off).
        device: the resolved device.

    Returns:
        The :class:`AmpPolicy`.

    Raises:
        UsageError: an unknown mode, or fp16 on a CPU.
    """
    if isinstance(amp, bool):
        amp = "auto" if amp else "off"
    mode = str(amp).lower()
    if mode not in AMP_MODES:
        raise UsageError(f"unknown AMP mode {amp!r}", hint=f"use one of: {', '.join(AMP_MODES)}")
    cuda = device.type == "cuda"
    if mode == "off" or (mode == "auto" and not cuda):
        return AmpPolicy(device.type, None)
    if mode == "fp16" and not cuda:
        raise UsageError("fp16 mixed precision needs a CUDA device", hint="use --amp bf16 or off on CPU")
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return AmpPolicy(device.type, torch.bfloat16 if mode == "bf16" else torch.float16)


def device_summary(device: torch.device) -> dict:
    """JSON-safe facts about the device, for ``config.json``/``env.json``."""
    info = {"device": str(device), "torch": torch.__version__, "num_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info.update(gpu=torch.cuda.get_device_name(index), cudnn=torch.backends.cudnn.version(),
                    bf16=torch.cuda.is_bf16_supported())
    return info
