"""The engine: one preloaded pipeline, one serial worker, one memory probe — shared by every door.

    >>> from zimage_ui.settings import Settings
    >>> engine = Engine(Settings(model="demo", save_images=False))
    >>> engine.state.value
    'new'

``start()`` loads the model and warms it up (nothing happens at construction or import). Doors call
``validate`` / ``submit`` / ``generate``; they never touch the pipeline themselves.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..messages import Message, Word
from ..metadata import save_png
from ..presets import PresetBook, load_presets
from ..settings import Settings
from ..validation import GenerationRequest, RunRequest, Validated, validate
from .api import LOCAL_REPLICA, QueueInfo
from .boot import Runtime, boot
from .eta import StepTimer
from .jobs import EngineError, Job, JobFailed, JobResult, JobStatus, MemoryRefused, NotReady
from .runner import PipelineRunner, PromptCache
from .warmup import WarmupStep, steps_to_run, warmup_plan
from .worker import SerialWorker

if TYPE_CHECKING:
    from ..memory.admission import Admission
    from ..memory.nvml import GpuStats
    from ..memory.probe import MemorySnapshot
    from .seam import TestSeam

log = logging.getLogger(__name__)


def _runtime_view(name: str, before: Any, doc: str) -> property:
    """A read-only attribute of the engine that is its ``runtime``'s ``name`` (``before`` until start-up)."""
    return property(lambda self: getattr(self.runtime, name) if self.runtime is not None else before, doc=doc)


class EngineState(enum.StrEnum):
    NEW = "new"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class Engine:
    """Loads once, then runs every door's requests through one queue."""

    def __init__(self, settings: Settings, *, book: PresetBook | None = None,
                 loader: Callable[[Settings, Any], Any] | None = None, allocator: Any = None):
        """``loader(settings, device)`` replaces model resolution and loading (the benchmark's synthetic model);
        it returns a ``LoadedModel``. ``allocator`` replaces the device's allocator control
        (``memory.allocator.AllocatorControl``): the test seam for CUDA's numbers on a machine without a GPU."""
        self.settings = settings
        self._allocator_override = allocator
        self.allocator: Any = None  # memory.allocator.AllocatorControl
        self.allocator_config: Any = None  # memory.allocator.AllocatorConfig
        self.budget: Any = None  # memory.allocator.ProcessBudget when a VRAM budget is set
        self.releases = 0  # allocator cache releases (idle, after warm-up)
        self.released_bytes = 0
        self.last_release: dict[str, Any] | None = None
        self.oom_events: dict[str, int] = {"denoise": 0, "decode": 0}  # admitted jobs that ran out of memory
        self._released_since_active = False
        self._release_lock = threading.Lock()
        self._file_book = book
        self._loader = loader
        self.runtime: Runtime | None = None  # what start-up built (engine/boot.py); model, placement... read it
        self.state = EngineState.NEW
        self.reason = "not started"
        self.timer = StepTimer()
        self.prompt_cache = PromptCache(settings.prompt_cache_size)
        self.runners: dict[str, PipelineRunner] = {}
        self.worker: SerialWorker | None = None
        self.probe: Any = None  # memory.probe.MemoryProbe
        self.estimator: Any = None  # memory.estimator.WorkingMemoryEstimator
        self.warmup_seconds = 0.0
        self.ready_seconds = 0.0  # start() to ready
        self.warmup_runs: list[dict[str, Any]] = []
        self.estimator_path: Path | None = None
        # idle unload (settings.idle_unload_minutes); only the worker thread changes these
        self.unloaded = False
        self.unloads = 0
        self.reloads = 0
        self.last_reload_seconds: float | None = None
        self._unloaded_weights_bytes = 0
        self._last_active = time.monotonic()
        self._result_hooks: list[Callable[[Job, JobResult], None]] = []
        self._end_hooks: list[Callable[[Job], None]] = []
        self._reject_hooks: list[Callable[[EngineError], None]] = []
        self._lock = threading.Lock()

    # --- what start-up built: views of engine/boot.py's Runtime (None, 0 or {} before start) ------------------
    model = _runtime_view("model", None, "``models.loading.LoadedModel``: the pipeline, its device and dtype")
    base_model = _runtime_view("base_model", None, "the ``--base-model`` weights' ``LoadedModel``, if any")
    book = _runtime_view("book", None, "the presets in force once loaded (``presets()`` answers before too)")
    placement = _runtime_view("placement", None, "``engine.placement.AppliedPlacement``")
    acceleration = _runtime_view("acceleration", None, "``engine.acceleration.AccelerationReport``")
    banner = _runtime_view("banner", None, "what the model source wants users told")
    plan = _runtime_view("plan", None, "``memory.planner.PlanResult`` when the planner chose the placement")
    load_seconds = _runtime_view("load_seconds", 0.0, "seconds loading the weights took")
    stage_seconds = _runtime_view("stage_seconds", {}, "start-up's stages in seconds (load_s ... ready_s)")

    # --- start-up -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model(s), place them on the device, accelerate, warm up, start the worker.

        Raises on failure (state FAILED, reason set).
        """
        from ..memory import allocator as alloc
        from ..models.loading import pick_device

        try:
            t_start = time.perf_counter()
            self.state, self.reason = EngineState.LOADING, "loading the model"
            self.allocator_config = alloc.configure()  # before anything touches CUDA (a no-op if main() did it)
            book = self._file_book or load_presets(self.settings.presets_file, max_side=self.settings.max_side)
            device = pick_device(self.settings.device)
            self.allocator = self._allocator_override or alloc.make_allocator(device)
            self._apply_budget(alloc.START_HEADROOM_BYTES, init=True)  # capped before a single weight is loaded

            def rebudget() -> Any:
                self._apply_budget(alloc.START_HEADROOM_BYTES)
                return self.budget

            self.runtime = boot(self.settings, book, device, cache_dir=self._cache_dir(), loader=self._loader,
                                allocator=self.allocator, budget=self.budget, rebudget=rebudget)
            self._build_probe()
            for key, loaded in (("turbo", self.model), ("base", self.base_model)):
                if loaded is not None:
                    self.runners[key] = PipelineRunner(loaded.pipe, loaded.device, model_key=loaded.model_id,
                                                       prompt_cache=self.prompt_cache, on_sample=self._sample,
                                                       memory=_EngineRunMemory(self))
            self.worker = SerialWorker(self._execute, max_queue=self.settings.max_queue,
                                       jobs_per_client=self.settings.jobs_per_client, timer=self.timer,
                                       on_idle=self._on_idle, finish=self._finish)
            self.worker.start()
            if self.settings.warmup:
                self.state, self.reason = EngineState.WARMING, "warming up"
                # on the worker's own thread: CUDA libraries keep per-thread state (handles, workspaces), and
                # the first job ran ~20% slower when warm-up had run on this one (docs/benchmarks.md)
                self.worker.call(self._warm_up).result()
            self.stage_seconds["warmup_s"] = self.warmup_seconds
            # warm-up loaded most kernels: measure what lies outside the allocator again and tighten the cap
            self._apply_budget(alloc.READY_HEADROOM_BYTES)
            self.worker.call(lambda: self.release_cache("warm-up")).result()
            if self.probe is not None:
                self.probe.mark_baseline()
            self._last_active = time.monotonic()
            self.ready_seconds = time.perf_counter() - t_start
            self.stage_seconds["ready_s"] = self.ready_seconds
            self.state, self.reason = EngineState.READY, "ready"
            log.info("ready in %.1f s: %s on %s (%s, %s), loaded in %.1f s, warm-up %.1f s; attention %s%s",
                     self.ready_seconds, self.model.label, self.model.device,
                     str(self.model.dtype).replace("torch.", ""), self.placement.name, self.load_seconds,
                     self.warmup_seconds, self.acceleration.attention.summary(),
                     ", compiled" if self.acceleration.compiled else "")
        except BaseException as exc:
            self.state, self.reason = EngineState.FAILED, str(exc)
            if self.worker is not None:
                self.worker.stop(0)
            raise

    def _cache_dir(self) -> Path:
        from .acceleration import default_cache_dir

        return Path(self.settings.cache_dir) if self.settings.cache_dir else default_cache_dir()

    def _budget_bytes(self) -> int | None:
        return self.settings.vram_budget_bytes

    def _apply_budget(self, headroom: int, *, init: bool = False) -> None:
        """Size the allocator's cap so the whole process, as nvidia-smi counts it, stays within the budget:
        ``cap = budget − (memory outside the allocator, measured now) − headroom``."""
        from ..memory.allocator import budget_for

        budget = self._budget_bytes()
        if budget is None or self.allocator is None or self.allocator.kind != "cuda":
            return
        if init and hasattr(self.allocator, "init"):
            self.allocator.init()  # the CUDA context exists before we measure what lies outside the allocator
        self.budget = budget_for(self.allocator, budget, headroom)
        self.allocator.set_cap(self.budget.allocator_cap_bytes)
        log.info("VRAM budget: %s", self.budget.describe())

    def release_cache(self, why: str) -> int:
        """Give the allocator's unused cache back to the driver (not with ``keep_cache``); the bytes released.
        Runs on the worker's thread (warm-up's end, and the idle hook once the queue is empty)."""
        from ..memory.allocator import timed_release

        if self.settings.keep_cache or self.allocator is None:
            return 0
        with self._release_lock:  # admission waits: mid-release, our own cache reads as another process's
            released, seconds = timed_release(self.allocator)
        self._released_since_active = True
        self.releases += 1
        self.released_bytes += released
        self.last_release = {"why": why, "bytes": released, "seconds": round(seconds, 4), "at": time.time()}
        if released:
            log.info("gave %.2f GiB of allocator cache back (%s) in %.0f ms", released / 2**30, why, seconds * 1e3)
        return released

    def start_in_background(self) -> threading.Thread:
        """Start on a thread (the server answers /readyz 503 meanwhile). Failures end in state FAILED."""

        def run() -> None:
            try:
                self.start()
            except Exception:
                log.exception("engine failed to start")

        thread = threading.Thread(target=run, name="zimage-engine-start", daemon=True)
        thread.start()
        return thread

    def _build_probe(self) -> None:
        from ..memory.estimator import WorkingMemoryEstimator
        from ..memory.probe import make_probe

        self.probe = make_probe(self.model.device, self.weights_bytes)
        # the prior is chosen by the model's size, wherever its weights are placed
        self.estimator = WorkingMemoryEstimator.default_for(self.model.device.type, self.model.weights_bytes())

    def weights_bytes(self) -> int:
        """Bytes of model weights that live on the engine's device now (streamed or unloaded ones don't count)."""
        from ..memory.probe import weights_on_device

        if self.model is None:
            return 0
        modules = [getattr(self.model.pipe, name, None) for name in ("transformer", "text_encoder", "vae")]
        if self.base_model is not None:
            modules.append(self.base_model.pipe.transformer)
        return weights_on_device(modules, self.model.device)

    def _sample(self) -> None:
        if self.probe is not None:
            self.probe.sample()

    def warmup_plan(self) -> list[WarmupStep]:
        """What warm-up runs for this model, these presets and this device (``engine.warmup.warmup_plan``)."""
        return warmup_plan(self.book, device_type=self.model.device.type, is_demo=self.model.is_demo)

    def _warm_up(self) -> None:
        """Run :meth:`warmup_plan` before ready: kernels load (and compile), the step timer learns this
        machine's speed, and the memory estimator is fitted to the measured peaks and saved. A calibration saved
        by an earlier start (same GPU, model, placement, dtype, torch) is loaded instead, and the runs that only
        served calibration are skipped."""
        from ..memory.estimator import WorkingMemoryEstimator, WorkShape

        t0 = time.perf_counter()
        cuda = self.model.device.type == "cuda"
        loaded = False
        if cuda:
            path = self._estimator_file()
            try:
                if path.is_file():
                    self.estimator = WorkingMemoryEstimator.load(path)
                    self.estimator_path, loaded = path, True
            except (OSError, ValueError) as exc:
                log.info("memory estimator: ignoring %s: %s", path, exc)
        compiled = bool(self.acceleration and self.acceleration.compiled)
        samples = []
        self.warmup_runs = []
        for request, purpose in steps_to_run(self.warmup_plan(), calibration_loaded=loaded, compiled=compiled):
            shape = WorkShape(request.width, request.height, request.batch, request.cfg)
            admission = self.admit(request) if cuda else None
            if admission is not None and admission.state == "over":
                self.warmup_runs.append({"shape": str(shape), "purpose": purpose, "skipped": "predicted not to fit"})
                continue
            decode_batch = admission.decode_batch if admission is not None else None
            started = time.perf_counter()
            output = self._warm_run(request, decode_batch)
            peak = self._job_peak(self.runners["turbo"])
            if decode_batch is None and not output.recovered:  # a whole-batch decode: a calibration sample
                samples.append((shape, peak))
            self.warmup_runs.append({"shape": str(shape), "purpose": purpose, "peak_working_bytes": peak,
                                     "seconds": round(time.perf_counter() - started, 3)})
            self.timer.record(request, output.timings["per_step_s"],
                              output.timings["encode_s"] + output.timings["decode_s"])
        if not loaded and len({shape for shape, _ in samples}) >= 2 and all(peak > 0 for _, peak in samples):
            try:
                self.estimator.calibrate(samples)
                if cuda:
                    self.estimator_path = self._estimator_file()
                    self.estimator.save(self.estimator_path)
            except (ValueError, OSError) as exc:  # degenerate measurements or an unwritable cache: keep going
                log.info("memory estimator: %s", exc)
        self.warmup_seconds = time.perf_counter() - t0

    def _job_peak(self, runner: PipelineRunner) -> int:
        """Peak working bytes of the run that just ended: the denoise's and the decode's (measured apart)."""
        decode = self.probe.snapshot().peak_working_bytes if self.probe is not None else 0
        return max(decode, runner.denoise_peak)

    def _learn_oom(self, request: RunRequest, phase: str, need_at_least: int) -> None:
        """An admitted job ran out of memory: count it, teach the estimator the need it revealed, keep that with
        the calibration (the same request is predicted right next time, also after a restart)."""
        from ..memory.estimator import GiB, WorkShape

        self.oom_events[phase] = self.oom_events.get(phase, 0) + 1
        if self.estimator is None:
            return
        shape = WorkShape(request.width, request.height, request.batch, request.cfg)
        before = self.estimator.predict(shape)
        after = self.estimator.learn(shape, need_at_least, phase)
        log.warning("out of memory in the %s at %s: predicted %.2f GiB, needed at least %.2f GiB; now predicting "
                    "%.2f GiB", phase, shape, before / GiB, need_at_least / GiB, after / GiB)
        if self.model is not None and self.model.device.type == "cuda":
            try:
                self.estimator_path = self.estimator_path or self._estimator_file()
                self.estimator.save(self.estimator_path)
            except OSError as exc:
                log.info("memory estimator: could not save what it learned: %s", exc)

    def _warm_run(self, request: RunRequest, decode_batch: int | None = None) -> Any:
        """One warm-up run; if compilation (or the probed attention backend under it) fails, step back and retry."""
        from .acceleration import fall_back

        while True:
            try:
                return self.runners["turbo"].run(Job(request), decode_batch=decode_batch)
            except JobFailed:
                raise  # out of memory even after the tiled retry: not a compilation problem
            except Exception as exc:
                if self.acceleration is None or not fall_back(self.model.pipe, self.acceleration, exc):
                    raise

    def _estimator_file(self) -> Path:
        """Where this GPU + model + placement + dtype + torch's calibration lives (CUDA only)."""
        import re

        import torch

        parts = [torch.cuda.get_device_name(self.model.device), self.model.model_id, self.placement.name,
                 "fp8" if self.acceleration and self.acceleration.fp8 else str(self.model.dtype).split(".")[-1],
                 "torch" + torch.__version__.split("+")[0]]
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(parts)).strip("-").lower()
        return self._cache_dir() / "estimator" / f"{slug}.json"

    # --- idle unload ----------------------------------------------------------------------------------------
    # The queue must stay empty this long before the cache goes back: a burst of requests keeps its memory.
    RELEASE_AFTER_S = 0.3

    def _on_idle(self) -> None:
        """The worker's idle hook (its thread, every half second while the queue is empty): give the allocator's
        cache back once the queue has been empty for ``RELEASE_AFTER_S``, and unload after
        ``idle_unload_minutes`` without a job."""
        idle = time.monotonic() - self._last_active
        if not self._released_since_active and idle >= self.RELEASE_AFTER_S and self.state == EngineState.READY:
            self.release_cache("queue empty")
        minutes = self.settings.idle_unload_minutes
        if minutes <= 0 or self.unloaded or self.placement is None:
            return
        if idle >= minutes * 60:
            self.unload()

    def unload(self) -> None:
        """Move the GPU-resident weights to CPU RAM and return the cached memory. Call it on the worker's thread
        (``engine.worker.call(engine.unload)``); the idle hook does."""
        from . import placement as placing

        if self.unloaded:
            return
        self._unloaded_weights_bytes = self.weights_bytes()
        for loaded in (self.model, self.base_model):
            if loaded is not None:
                placing.unload(loaded.pipe, self.placement)
        self.prompt_cache.clear()  # cached embeddings live on the GPU too
        if self.allocator is not None:
            self.allocator.release()  # even with keep_cache: unloading means giving the GPU back
        self.unloaded = True
        self.unloads += 1
        log.info("idle for %.1f min: weights moved to CPU RAM", self.settings.idle_unload_minutes)

    def reload(self) -> float:
        """Undo :meth:`unload`; returns (and records) the seconds it took."""
        from . import placement as placing

        if not self.unloaded:
            return 0.0
        seconds = 0.0
        for loaded in (self.model, self.base_model):
            if loaded is not None:
                seconds += placing.reload(loaded.pipe, self.placement)
        self.unloaded = False
        self.reloads += 1
        self.last_reload_seconds = seconds
        log.info("reloaded the weights in %.2f s", seconds)
        return seconds

    # --- doors ------------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == EngineState.READY and self.worker is not None and self.worker.alive

    def _require_ready(self) -> None:
        if not self.ready:
            raise NotReady(self.reason, state=self.state.value)

    def presets(self) -> PresetBook:
        """The presets in force (for the demo model: its smaller default size). Readable before start."""
        if self.book is not None:
            return self.book
        return self._file_book or load_presets(self.settings.presets_file, max_side=self.settings.max_side)

    def validate(self, raw: GenerationRequest | Mapping[str, Any]) -> Validated:
        """The one validator, with this model's tokenizer for the prompt-length check."""
        runner = self.runners.get("turbo")
        return validate(raw, self.presets(), count_tokens=runner.count_tokens if runner else None)

    def notes_for(self, request: RunRequest) -> list[Message]:
        """What the user should know about how a request will run (which weights serve the preset), as messages."""
        preset = self.presets().presets[request.preset]
        if preset.model == "base" and self.base_model is None and not self.model.is_demo and not self.model.is_base:
            return [Message("note.base_on_turbo", {"preset": Word(preset.name)})]
        hook = getattr(self.model.pipe.tokenizer, "request_notes", None)  # trained demo model: unknown words, size
        return hook(request) if hook else []

    # --- memory ---------------------------------------------------------------------------------------------
    def memory_snapshot(self) -> MemorySnapshot:
        """The probe's reading now (cheap, no synchronize): what the VRAM bar and /api/v1/vram show.
        Raises NotReady before the model is loaded (nothing to read yet)."""
        probe = self.probe
        if probe is None:
            raise NotReady(f"no memory reading yet: {self.reason}")
        return probe.snapshot()

    def gpu_stats(self) -> GpuStats | None:
        """NVML's reading of the engine's GPU (``memory.nvml.GpuStats``: utilisation, memory, temperature, power),
        or None without a GPU or NVML. The GPU the model is on; GPU 0 before a model is loaded or when it runs
        on the CPU. The doors ask here; only the engine and memory talk to NVML."""
        from ..memory import nvml

        device = getattr(self.model, "device", None)
        index = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
        return nvml.gpu_stats(index)

    def predict_working_bytes(self, request: RunRequest) -> int:
        from ..memory.estimator import WorkShape

        return self.estimator.predict(WorkShape(request.width, request.height, request.batch, request.cfg))

    def admit(self, request: RunRequest) -> Admission:
        """Would ``request`` fit now? An ``Admission`` (``memory.admission``) with state ok / tight / over, the
        figures and, when over, the largest size that fits at the same aspect ratio."""
        from ..memory.admission import admit_request
        from ..memory.estimator import WorkShape

        shape = WorkShape(request.width, request.height, request.batch, request.cfg)
        return admit_request(self.estimator, self._admission_snapshot(), shape, self.settings.memory_margin_bytes,
                             min_side=self.presets().limits.side[0])

    def replicas(self) -> list[dict[str, Any]]:
        """This engine as the one replica there is (``EngineAPI.replicas``): ``local``, its device and memory."""
        import socket

        try:
            snapshot = self.memory_snapshot().to_dict()
        except NotReady:
            snapshot = None
        device = self.model_info().get("device")
        queue = self.queue_info()
        return [{"replica": LOCAL_REPLICA, "host": socket.gethostname(), "gpu": device, "device": device,
                 "state": self.state.value, "ready": bool(self.ready),
                 "queue": {"depth": queue.depth, "running": queue.running_job is not None}, "snapshot": snapshot}]

    def target_replica(self, need_bytes: int = 0) -> str | None:
        """``local``: there is one engine (``EngineAPI.target_replica``)."""
        return LOCAL_REPLICA

    def _admission_snapshot(self) -> Any:
        """The snapshot admission judges against: unloaded weights count as if back, and a VRAM budget caps the
        total at what the allocator may reserve (the cap: budget less the memory outside the allocator and its
        headroom) plus what lives outside it (``other``), so ``available = min(live free, cap − weights)``."""
        with self._release_lock:
            snap = self.memory_snapshot()
        if self.unloaded:
            snap = dataclasses.replace(snap, weights_bytes=max(snap.weights_bytes, self._unloaded_weights_bytes))
        if self.budget is not None and snap.device_kind == "cuda":
            cap = self.budget.allocator_cap_bytes
            snap = dataclasses.replace(snap, total_bytes=min(snap.total_bytes, cap + snap.other_bytes))
        return snap

    def available_working_bytes(self) -> int:
        """Working memory a job could use now (admission's figure, without the safety margin)."""
        from ..memory.admission import available_bytes

        return available_bytes(self._admission_snapshot())

    def submit(self, raw: GenerationRequest | Mapping[str, Any] | Validated, *, owner: str | None = None) -> Job:
        """Validate (unless already validated), check memory, queue.

        Raises RequestError, NotReady, MemoryRefused, QueueFull or ClientBusy — never an out-of-memory later.
        """
        try:
            self._require_ready()
            validated = raw if isinstance(raw, Validated) else self.validate(raw)
            admission = self.admit(validated.request)
            if admission.state == "over":
                raise MemoryRefused(admission)
            job = Job(validated.request, changes=validated.changes, notes=self.notes_for(validated.request),
                      owner=owner)
            job.decode_batch = admission.decode_batch
            job.on_change(self._job_changed)
            return self.worker.submit(job)
        except EngineError as exc:
            for hook in self._reject_hooks:
                self._call_hook(hook, exc)
            raise

    def generate(self, raw: GenerationRequest | Mapping[str, Any] | Validated, *, owner: str | None = None,
                 timeout: float | None = None) -> JobResult:
        """Submit and wait: the CLI's door."""
        return self.submit(raw, owner=owner).wait(timeout)

    def status(self, job: Job) -> JobStatus:
        return self.worker.status(job)

    def cancel(self, job: Job) -> None:
        self.worker.cancel(job)

    def cancel_owner(self, owner: str) -> int:
        return self.worker.cancel_owner(owner) if self.worker else 0

    def queue_info(self) -> QueueInfo:
        """The queue's depth, the running job and the worker's last heartbeat (``/api/v1/info``, the watchdog)."""
        worker = self.worker
        if worker is None:
            return QueueInfo(depth=0, running_job=None, last_heartbeat=time.monotonic())
        running = worker.running
        return QueueInfo(depth=worker.depth, running_job=running if running is not None and not running.done else None,
                         last_heartbeat=worker.last_heartbeat)

    def add_result_hook(self, hook: Callable[[Job, JobResult], None]) -> None:
        """Call ``hook(job, result)`` after each finished job (history, metrics), on the worker's finishing thread
        (the GPU starts the next job meanwhile), before the job counts as done."""
        self._result_hooks.append(hook)

    def add_end_hook(self, hook: Callable[[Job], None]) -> None:
        """Call ``hook(job)`` once when any job ends: done, cancelled or failed (metrics, history of failures).

        It runs on whichever thread ended the job, just after waiters were released; result hooks run earlier.
        """
        self._end_hooks.append(hook)

    def add_reject_hook(self, hook: Callable[[EngineError], None]) -> None:
        """Call ``hook(error)`` when ``submit`` refuses a request (NotReady, MemoryRefused, QueueFull, ClientBusy)."""
        self._reject_hooks.append(hook)

    def _job_changed(self, job: Job) -> None:
        if not job.done:
            return
        with self._lock:  # finish() notifies once, but a late cancel may notify again: fire exactly once
            if getattr(job, "_end_hooks_fired", False):
                return
            job._end_hooks_fired = True  # type: ignore[attr-defined]
        for hook in self._end_hooks:
            self._call_hook(hook, job)

    @staticmethod
    def _call_hook(hook: Callable[[Any], None], arg: Any) -> None:
        try:
            hook(arg)
        except Exception:
            log.exception("engine hook %r failed", hook)

    def model_info(self) -> dict[str, Any]:
        """What the engine is and has done, as plain JSON values (``EngineAPI.model_info`` lists the keys)."""
        m = self.model
        trained_demo = False
        if m is not None and m.is_demo:
            from ..models.demo import is_trained  # torch is loaded already: the model is

            trained_demo = is_trained(m.pipe)
        return {
            "id": m.model_id if m else None, "label": m.label if m else None, "is_demo": bool(m and m.is_demo),
            "trained_demo": trained_demo,
            "banner": self.banner, "device": str(m.device) if m else None,
            "dtype": str(m.dtype).replace("torch.", "") if m else None,
            "base_model": self.base_model.model_id if self.base_model is not None else None,
            "load_seconds": round(self.load_seconds, 3), "warmup_seconds": round(self.warmup_seconds, 3),
            "ready_seconds": round(self.ready_seconds, 3),
            "stages": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "placement": self.placement.name if self.placement else None,
            "plan": self.plan.lines() if self.plan is not None else None,
            "acceleration": self.acceleration.to_dict() if self.acceleration else None,
            "estimator": self.estimator.description if self.estimator is not None else None,
            "allocator": self.allocator_config.describe() if self.allocator_config is not None else None,
            "keep_cache": self.settings.keep_cache, "cache_releases": self.releases,
            "cache_released_bytes": self.released_bytes, "last_cache_release": self.last_release,
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "oom_events": dict(self.oom_events),
            "oom_recovered": sum(r.ooms_recovered for r in self.runners.values()),
            "idle_unload_minutes": self.settings.idle_unload_minutes, "unloaded": self.unloaded,
            "unloads": self.unloads, "reloads": self.reloads,
            "last_reload_seconds": None if self.last_reload_seconds is None else round(self.last_reload_seconds, 3),
            "prompt_cache": {"size": self.prompt_cache.size, "hits": self.prompt_cache.hits,
                             "misses": self.prompt_cache.misses},
            "state": self.state.value, "reason": self.reason,
        }

    def on_worker(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn()`` on the worker thread before the next queued job; a Future of its result (``BenchAPI``)."""
        if self.worker is None:
            raise NotReady(f"not started: {self.reason}")
        return self.worker.call(fn)

    def test_seam(self) -> TestSeam:
        """The documented way for tests to reach inside (faults, the queue, fake memory): ``engine/seam.py``."""
        from .seam import TestSeam

        return TestSeam(self)

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let the running job finish within ``grace_s`` (else cancel it), stop the worker."""
        if self.worker is not None:
            self.worker.stop(grace_s)
        self.state, self.reason = EngineState.STOPPED, "stopped"

    # --- the worker's side ------------------------------------------------------------------------------------
    def _execute(self, job: Job) -> JobResult:
        try:
            return self._execute_loaded(job)
        finally:
            self._last_active = time.monotonic()

    def _execute_loaded(self, job: Job) -> JobResult:
        reload_s = self.reload() if self.unloaded else None
        preset = self.presets().presets[job.request.preset]
        runner = self.runners["base"] if preset.model == "base" and "base" in self.runners else self.runners["turbo"]
        self._released_since_active = False
        output = runner.run(job, decode_batch=job.decode_batch)
        self.timer.record(job.request, output.timings["per_step_s"],
                          output.timings["encode_s"] + output.timings["decode_s"])
        peak = self._job_peak(runner)
        notes = list(job.notes)
        notes.extend(output.recovered)
        if reload_s is not None:
            notes.append(Message("note.reloaded", {"seconds": round(reload_s, 1)}))
            output.timings["reload_s"] = reload_s
        loaded = self.base_model if runner is self.runners.get("base") else self.model
        result = JobResult(images=output.images, seeds=output.seeds, request=job.request, changes=job.changes,
                           notes=notes, model_id=loaded.model_id, model_label=loaded.label, timings=output.timings,
                           peak_working_bytes=peak)
        return result

    def _finish(self, job: Job, result: JobResult) -> None:
        """After the GPU's part, on the worker's finishing thread: save the PNGs, run the result hooks."""
        if self.settings.save_images:
            t_save = time.perf_counter()
            result.paths = self._save(job, result)
            result.timings["save_s"] = time.perf_counter() - t_save
        for hook in self._result_hooks:
            try:
                hook(job, result)
            except Exception:
                log.exception("result hook failed for %s", job.id)

    def _save(self, job: Job, result: JobResult) -> list[str]:
        day = dt.datetime.now().strftime("%Y-%m-%d")
        stamp = dt.datetime.now().strftime("%H%M%S")
        folder = Path(self.settings.output_dir) / day
        try:
            return [str(save_png(image, folder / f"{stamp}-{job.id}-{seed}.png", job.request, seed=seed,
                                 model=result.model_id, extra={"timings": result.timings}))
                    for image, seed in zip(result.images, result.seeds, strict=True)]
        except OSError as exc:  # disk full, folder read-only: the image is made; answer it rather than lose it
            log.error("could not save the images of %s: %s", job.id, exc)
            result.notes.append(Message("note.not_saved", {"why": exc.strerror or type(exc).__name__}))
            return []


class _EngineRunMemory:
    """The engine's answers to its runners' memory questions (``runner.RunMemory``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def reset_peak(self) -> None:
        if self.engine.probe is not None:
            self.engine.probe.reset_peak()

    def peak_working(self) -> int:
        return self.engine.probe.snapshot().peak_working_bytes if self.engine.probe is not None else 0

    def available(self) -> int | None:
        return self.engine.available_working_bytes() if self.engine.probe is not None else None

    def out_of_memory(self, request: RunRequest, phase: str, need_at_least: int) -> None:
        self.engine._learn_oom(request, phase, need_at_least)

    def free(self) -> None:
        if self.engine.allocator is not None:
            self.engine.allocator.release()

    def decode_plan(self, request: RunRequest, available: int | None, after: Any) -> Any:
        from ..memory.estimator import WorkShape, plan_decode

        shape = WorkShape(request.width, request.height, request.batch, request.cfg)
        return plan_decode(self.engine.estimator, shape, available if available is not None else 2**62, after)
