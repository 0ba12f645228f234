"""The one documented way for tests to reach inside an in-process :class:`~zimage_ui.engine.engine.Engine`.

Doors use ``EngineAPI`` (``engine/api.py``) and nothing else; tests sometimes must do what no door may: make the GPU
fail or hang, hold the queue, fake the device's memory, read the estimator. They do it here, through
``engine.test_seam()``, never through ``engine.runners[...]``, ``engine.worker`` or ``engine.probe`` directly, so
what a test leans on is named in one place and survives the engine's inner changes.

    >>> from zimage_ui.engine.engine import Engine
    >>> from zimage_ui.settings import Settings
    >>> seam = Engine(Settings(model="demo", save_images=False)).test_seam()
    >>> seam.fault_hook, seam.depth, seam.running
    (None, 0, None)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine
    from .jobs import Job
    from .runner import PipelineRunner
    from .worker import SerialWorker


class TestSeam:
    """Handles on one engine's inner parts, for tests only (the engine must be started for most of them)."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # --- what start-up built ---------------------------------------------------------------------------------
    @property
    def runtime(self) -> Any:
        """``engine.boot.Runtime`` (None before start); settable, to stand a fake model in without loading one."""
        return self._engine.runtime

    @runtime.setter
    def runtime(self, runtime: Any) -> None:
        self._engine.runtime = runtime

    # --- faults -----------------------------------------------------------------------------------------------
    @property
    def runner(self) -> PipelineRunner:
        """The Turbo weights' runner (the one every default-preset job runs on)."""
        return self._engine.runners["turbo"]

    @property
    def fault_hook(self) -> Callable[[Any, int], None] | None:
        """``hook(request, attempt)``, called by the runner once per denoise step: raise or block there to make the
        GPU fail or hang (``None``: no fault)."""
        return self._engine.runners["turbo"].fault_hook if "turbo" in self._engine.runners else None

    @fault_hook.setter
    def fault_hook(self, hook: Callable[[Any, int], None] | None) -> None:
        self.runner.fault_hook = hook

    @contextlib.contextmanager
    def fault(self, hook: Callable[[Any, int], None]) -> Iterator[None]:
        """``fault_hook = hook`` for the block, then no fault again."""
        self.fault_hook = hook
        try:
            yield
        finally:
            self.fault_hook = None

    @contextlib.contextmanager
    def decode_fault(self, hook: Callable[[Any, Any], None]) -> Iterator[None]:
        """``hook(request, plan)`` before each VAE decode call for the block (raise an out-of-memory error there to
        test the decode's fallback), then no fault again."""
        self.runner.decode_fault_hook = hook
        try:
            yield
        finally:
            self.runner.decode_fault_hook = None

    # --- the queue --------------------------------------------------------------------------------------------
    @property
    def worker(self) -> SerialWorker:
        worker = self._engine.worker
        if worker is None:
            raise RuntimeError("the engine is not started")
        return worker

    @property
    def depth(self) -> int:
        """Jobs waiting behind the running one."""
        return self._engine.worker.depth if self._engine.worker is not None else 0

    @property
    def running(self) -> Job | None:
        """The job on the worker now (a finished one until the next starts), or None."""
        return self._engine.worker.running if self._engine.worker is not None else None

    def waiting(self) -> list[Job]:
        """The queued jobs, first in line first."""
        return list(self.worker._queue)

    @contextlib.contextmanager
    def hold(self, timeout_s: float = 30.0) -> Iterator[None]:
        """Keep the worker thread busy for the block (as a long job would): jobs submitted meanwhile wait in the
        queue. Entered once the worker is actually held."""
        held, release = threading.Event(), threading.Event()
        self.worker.call(lambda: (held.set(), release.wait(timeout_s)))
        if not held.wait(timeout_s):
            release.set()
            raise TimeoutError("the worker did not pick up the hold")
        try:
            yield
        finally:
            release.set()

    # --- memory -----------------------------------------------------------------------------------------------
    @property
    def probe(self) -> Any:
        """The memory probe (``memory.probe.MemoryProbe``); see :meth:`fake_memory` to replace it."""
        return self._engine.probe

    @contextlib.contextmanager
    def fake_memory(self, source: Any) -> Iterator[Any]:
        """Read the device's memory from ``source`` (a ``memory.probe.RawMemory`` source: a small machine, a
        CUDA card with co-hosts) for the block, with the engine's own weights accounting; yields the probe."""
        real = self._engine.probe
        try:
            yield self.use_memory(source)
        finally:
            self._engine.probe = real

    def use_memory(self, source: Any) -> Any:
        """Read the device's memory from ``source`` from now on (the engine is thrown away after); the probe."""
        from ..memory.probe import MemoryProbe

        self._engine.probe = MemoryProbe(source, self._engine.weights_bytes)
        return self._engine.probe

    @property
    def estimator(self) -> Any:
        """``memory.estimator.WorkingMemoryEstimator`` (predictions, what it learned from out-of-memory errors)."""
        return self._engine.estimator

    @property
    def budget(self) -> Any:
        """``memory.allocator.ProcessBudget`` when a VRAM budget is set, else None."""
        return self._engine.budget

    def weights_bytes(self) -> int:
        return self._engine.weights_bytes()

    # --- what the engine learned --------------------------------------------------------------------------------
    @property
    def timer(self) -> Any:
        """``engine.eta.StepTimer``: the seconds per step this machine showed."""
        return self._engine.timer

    @property
    def prompt_cache(self) -> Any:
        """``engine.runner.PromptCache``."""
        return self._engine.prompt_cache

    # --- idle unload --------------------------------------------------------------------------------------------
    def unload(self) -> None:
        """Unload now, on the worker thread (as the idle hook does)."""
        self.worker.call(self._engine.unload).result()
