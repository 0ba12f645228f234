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
from pathlib import Path
from typing import Any

from ..metadata import save_png
from ..presets import PresetBook, load_presets
from ..settings import Settings
from ..validation import GenerationRequest, RunRequest, Validated, validate
from .eta import StepTimer
from .jobs import EngineError, Job, JobResult, JobStatus, MemoryRefused, NotReady
from .runner import PipelineRunner, PromptCache
from .worker import SerialWorker

log = logging.getLogger(__name__)

DEMO_DEFAULT_SIDE = 512  # the demo model's default size: a fast, honest first image on a laptop CPU


class EngineState(enum.StrEnum):
    NEW = "new"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class Engine:
    """Loads once, then runs every door's requests through one queue."""

    def __init__(self, settings: Settings, *, book: PresetBook | None = None):
        self.settings = settings
        self._file_book = book
        self.book: PresetBook | None = None
        self.state = EngineState.NEW
        self.reason = "not started"
        self.model: Any = None  # models.loading.LoadedModel
        self.base_model: Any = None
        self.banner: str | None = None
        self.timer = StepTimer()
        self.prompt_cache = PromptCache()
        self.runners: dict[str, PipelineRunner] = {}
        self.worker: SerialWorker | None = None
        self.probe: Any = None  # memory.probe.MemoryProbe
        self.estimator: Any = None  # memory.estimator.WorkingMemoryEstimator
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        self._result_hooks: list[Callable[[Job, JobResult], None]] = []
        self._end_hooks: list[Callable[[Job], None]] = []
        self._reject_hooks: list[Callable[[EngineError], None]] = []
        self._lock = threading.Lock()

    # --- start-up -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model(s), warm up, start the worker. Raises on failure (state FAILED, reason set)."""
        from ..models.loading import load_model
        from ..models.sources import resolve_model

        try:
            self.state, self.reason = EngineState.LOADING, "loading the model"
            book = self._file_book or load_presets(self.settings.presets_file, max_side=self.settings.max_side)
            t0 = time.perf_counter()
            resolution = resolve_model(self.settings.model, model_dir=self.settings.model_dir)
            self.banner = resolution.banner
            self.model = load_model(resolution.source, device=self.settings.device, dtype=self.settings.dtype)
            if self.settings.base_model:
                base = resolve_model(self.settings.base_model, model_dir=None).source
                self.base_model = load_model(base, device=self.model.device, dtype=self.model.dtype,
                                             share_from=self.model)
            self.load_seconds = time.perf_counter() - t0
            self.book = self._book_for_model(book)
            self._build_probe()
            for key, loaded in (("turbo", self.model), ("base", self.base_model)):
                if loaded is not None:
                    self.runners[key] = PipelineRunner(loaded.pipe, loaded.device, model_key=loaded.model_id,
                                                       prompt_cache=self.prompt_cache, on_sample=self._sample)
            if self.settings.warmup:
                self.state, self.reason = EngineState.WARMING, "warming up"
                self._warm_up()
            if self.probe is not None:
                self.probe.mark_baseline()
            self.worker = SerialWorker(self._execute, max_queue=self.settings.max_queue,
                                       jobs_per_client=self.settings.jobs_per_client, timer=self.timer)
            self.worker.start()
            self.state, self.reason = EngineState.READY, "ready"
            log.info("ready: %s on %s (%s), loaded in %.1f s, warm-up %.1f s", self.model.label,
                     self.model.device, str(self.model.dtype).replace("torch.", ""), self.load_seconds,
                     self.warmup_seconds)
        except BaseException as exc:
            self.state, self.reason = EngineState.FAILED, str(exc)
            raise

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

    def _book_for_model(self, book: PresetBook) -> PresetBook:
        if not self.model.is_demo:
            return book
        side = DEMO_DEFAULT_SIDE
        presets = {n: dataclasses.replace(p, width=min(p.width, side), height=min(p.height, side))
                   for n, p in book.presets.items()}
        return dataclasses.replace(book, presets=presets)

    def _build_probe(self) -> None:
        from ..memory.estimator import WorkingMemoryEstimator
        from ..memory.probe import make_probe

        self.probe = make_probe(self.model.device, self.weights_bytes)
        self.estimator = WorkingMemoryEstimator.default_for(self.model.device.type, self.weights_bytes())

    def weights_bytes(self) -> int:
        total = self.model.weights_bytes() if self.model is not None else 0
        if self.base_model is not None:
            total += sum(p.numel() * p.element_size() for p in self.base_model.pipe.transformer.parameters())
        return total

    def _sample(self) -> None:
        if self.probe is not None:
            self.probe.sample()

    def _warm_up(self) -> None:
        """Short runs at the Turbo preset's default size and half of it: kernels load, the step timer learns
        this machine's speed and the memory estimator is fitted to two measured peaks."""
        from ..memory.estimator import WorkShape

        t0 = time.perf_counter()
        preset = self.book.presets[self.book.default]
        low = self.book.limits.side[0]
        sides = [(preset.width, preset.height), (max(low, preset.width // 2 // 16 * 16),
                                                 max(low, preset.height // 2 // 16 * 16))]
        samples = []
        for width, height in dict.fromkeys(sides):
            request = RunRequest(prompt="warm up", negative_prompt="", preset=preset.name,
                                 steps=min(2, preset.steps), guidance=0.0, width=width, height=height, seed=0, batch=1)
            self.probe.reset_peak()
            output = self.runners["turbo"].run(Job(request))
            samples.append((WorkShape(width, height, 1, False), self.probe.snapshot().peak_working_bytes))
            self.timer.record(request, output.timings["per_step_s"],
                              output.timings["encode_s"] + output.timings["decode_s"])
        if len(samples) >= 2 and all(peak > 0 for _, peak in samples):
            try:
                self.estimator.calibrate(samples)
            except ValueError as exc:  # degenerate measurements: keep the prior
                log.info("memory estimator kept its prior: %s", exc)
        self.warmup_seconds = time.perf_counter() - t0

    # --- doors ------------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == EngineState.READY and self.worker is not None and self.worker.alive

    def _require_ready(self) -> None:
        if not self.ready:
            raise NotReady(f"not ready: {self.reason}")

    def presets(self) -> PresetBook:
        """The presets in force (for the demo model: its smaller default size). Readable before start."""
        if self.book is not None:
            return self.book
        return self._file_book or load_presets(self.settings.presets_file, max_side=self.settings.max_side)

    def validate(self, raw: GenerationRequest | Mapping[str, Any]) -> Validated:
        """The one validator, with this model's tokenizer for the prompt-length check."""
        runner = self.runners.get("turbo")
        return validate(raw, self.presets(), count_tokens=runner.count_tokens if runner else None)

    def notes_for(self, request: RunRequest) -> list[str]:
        """What the user should know about how a request will run (which weights serve the preset)."""
        preset = self.presets().presets[request.preset]
        if preset.model == "base" and self.base_model is None and not self.model.is_demo and not self.model.is_base:
            return [f"{preset.label} runs on the Turbo weights (no base Z-Image configured, see --base-model); "
                    "guidance on Turbo weights softens images"]
        return []

    # --- memory ---------------------------------------------------------------------------------------------
    def memory_snapshot(self) -> Any:
        """The probe's reading now (cheap, no synchronize): what the VRAM bar and /api/v1/vram show."""
        return self.probe.snapshot()

    def predict_working_bytes(self, request: RunRequest) -> int:
        from ..memory.estimator import WorkShape

        return self.estimator.predict(WorkShape(request.width, request.height, request.batch, request.cfg))

    def admit(self, request: RunRequest) -> Any:
        """Would ``request`` fit now? An ``Admission`` with state ok / tight / over, a message and, when over,
        the largest size that fits at the same aspect ratio."""
        from ..memory.estimator import WorkShape, admit_shape

        shape = WorkShape(request.width, request.height, request.batch, request.cfg)
        return admit_shape(self.estimator, self.memory_snapshot(), shape, self.settings.memory_margin_bytes)

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

    def add_result_hook(self, hook: Callable[[Job, JobResult], None]) -> None:
        """Call ``hook(job, result)`` on the worker thread after each finished job (history, metrics)."""
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
        m = self.model
        return {
            "id": m.model_id if m else None, "label": m.label if m else None, "is_demo": bool(m and m.is_demo),
            "banner": self.banner, "device": str(m.device) if m else None,
            "dtype": str(m.dtype).replace("torch.", "") if m else None,
            "base_model": self.base_model.model_id if self.base_model is not None else None,
            "load_seconds": round(self.load_seconds, 3), "warmup_seconds": round(self.warmup_seconds, 3),
            "state": self.state.value, "reason": self.reason,
        }

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let the running job finish within ``grace_s`` (else cancel it), stop the worker."""
        if self.worker is not None:
            self.worker.stop(grace_s)
        self.state, self.reason = EngineState.STOPPED, "stopped"

    # --- the worker's side ------------------------------------------------------------------------------------
    def _execute(self, job: Job) -> JobResult:
        preset = self.presets().presets[job.request.preset]
        runner = self.runners["base"] if preset.model == "base" and "base" in self.runners else self.runners["turbo"]
        if self.probe is not None:
            self.probe.reset_peak()
        output = runner.run(job)
        self.timer.record(job.request, output.timings["per_step_s"],
                          output.timings["encode_s"] + output.timings["decode_s"])
        peak = self.probe.snapshot().peak_working_bytes if self.probe is not None else 0
        notes = list(job.notes)
        if output.retried_tiled:
            notes.append("ran out of memory once; finished with a tiled VAE decode")
        loaded = self.base_model if runner is self.runners.get("base") else self.model
        result = JobResult(images=output.images, seeds=output.seeds, request=job.request, changes=job.changes,
                           notes=notes, model_id=loaded.model_id, model_label=loaded.label, timings=output.timings,
                           peak_working_bytes=peak)
        if self.settings.save_images:
            result.paths = self._save(job, result)
        for hook in self._result_hooks:
            try:
                hook(job, result)
            except Exception:
                log.exception("result hook failed for %s", job.id)
        return result

    def _save(self, job: Job, result: JobResult) -> list[str]:
        day = dt.datetime.now().strftime("%Y-%m-%d")
        stamp = dt.datetime.now().strftime("%H%M%S")
        folder = Path(self.settings.output_dir) / day
        return [str(save_png(image, folder / f"{stamp}-{job.id}-{seed}.png", job.request, seed=seed,
                             model=result.model_id, extra={"timings": result.timings}))
                for image, seed in zip(result.images, result.seeds, strict=True)]
