"""The one place that talks to NVML (``nvidia-ml-py``, imported as ``pynvml``); it never raises.

Every public function returns ``None`` ("not available") instead of raising when the library, the driver or the
GPU is missing, and every field of :class:`GpuStats` is ``None`` on its own when that one query is unsupported
(power on some boards, clocks under MIG). NVML is initialised lazily, once, under a lock, on the first call; nothing
happens at import. On this kind of machine (no driver) it simply says so:

    >>> from zimage_ui.memory import nvml
    >>> nvml.nvml_available() or nvml.gpu_stats(0) is None
    True
    >>> nvml.nvml_index(1, visible="3,5")  # CUDA device 1 is NVML device 5 when CUDA_VISIBLE_DEVICES=3,5
    5

CUDA index → NVML handle, in order of trust:

1. if ``torch.cuda`` is already initialised in this process: the device's PCI bus id from
   ``torch.cuda.get_device_properties`` (exact, whatever ``CUDA_VISIBLE_DEVICES``/``CUDA_DEVICE_ORDER`` say);
   we never initialise CUDA ourselves, because that would create a CUDA context (hundreds of MB) in a process
   that may only want to print ``doctor`` output;
2. else ``CUDA_VISIBLE_DEVICES`` when it is a list of integers: CUDA index i → NVML index ``visible[i]``;
3. else the same index (right unless the host mixes GPU models and ``CUDA_DEVICE_ORDER`` is not ``PCI_BUS_ID``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
# init: None = not tried yet, True = usable, False = failed (we don't retry: a missing driver won't appear later,
# and the UI timer would otherwise pay for a failed dlopen every tick).
_state: dict[str, Any] = {"init": None, "lib": None, "error": None, "handles": {}}


@dataclass(frozen=True)
class GpuStats:
    """One reading of a GPU's counters; any field is ``None`` where NVML can't tell."""

    index: int
    name: str | None
    driver_version: str | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    utilization_percent: int | None
    sm_clock_mhz: int | None
    memory_clock_mhz: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        return asdict(self)


def _lib() -> Any | None:
    """The initialised ``pynvml`` module, or ``None`` (no library, no driver, no GPU)."""
    with _lock:
        if _state["init"] is None:
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
                _state.update(init=False, error=f"{type(exc).__name__}: {exc}")
            else:
                _state.update(init=True, lib=pynvml)
        return _state["lib"] if _state["init"] else None


def _reset() -> None:
    """Forget the initialisation and cached handles (tests swap in a fake ``pynvml``)."""
    with _lock:
        _state.update(init=None, lib=None, error=None, handles={})


def _try(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception:  # NVMLError_NotSupported, NoPermission, GpuIsLost, ...: one NA field, not a crash
        return None


def _text(value: Any) -> str | None:
    # older nvidia-ml-py releases return bytes for names and versions
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def nvml_available() -> bool:
    """True when NVML initialised (library and driver present)."""
    return _lib() is not None


def nvml_error() -> str | None:
    """Why NVML is unavailable (for ``doctor``), or ``None`` when it works or was not tried yet."""
    _lib()
    return _state["error"]


def nvml_index(cuda_index: int, visible: str | None = None) -> int:
    """NVML index of CUDA device ``cuda_index`` from ``CUDA_VISIBLE_DEVICES`` (``visible``; env when ``None``).

    Integer lists map position → value; anything else (unset, UUIDs, MIG names) maps to the same index.
    """
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        items = [item.strip() for item in visible.split(",") if item.strip()]
        try:
            numbers = [int(item) for item in items]
        except ValueError:
            return cuda_index
        if 0 <= cuda_index < len(numbers) and numbers[cuda_index] >= 0:
            return numbers[cuda_index]
    return cuda_index


def _pci_bus_id(cuda_index: int) -> str | None:
    """PCI bus id of a CUDA device, only if this process already initialised CUDA (see module docstring)."""
    try:
        import torch

        if not torch.cuda.is_initialized():
            return None
        props = torch.cuda.get_device_properties(cuda_index)
        return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except Exception:
        return None


def _handle(cuda_index: int) -> Any | None:
    lib = _lib()
    if lib is None:
        return None
    with _lock:
        if cuda_index in _state["handles"]:
            return _state["handles"][cuda_index]
    handle = None
    bus_id = _pci_bus_id(cuda_index)
    if bus_id is not None:
        handle = _try(lambda: lib.nvmlDeviceGetHandleByPciBusId(bus_id))
    if handle is None:
        handle = _try(lambda: lib.nvmlDeviceGetHandleByIndex(nvml_index(cuda_index)))
    if handle is not None:
        with _lock:
            _state["handles"][cuda_index] = handle
    return handle


def device_memory(index: int) -> tuple[int, int] | None:
    """``(total, used)`` bytes of CUDA device ``index`` as NVML sees them (all processes), or ``None``."""
    lib, handle = _lib(), _handle(index)
    if lib is None or handle is None:
        return None
    info = _try(lambda: lib.nvmlDeviceGetMemoryInfo(handle))
    if info is None:
        return None
    return int(info.total), int(info.used)


def process_used_bytes(index: int, pid: int | None = None) -> int | None:
    """Device memory NVML attributes to process ``pid`` (default: this one) on CUDA device ``index``.

    ``None`` when NVML is unavailable, or when no entry carries this pid (no CUDA context yet, Windows WDDM, or a
    container whose PID namespace hides the host PIDs NVML reports). Entries are summed within the compute list and
    within the graphics list; across the two lists we take the larger sum, because a process holding both kinds of
    context appears in both lists with the same usage and adding them would count it twice.
    """
    lib, handle = _lib(), _handle(index)
    if lib is None or handle is None:
        return None
    pid = os.getpid() if pid is None else pid
    sums: list[int] = []
    for query in (lib.nvmlDeviceGetComputeRunningProcesses, lib.nvmlDeviceGetGraphicsRunningProcesses):
        procs = _try(lambda query=query: query(handle)) or []
        used = [int(p.usedGpuMemory) for p in procs if p.pid == pid and p.usedGpuMemory is not None]
        if used:
            sums.append(sum(used))
    return max(sums) if sums else None


def driver_version() -> str | None:
    """The NVIDIA driver version string, or ``None``."""
    lib = _lib()
    return None if lib is None else _text(_try(lib.nvmlSystemGetDriverVersion))


def gpu_stats(index: int) -> GpuStats | None:
    """Utilisation, clocks, temperature, power and memory of CUDA device ``index``, or ``None`` without NVML."""
    lib, handle = _lib(), _handle(index)
    if lib is None or handle is None:
        return None
    memory = _try(lambda: lib.nvmlDeviceGetMemoryInfo(handle))
    utilization = _try(lambda: lib.nvmlDeviceGetUtilizationRates(handle))
    power_mw = _try(lambda: lib.nvmlDeviceGetPowerUsage(handle))
    limit_mw = _try(lambda: lib.nvmlDeviceGetEnforcedPowerLimit(handle))
    return GpuStats(
        index=index,
        name=_text(_try(lambda: lib.nvmlDeviceGetName(handle))),
        driver_version=driver_version(),
        memory_total_bytes=None if memory is None else int(memory.total),
        memory_used_bytes=None if memory is None else int(memory.used),
        utilization_percent=None if utilization is None else int(utilization.gpu),
        sm_clock_mhz=_try(lambda: int(lib.nvmlDeviceGetClockInfo(handle, lib.NVML_CLOCK_SM))),
        memory_clock_mhz=_try(lambda: int(lib.nvmlDeviceGetClockInfo(handle, lib.NVML_CLOCK_MEM))),
        temperature_c=_try(lambda: int(lib.nvmlDeviceGetTemperature(handle, lib.NVML_TEMPERATURE_GPU))),
        power_w=None if power_mw is None else power_mw / 1000.0,  # NVML reports milliwatts
        power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
    )
