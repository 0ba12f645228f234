"""The CUDA caching allocator as this process's memory manager: its configuration, its cache, its cap.

Three facts decide what ``nvidia-smi`` shows for our process (measured on an H200, docs/benchmarks.md):

- PyTorch's caching allocator keeps every segment it ever reserved until told otherwise: after warm-up that was
  42 GiB of cache on top of 19 GiB of weights. :func:`release` hands the unused part back (``empty_cache``);
  with **expandable segments** (:func:`configure`) memory grows and shrinks in 2 MiB pages, so re-growing for the
  next job costs little and the cache leaves no fragmented segments behind.
- Memory outside the allocator — the CUDA context, kernel modules loaded lazily as new kernels first run, library
  handles — is counted by ``nvidia-smi`` too (~1.3 GiB on an H200 after warm-up). NVML's per-process figure minus
  the allocator's reserved bytes measures it (:meth:`CudaAllocator.outside_bytes`).
- A VRAM budget therefore caps the allocator at ``budget − outside − headroom`` (:class:`ProcessBudget`), where
  ``headroom`` leaves room for the outside part to grow after it was measured.

Units: GiB (2**30 bytes) everywhere, the unit ``nvidia-smi``'s MiB figures add up to.

    >>> b = ProcessBudget(budget_bytes=24 * GiB, outside_bytes=int(1.3 * GiB), headroom_bytes=256 * MiB,
    ...                   device_total_bytes=140 * GiB)
    >>> round(b.allocator_cap_bytes / GiB, 2), round(b.fraction, 4)
    (22.45, 0.1604)
    >>> parse_tried_bytes("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of ...")
    2684354560

Nothing here runs at import; :func:`configure` must run before CUDA initialises (``zimage-ui`` does it first
thing in ``main()``, and the engine again before it touches the GPU).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from zimage_ui.units import GiB, MiB

log = logging.getLogger(__name__)

ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the second is torch ≥ 2.9's new name
DEFAULT_ALLOC_CONF = "expandable_segments:True"
_OURS = "ZIMAGE_UI_ALLOC_CONF_DEFAULT"  # set beside it, so a later call (or a child process) knows who set it
# Growth of the memory outside the allocator after it was measured: kernel modules that load lazily the first time
# a kernel runs (a new size class, the CFG path). Before warm-up most kernels are still unloaded, so more is left.
START_HEADROOM_BYTES = 1 * GiB
READY_HEADROOM_BYTES = 256 * MiB
# Without NVML we can't measure the outside part; this is the H200 figure after warm-up (docs/benchmarks.md).
DEFAULT_OUTSIDE_BYTES = int(1.3 * GiB)


@dataclass(frozen=True)
class AllocatorConfig:
    """What :func:`configure` found or did."""

    value: str | None  # the allocator configuration in force (None: PyTorch's defaults)
    source: str  # "zimage-ui default", "user (VAR)", "none" (keep_cache / too late), ...
    too_late: bool = False  # CUDA was already initialised: the variable can no longer take effect

    @property
    def expandable(self) -> bool:
        return bool(self.value) and "expandable_segments:true" in self.value.replace(" ", "").lower()

    def describe(self) -> str:
        text = f"{self.value or 'PyTorch defaults'} ({self.source})"
        return text + ("; set too late: CUDA was already initialised" if self.too_late else "")


def configure(environ: MutableMapping[str, str] | None = None) -> AllocatorConfig:
    """Turn on expandable segments unless the user configured the allocator themselves.

    Sets ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` when neither allocator variable is set. It only takes
    effect if CUDA has not initialised yet in this process (reported as ``too_late``).
    """
    env = os.environ if environ is None else environ
    for name in ALLOC_CONF_VARS:
        if env.get(name):
            ours = name == ALLOC_CONF_VARS[0] and env.get(_OURS) == env[name]
            return AllocatorConfig(env[name], "zimage-ui default" if ours else f"user ({name})")
    if environ is None and _cuda_initialised():
        return AllocatorConfig(None, "PyTorch defaults", too_late=True)
    env[ALLOC_CONF_VARS[0]] = env[_OURS] = DEFAULT_ALLOC_CONF
    return AllocatorConfig(DEFAULT_ALLOC_CONF, "zimage-ui default")


def _cuda_initialised() -> bool:
    import sys

    torch = sys.modules.get("torch")  # don't import torch just to ask
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        return False


def parse_tried_bytes(message: str) -> int:
    """The ``Tried to allocate X`` figure of a CUDA out-of-memory message, in bytes (0 when absent)."""
    match = re.search(r"Tried to allocate ([\d.]+) ?(GiB|MiB|KiB|B)\b", message)
    if not match:
        return 0
    scale = {"GiB": GiB, "MiB": MiB, "KiB": 1024, "B": 1}[match.group(2)]
    return int(float(match.group(1)) * scale)


@dataclass(frozen=True)
class ProcessBudget:
    """A VRAM budget for the whole process as ``nvidia-smi`` counts it, turned into the allocator's cap."""

    budget_bytes: int  # what nvidia-smi may show for this process, at most
    outside_bytes: int  # memory outside the allocator (context, modules, handles), measured or estimated
    headroom_bytes: int  # room for the outside part to grow after it was measured
    device_total_bytes: int  # the total that torch's memory fraction is a fraction of
    measured: bool = True  # False: outside_bytes is DEFAULT_OUTSIDE_BYTES, not a measurement

    @property
    def allocator_cap_bytes(self) -> int:
        """What the caching allocator may reserve: ``budget − outside − headroom`` (≥ 0)."""
        return max(0, self.budget_bytes - self.outside_bytes - self.headroom_bytes)

    @property
    def fraction(self) -> float:
        """The cap as ``torch.cuda.set_per_process_memory_fraction`` takes it."""
        return min(1.0, self.allocator_cap_bytes / self.device_total_bytes) if self.device_total_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "outside_bytes": self.outside_bytes,
                "headroom_bytes": self.headroom_bytes, "allocator_cap_bytes": self.allocator_cap_bytes,
                "fraction": round(self.fraction, 6), "measured": self.measured}

    def describe(self) -> str:
        how = "measured" if self.measured else "estimated"
        return (f"budget {self.budget_bytes / GiB:.2f} GiB = allocator cap {self.allocator_cap_bytes / GiB:.2f} GiB"
                f" + outside the allocator {self.outside_bytes / GiB:.2f} GiB ({how})"
                f" + headroom {self.headroom_bytes / GiB:.2f} GiB")


class AllocatorControl(Protocol):
    """What the engine asks of the device's allocator. CUDA has a real one; the CPU's does nothing; tests fake it
    (the only seam for CUDA numbers on a machine without a GPU)."""

    kind: str  # "cuda" or "cpu": budgets and releases apply to "cuda" only

    def release(self) -> int:
        """Return the allocator's unused cache to the driver; the bytes given back."""
        ...

    def reserved_bytes(self) -> int:
        ...

    def outside_bytes(self) -> int | None:
        """Memory this process holds outside the allocator, as nvidia-smi counts it; None if unmeasurable."""
        ...

    def device_total_bytes(self) -> int:
        ...

    def set_cap(self, cap_bytes: int | None) -> None:
        """Cap the allocator's reserved bytes (None: no cap)."""
        ...


class CpuAllocator:
    """The host: nothing to release or cap (Python frees as it goes)."""

    kind = "cpu"

    def release(self) -> int:
        return 0

    def reserved_bytes(self) -> int:
        return 0

    def outside_bytes(self) -> int | None:
        return 0

    def device_total_bytes(self) -> int:
        return 0

    def set_cap(self, cap_bytes: int | None) -> None:
        return None


class CudaAllocator:
    """PyTorch's caching allocator on one CUDA device."""

    kind = "cuda"

    def __init__(self, index: int) -> None:
        self.index = index

    def init(self) -> None:
        """Create the CUDA context now, so what lies outside the allocator can be measured before loading."""
        import torch

        torch.cuda.init()
        torch.empty(1, device=f"cuda:{self.index}")

    def release(self) -> int:
        import torch

        before = torch.cuda.memory_reserved(self.index)
        gc.collect()
        with torch.cuda.device(self.index):
            torch.cuda.empty_cache()
        return max(0, before - torch.cuda.memory_reserved(self.index))

    def reserved_bytes(self) -> int:
        import torch

        return int(torch.cuda.memory_reserved(self.index))

    def outside_bytes(self) -> int | None:
        from . import nvml

        used = nvml.process_used_bytes(self.index)
        return None if used is None else max(0, used - self.reserved_bytes())

    def device_total_bytes(self) -> int:
        import torch

        return int(torch.cuda.mem_get_info(self.index)[1])

    def set_cap(self, cap_bytes: int | None) -> None:
        import torch

        total = self.device_total_bytes()
        fraction = 1.0 if cap_bytes is None else min(1.0, cap_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, self.index)


def make_allocator(device: Any) -> AllocatorControl:
    """The allocator control for ``device`` (a ``torch.device`` or string)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return CudaAllocator(device.index if device.index is not None else torch.cuda.current_device())
    return CpuAllocator()


def budget_for(allocator: AllocatorControl, budget_bytes: int, headroom_bytes: int) -> ProcessBudget:
    """Measure what lies outside the allocator now and size the cap from it."""
    outside = allocator.outside_bytes()
    return ProcessBudget(budget_bytes=budget_bytes,
                         outside_bytes=DEFAULT_OUTSIDE_BYTES if outside is None else int(outside),
                         headroom_bytes=headroom_bytes, device_total_bytes=allocator.device_total_bytes(),
                         measured=outside is not None)


def timed_release(allocator: AllocatorControl) -> tuple[int, float]:
    """:meth:`AllocatorControl.release`, with the seconds it took."""
    t0 = time.perf_counter()
    released = allocator.release()
    return released, time.perf_counter() - t0
