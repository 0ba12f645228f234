"""One typed snapshot of device memory, split into the segments the VRAM bar draws.

    >>> import torch
    >>> from zimage_ui.memory import make_probe
    >>> probe = make_probe(torch.device("cpu"), weights_bytes=lambda: 0)
    >>> snap = probe.snapshot()
    >>> snap.label, sum(size for _, size in snap.segments()) == snap.total_bytes
    ('CPU · RAM', True)
    >>> [name for name, _ in snap.segments()]
    ['weights', 'working', 'cache', 'other', 'free']

What each segment means (``compose_snapshot`` is the one place this arithmetic lives):

========  ===========================================  ================================================
segment   CUDA                                         CPU
========  ===========================================  ================================================
weights   parameters + buffers of the model on the     the same, in RAM
          device (the ``weights_bytes`` callable)
working   ``memory_allocated − weights``: activations  RSS growth of this process above the idle
          and temporaries of the running job           baseline (``mark_baseline``; 0 before it)
cache     ``memory_reserved − memory_allocated``:      0
          held by PyTorch's caching allocator, free
          for our next allocation
other     device used − ``memory_reserved``: our own   RAM used (total − available) − weights −
          CUDA context/cuBLAS workspaces, the          working: other processes, and our interpreter
          driver's reserve *and* other processes       and libraries
          (NVML splits them when it can)
free      the rest (= ``mem_get_info`` free)           the rest (≈ ``psutil`` available)
========  ===========================================  ================================================

"Device total" and "device used" are NVML's when NVML works (what ``nvidia-smi`` shows), else ``total − free`` from
``torch.cuda.mem_get_info``. The two agree on *free* but not on *total*: the CUDA runtime leaves out memory the
driver keeps for itself (480 MiB on the H100s we measured, in every reading: docs/benchmarks.md), so a bar built on
``mem_get_info`` alone sat a constant 0.47 GiB below ``nvidia-smi`` — 6% of the used figure on a small budget.
``device_totals`` reconciles them: NVML's total and used, with ``free`` never above what ``mem_get_info`` says an
allocation will meet; the driver's share lands in ``other``. NVML's per-process figures ride along in
``snapshot.nvml`` and split ``other`` (``context_bytes`` vs ``other_processes_bytes``) for whoever reads it.

Segments are clamped in bar order — weights, working, cache, other — each to ``[0, what is left of total]``, and
``free`` takes the remainder, so they always sum exactly to ``total_bytes`` and none is negative; inconsistent
readings (taken microseconds apart while a job allocates) shrink the later segments, ``other`` first among the
used ones, and never push the sum past the total.

The probe never calls ``torch.cuda.synchronize()``: it runs on a UI timer beside generation, and the allocator
counters it reads are host-side bookkeeping that need no sync.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import psutil
import torch

from zimage_ui.memory import nvml

SEGMENT_NAMES = ("weights", "working", "cache", "other", "free")
LABELS = {"cuda": "GPU · VRAM", "cpu": "CPU · RAM"}


@dataclass(frozen=True)
class RawMemory:
    """Raw facts read from a device, before any arithmetic. Bytes throughout.

    On CPU ``allocated`` and ``reserved`` are both this process's RSS and ``peak_allocated`` is ``None`` (the probe
    tracks the CPU peak itself from ``sample()`` calls).
    """

    kind: str
    name: str
    total: int
    allocated: int
    reserved: int
    device_used: int
    peak_allocated: int | None = None
    process_used: int | None = None  # NVML's figure for this process; None without NVML
    nvml: dict[str, Any] | None = None


@dataclass(frozen=True)
class MemorySnapshot:
    """Memory of one device at one moment; the five segments sum exactly to ``total_bytes``."""

    device_kind: str
    device_name: str
    label: str
    total_bytes: int
    weights_bytes: int
    working_bytes: int
    cache_bytes: int
    other_bytes: int
    free_bytes: int
    peak_working_bytes: int
    nvml: dict[str, Any] | None = None

    def segments(self) -> list[tuple[str, int]]:
        """``[(name, bytes), ...]`` in the bar's order: weights, working, cache, other, free."""
        return [
            ("weights", self.weights_bytes),
            ("working", self.working_bytes),
            ("cache", self.cache_bytes),
            ("other", self.other_bytes),
            ("free", self.free_bytes),
        ]

    @property
    def used_bytes(self) -> int:
        """Everything but ``free``."""
        return self.total_bytes - self.free_bytes

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemorySnapshot:
        """The snapshot ``to_dict`` wrote (its extra keys, ``used_bytes`` and ``segments``, are derived)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (ints for every ``*_bytes``), plus ``segments`` in bar order; for ``/api/v1/vram``."""
        data = asdict(self)
        data["used_bytes"] = self.used_bytes
        data["segments"] = [{"name": name, "bytes": size} for name, size in self.segments()]
        return data


def compose_snapshot(
    raw: RawMemory,
    weights_bytes: int,
    baseline_bytes: int | None = None,
    peak_growth_bytes: int = 0,
) -> MemorySnapshot:
    """Turn raw facts into segments (pure arithmetic; see the module docstring for the definitions).

    ``baseline_bytes`` and ``peak_growth_bytes`` are the CPU probe's idle RSS and its largest RSS growth seen.
    """
    total = max(0, int(raw.total))
    if raw.kind == "cuda":
        working = raw.allocated - weights_bytes
        cache = raw.reserved - raw.allocated
        other = raw.device_used - raw.reserved
        peak = (raw.peak_allocated if raw.peak_allocated is not None else raw.allocated) - weights_bytes
    else:
        working = 0 if baseline_bytes is None else raw.allocated - baseline_bytes
        cache = 0
        other = raw.device_used - weights_bytes - max(0, working)
        peak = peak_growth_bytes

    left = total
    parts = []
    for value in (weights_bytes, working, cache, other):
        part = min(max(0, int(value)), left)
        parts.append(part)
        left -= part
    weights, working, cache, other = parts
    return MemorySnapshot(
        device_kind=raw.kind,
        device_name=raw.name,
        label=LABELS.get(raw.kind, f"{raw.kind.upper()} · memory"),
        total_bytes=total,
        weights_bytes=weights,
        working_bytes=working,
        cache_bytes=cache,
        other_bytes=other,
        free_bytes=left,
        # the peak since the last reset can't be below what is in use right now
        peak_working_bytes=max(0, int(peak), working),
        nvml=raw.nvml,
    )


class MemorySource(Protocol):
    """Where raw memory facts come from: a CUDA device, the host's RAM, or a test's fake."""

    def read(self) -> RawMemory:
        """Read the raw facts now."""
        ...

    def reset_peak(self) -> None:
        """Restart the device's own peak counter, if it has one."""
        ...


class CudaMemorySource:
    """Reads ``torch.cuda`` allocator counters and ``mem_get_info``, plus NVML through :mod:`.nvml` when present."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._name: str | None = None
        self._driver: str | None = None

    def read(self) -> RawMemory:
        """Read allocator counters and device free/total (no synchronize)."""
        free, total = torch.cuda.mem_get_info(self.index)
        allocated = torch.cuda.memory_allocated(self.index)
        reserved = torch.cuda.memory_reserved(self.index)
        peak = torch.cuda.max_memory_allocated(self.index)
        if self._name is None:
            self._name = torch.cuda.get_device_name(self.index)
        process_used, nvml_facts = self._nvml_facts(reserved)
        total, used = device_totals(int(total), int(free), nvml_facts)
        return RawMemory(
            kind="cuda",
            name=self._name,
            total=total,
            allocated=int(allocated),
            reserved=int(reserved),
            device_used=used,
            peak_allocated=int(peak),
            process_used=process_used,
            nvml=nvml_facts,
        )

    def _nvml_facts(self, reserved: int) -> tuple[int | None, dict[str, Any] | None]:
        device = nvml.device_memory(self.index)
        if device is None:
            return None, None
        total, used = device
        process_used = nvml.process_used_bytes(self.index)
        facts: dict[str, Any] = {
            "device_total_bytes": total,
            "device_used_bytes": used,
            "process_used_bytes": process_used,
            # what this process holds outside PyTorch's allocator: CUDA context, cuBLAS/cuDNN workspaces
            "context_bytes": None if process_used is None else max(0, process_used - reserved),
            "other_processes_bytes": None if process_used is None else max(0, used - process_used),
            "driver_version": self._driver_version(),
        }
        return process_used, facts

    def _driver_version(self) -> str | None:
        if self._driver is None:  # constant for the process's life; spare the UI timer the query
            self._driver = nvml.driver_version()
        return self._driver

    def reset_peak(self) -> None:
        """``torch.cuda.reset_peak_memory_stats`` for this device."""
        torch.cuda.reset_peak_memory_stats(self.index)


def device_totals(runtime_total: int, runtime_free: int, nvml_facts: dict[str, Any] | None) -> tuple[int, int]:
    """``(total, used)`` for the bar from ``mem_get_info``'s figures and NVML's (see the module docstring).

    NVML's are used when they describe this device: its total at least the runtime's and at most 5% above it (a MIG
    slice, or a handle for another GPU, fails this and keeps the runtime's view). ``used`` is never below
    ``total − runtime_free``, so the bar never shows more free memory than an allocation would find.

    >>> device_totals(85_017_493_504, 17_523_998_720, {"device_total_bytes": 85_520_809_984,
    ...                                                "device_used_bytes": 67_996_811_264})
    (85520809984, 67996811264)
    >>> device_totals(80, 30, None)
    (80, 50)
    """
    nvml_total = (nvml_facts or {}).get("device_total_bytes")
    nvml_used = (nvml_facts or {}).get("device_used_bytes")
    if nvml_total is None or nvml_used is None or not runtime_total <= nvml_total <= runtime_total * 1.05:
        return runtime_total, runtime_total - runtime_free
    return int(nvml_total), max(int(nvml_used), int(nvml_total) - runtime_free)


class CpuMemorySource:
    """Reads host RAM (``psutil.virtual_memory``) and this process's RSS."""

    def __init__(self) -> None:
        self._process = psutil.Process()

    def read(self) -> RawMemory:
        """Read total/available RAM and this process's RSS."""
        vm = psutil.virtual_memory()
        rss = int(self._process.memory_info().rss)
        return RawMemory(
            kind="cpu",
            name="CPU",
            total=int(vm.total),
            allocated=rss,
            reserved=rss,
            device_used=int(vm.total - vm.available),
        )

    def reset_peak(self) -> None:
        """Nothing to do: the probe tracks the CPU peak itself."""


class MemoryProbe:
    """Snapshots for the bar and the API; safe to call from a UI timer thread while the worker generates."""

    def __init__(self, source: MemorySource, weights_bytes: Callable[[], int]) -> None:
        self.source = source
        self.weights_bytes = weights_bytes
        self._lock = threading.Lock()
        self._baseline: int | None = None
        self._peak_growth = 0

    def _observe(self, raw: RawMemory) -> None:
        if raw.kind == "cuda":
            return
        with self._lock:
            if self._baseline is not None:
                self._peak_growth = max(self._peak_growth, raw.allocated - self._baseline)

    def mark_baseline(self) -> None:
        """CPU: record this process's RSS now as the idle baseline (after load + warm-up). CUDA: nothing needed."""
        raw = self.source.read()
        if raw.kind != "cuda":
            with self._lock:
                self._baseline = raw.allocated
                self._peak_growth = 0

    def reset_peak(self) -> None:
        """Start of a job: reset the device peak counter (CUDA) or the tracked RSS maximum (CPU)."""
        self.source.reset_peak()
        with self._lock:
            self._peak_growth = 0

    def sample(self) -> None:
        """CPU: fold the current RSS into the tracked maximum (call on every step). CUDA: the allocator does this."""
        raw = self.source.read()
        self._observe(raw)

    def snapshot(self) -> MemorySnapshot:
        """Read the source and compose a :class:`MemorySnapshot`."""
        raw = self.source.read()
        self._observe(raw)
        weights = int(self.weights_bytes())
        with self._lock:
            baseline, peak_growth = self._baseline, self._peak_growth
        return compose_snapshot(raw, weights, baseline, peak_growth)


def weights_on_device(modules: Iterable[torch.nn.Module | None], device: torch.device | str) -> int:
    """Bytes of parameters and buffers of ``modules`` that live on ``device`` (shared storage counted once).

    A ready-made ``weights_bytes`` callable: ``lambda: weights_on_device(pipe.components.values(), device)``.
    """
    device = torch.device(device)
    seen: set[tuple[str, int]] = set()
    total = 0
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue  # pipelines list tokenizers and schedulers among their components
        for tensor in (t for top in (*module.parameters(), *module.buffers()) for t in _plain_parts(top)):
            if tensor.device.type != device.type or (device.index is not None and tensor.device.index != device.index):
                continue
            if tensor.device.type == "meta":
                continue
            key = (str(tensor.device), tensor.data_ptr())
            if key in seen:  # tied weights (Qwen3's embeddings) are one tensor reached twice
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _plain_parts(tensor: torch.Tensor) -> Iterable[torch.Tensor]:
    """The tensors that hold ``tensor``'s bytes: itself, or for a wrapper subclass (torchao's fp8 weights) its
    inner tensors, which own the storage (the wrapper's own ``data_ptr()`` is 0 for all of them)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _plain_parts(getattr(tensor, name))
    else:
        yield tensor


def make_probe(device: torch.device | str, weights_bytes: Callable[[], int]) -> MemoryProbe:
    """A probe for ``device``: CUDA allocator + NVML for ``cuda``, host RAM for anything else."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return MemoryProbe(CudaMemorySource(index), weights_bytes)
    return MemoryProbe(CpuMemorySource(), weights_bytes)
