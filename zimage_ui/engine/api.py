"""The engine's one face: everything a door (web UI, REST service, CLI, Ray Serve ingress) may use.

``Engine`` (in-process, one GPU) implements it; a remote client (``zimage_ui.scale``: replicas on Ray Serve) can stand
behind it too, so a door never knows which one it talks to. Doors type their engine as ``EngineAPI`` and touch
nothing else: no ``engine.worker``, ``engine.model``, ``engine.runners``.

    >>> from zimage_ui.engine.engine import Engine
    >>> from zimage_ui.settings import Settings
    >>> isinstance(Engine(Settings(model="demo", save_images=False)), EngineAPI)
    True

The benchmark programme needs more (the pipeline, the estimator, unloading on demand): ``BenchAPI`` names that
extension, so what only a benchmark may touch is written down in one place. Tests that must reach inside (inject a
fault, hold the queue, fake the device's memory) go through ``Engine.test_seam()`` (``engine/seam.py``), the one
documented way in; ``tests/test_face.py`` checks that the doors use nothing outside these protocols.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
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
    from .warmup import WarmupStep


LOCAL_REPLICA = "local"  # the name of the one in-process engine among "replicas" (X-Zimage-Replica, /api/v1/vram)


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
    def memory_snapshot(self) -> MemorySnapshot: ...  # raises NotReady before the model is loaded

    def gpu_stats(self) -> GpuStats | None: ...

    def predict_working_bytes(self, request: RunRequest) -> int: ...

    def admit(self, request: RunRequest) -> Admission: ...

    def replicas(self) -> list[dict[str, Any]]: ...
    # Every engine behind this face, one dict each (/api/v1/vram's ``replicas``, the per-replica metrics, the page's
    # bars): replica, host, gpu, device, state, ready, queue ({depth, running}) and snapshot (a
    # ``MemorySnapshot.to_dict()``, None while loading); Ray Serve adds pid, unloaded, available_bytes, served.
    # The in-process engine lists one, named ``LOCAL_REPLICA``.

    def target_replica(self, need_bytes: int = 0) -> str | None: ...
    # The replica that would take a request needing ``need_bytes`` now (the page marks its bar); None if none.

    # --- what it is -------------------------------------------------------------------------------------------
    def model_info(self) -> dict[str, Any]: ...
    # id, label, is_demo, trained_demo (the demo model that draws the shapes world), banner, device, dtype,
    # base_model, load/warm-up/ready seconds, stages, placement, plan, acceleration, estimator, allocator, budget
    # (a dict, or None), cache releases, oom_events, oom_recovered, idle unload counters, prompt_cache, state, reason.
    # Plain JSON values: /api/v1/info shows it as is, metrics and the page read it.

    # --- hooks (history, metrics) -----------------------------------------------------------------------------
    def add_result_hook(self, hook: Callable[[Job, JobResult], None]) -> None: ...

    def add_end_hook(self, hook: Callable[[Job], None]) -> None: ...

    def add_reject_hook(self, hook: Callable[[EngineError], None]) -> None: ...


@runtime_checkable
class BenchAPI(EngineAPI, Protocol):
    """The benchmark's extension of the face (``zimage-ui bench``): only ``bench.py`` and ``bench_memory.py`` use it.

    The bench measures the pipeline directly and the engine's memory machinery from inside, so it may read these
    (documented, public) parts of the in-process engine; a door may not."""

    @property
    def settings(self) -> Any: ...  # settings.Settings (the bench turns save_images / keep_cache off for a sweep)

    @property
    def model(self) -> Any: ...  # models.loading.LoadedModel: the pipeline a direct call measures

    @property
    def estimator(self) -> Any: ...  # memory.estimator.WorkingMemoryEstimator

    @property
    def estimator_path(self) -> Any: ...  # pathlib.Path of the saved calibration (CUDA), or None

    @property
    def placement(self) -> Any: ...  # engine.placement.AppliedPlacement, None before start

    @property
    def allocator(self) -> Any: ...  # memory.allocator.AllocatorControl, None before start

    @property
    def warmup_runs(self) -> list[dict[str, Any]]: ...  # what warm-up ran: shape, purpose, peak, seconds

    @property
    def prompt_cache(self) -> Any: ...  # engine.runner.PromptCache (cleared so that every prompt is new)

    @property
    def runners(self) -> dict[str, Any]: ...  # engine.runner.PipelineRunner by weights ("turbo", "base"): decodes

    def warmup_plan(self) -> list[WarmupStep]: ...  # what warm-up runs (engine/warmup.py), once loaded

    def weights_bytes(self) -> int: ...

    def available_working_bytes(self) -> int: ...

    def on_worker(self, fn: Callable[[], Any]) -> Future[Any]: ...  # run ``fn`` on the worker thread, in queue order

    def unload(self) -> None: ...  # on the worker thread only: ``engine.on_worker(engine.unload).result()``

    def release_cache(self, why: str) -> int: ...
