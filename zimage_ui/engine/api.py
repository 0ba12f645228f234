"""The engine's one face: everything a door (web UI, REST service, CLI, Ray Serve ingress) may use.

``Engine`` (in-process, one GPU) implements it; a remote client (``zimage_ui.scale``: replicas on Ray Serve) can stand
behind it too, so a door never knows which one it talks to. Doors type their engine as ``EngineAPI`` and touch
nothing else: no ``engine.worker``, ``engine.model``, ``engine.runners``.

    >>> from zimage_ui.engine.engine import Engine
    >>> from zimage_ui.settings import Settings
    >>> isinstance(Engine(Settings(model="demo", save_images=False)), EngineAPI)
    True

The benchmark programme needs more (the pipeline, the estimator, unloading on demand): ``BenchAPI`` names that
extension, so what only a benchmark may touch is written down in one place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the types only; importing this module loads no torch
    from ..memory.admission import Admission
    from ..memory.nvml import GpuStats
    from ..memory.probe import MemorySnapshot
    from ..messages import Message
    from ..presets import PresetBook
    from ..validation import GenerationRequest, RunRequest, Validated
    from .jobs import EngineError, Job, JobResult, JobStatus


@dataclass(frozen=True)
class QueueInfo:
    """The serial queue as a door reports it (``/api/v1/info``) and the watchdog watches it."""

    depth: int  # jobs waiting or running
    running_job: Job | None  # the job on the GPU now, if any
    last_heartbeat: float  # time.monotonic() of the worker's last sign of progress


@runtime_checkable
class EngineAPI(Protocol):
    """What a door may use. Refusals are the ``engine.jobs`` errors (``NotReady``, ``MemoryRefused``, ``QueueFull``,
    ``ClientBusy``) and ``validation.RequestError``; nothing else crosses this face as an exception."""

    # --- life -------------------------------------------------------------------------------------------------
    @property
    def state(self) -> Any: ...  # EngineState: new → loading → warming → ready | failed; stopped

    @property
    def reason(self) -> str: ...  # a short sentence on the state ("warming up", the start-up error)

    @property
    def ready(self) -> bool: ...

    def start(self) -> None: ...

    def start_in_background(self) -> threading.Thread: ...

    def shutdown(self, grace_s: float = 10.0) -> None: ...

    # --- requests ---------------------------------------------------------------------------------------------
    def presets(self) -> PresetBook: ...

    def validate(self, raw: GenerationRequest | Mapping[str, Any]) -> Validated: ...

    def notes_for(self, request: RunRequest) -> list[Message]: ...

    def submit(self, raw: GenerationRequest | Mapping[str, Any] | Validated, *, owner: str | None = None) -> Job: ...

    def generate(self, raw: GenerationRequest | Mapping[str, Any] | Validated, *, owner: str | None = None,
                 timeout: float | None = None) -> JobResult: ...

    def status(self, job: Job) -> JobStatus: ...

    def cancel(self, job: Job) -> None: ...

    def cancel_owner(self, owner: str) -> int: ...

    def queue_info(self) -> QueueInfo: ...

    # --- memory -----------------------------------------------------------------------------------------------
    def memory_snapshot(self) -> MemorySnapshot: ...

    def gpu_stats(self) -> GpuStats | None: ...

    def predict_working_bytes(self, request: RunRequest) -> int: ...

    def admit(self, request: RunRequest) -> Admission: ...

    # --- what it is -------------------------------------------------------------------------------------------
    def model_info(self) -> dict[str, Any]: ...

    # --- hooks (history, metrics) -----------------------------------------------------------------------------
    def add_result_hook(self, hook: Callable[[Job, JobResult], None]) -> None: ...

    def add_end_hook(self, hook: Callable[[Job], None]) -> None: ...

    def add_reject_hook(self, hook: Callable[[EngineError], None]) -> None: ...


@runtime_checkable
class BenchAPI(EngineAPI, Protocol):
    """The benchmark's extension of the face (``zimage-ui bench``): only ``bench.py`` and ``bench_memory.py`` use it."""

    @property
    def settings(self) -> Any: ...

    @property
    def model(self) -> Any: ...  # models.loading.LoadedModel: the pipeline a direct call measures

    @property
    def estimator(self) -> Any: ...

    def unload(self) -> None: ...

    def release_cache(self, why: str) -> int: ...
