"""Jobs: one request on its way through the queue, with its state, progress, cancel flag and result."""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..messages import Count, Message, Word
from ..validation import Change, RunRequest

_ids = itertools.count(1)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.CANCELLED, JobState.FAILED)


class EngineError(Exception):
    """Base of the engine's own refusals; every door turns these into a clear message, never a traceback.

    A refusal's :attr:`message` is a :class:`~zimage_ui.messages.Message` (a code and its figures) for a door to
    say in its language; ``str()`` is English."""

    message: Message | None = None

    def __init__(self, message: Message | str):
        if isinstance(message, Message):
            self.message = message
        super().__init__(str(message))


class QueueFull(EngineError):
    def __init__(self, depth: int, retry_after_s: float):
        self.depth = depth
        self.retry_after_s = retry_after_s
        super().__init__(Message("refusal.queue_full", {"depth": depth, "retry_s": round(retry_after_s)}))


class ClientBusy(EngineError):
    def __init__(self, owner: str, limit: int):
        self.owner, self.limit = owner, limit
        super().__init__(Message("refusal.client_busy", {"jobs": Count(limit, "jobs")}))


class NotReady(EngineError):
    """The engine is still loading or warming up, or has failed. ``state`` is the engine's state ("loading", …);
    the message names it (or, after a failure, gives the failure's own text)."""

    def __init__(self, reason: str, state: str | None = None):
        self.reason, self.state = reason, state
        said = Word(state) if state in ("new", "loading", "warming", "stopped") else reason
        super().__init__(Message("refusal.not_ready", {"reason": said}))


class MemoryRefused(EngineError):
    """Predicted not to fit in memory: refused before it could run out of memory. ``admission`` says by how much."""

    def __init__(self, admission: Any):
        self.admission = admission
        super().__init__(admission.message)


class JobCancelled(EngineError):
    pass


class JobFailed(EngineError):
    """A job that ran and failed: ``kind`` "oom" (its message a code: ``failure.oom_*``) or "error" (the
    exception's own text)."""

    def __init__(self, message: Message | str, kind: str = "error"):
        self.kind = kind  # "error" | "oom"
        super().__init__(message)


# What each refusal or failure is, as one word every door maps from: the HTTP table (service/errors.py), the
# metrics' reason label, the page's message. One definition instead of an isinstance chain in each door.
ERROR_KINDS = ("queue_full", "client_busy", "not_ready", "memory", "cancelled", "oom", "failed")
REJECTION_KINDS = ("queue_full", "client_busy", "not_ready", "memory")  # refused by submit, before queueing
_KIND_OF: tuple[tuple[type[EngineError], str], ...] = (
    (QueueFull, "queue_full"), (ClientBusy, "client_busy"), (NotReady, "not_ready"), (MemoryRefused, "memory"),
    (JobCancelled, "cancelled"))


def error_kind(exc: BaseException | None) -> str:
    """The kind of an engine error: one of ``ERROR_KINDS``, or ``other`` for anything else.

    >>> error_kind(QueueFull(3, retry_after_s=10)), error_kind(JobFailed("CUDA out of memory", kind="oom"))
    ('queue_full', 'oom')
    >>> error_kind(ValueError("not ours"))
    'other'
    """
    if isinstance(exc, JobFailed):
        return "oom" if exc.kind == "oom" else "failed"
    for cls, kind in _KIND_OF:
        if isinstance(exc, cls):
            return kind
    return "other"


@dataclass
class JobResult:
    """What a finished job made: images (PIL), one seed per image, timings and memory."""

    images: list[Any]
    seeds: list[int]
    request: RunRequest
    changes: tuple[Change, ...]
    notes: list[Message]  # str(note): English
    model_id: str
    model_label: str
    timings: dict[str, float]
    peak_working_bytes: int
    paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class JobStatus:
    """A moment's view of a job, for status lines and polling."""

    id: str
    state: JobState
    position: int  # 0 = running (or finished), n = n jobs ahead of it
    step: int
    total_steps: int
    eta_s: float | None
    elapsed_s: float

    @property
    def text(self) -> str:
        if self.state == JobState.QUEUED:
            eta = f", about {self.eta_s:.0f} s" if self.eta_s is not None else ""
            return f"queued: position {self.position}{eta}"
        if self.state == JobState.RUNNING:
            eta = f", {self.eta_s:.1f} s left" if self.eta_s is not None else ""
            return f"step {self.step}/{self.total_steps}{eta}"
        return self.state.value


class Job:
    """One validated request in the engine. Thread-safe: the worker updates it, any door reads or cancels it."""

    decode_batch: int | None = None  # admission's choice: the VAE decodes this many images per call (None: all)

    def __init__(self, request: RunRequest, *, changes: tuple[Change, ...] = (), notes: list[Message] | None = None,
                 owner: str | None = None):
        self.id = f"job-{next(_ids)}"
        self.request = request
        self.changes = changes
        self.notes = list(notes or [])
        self.owner = owner
        self.created = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self.state = JobState.QUEUED
        self.step = 0
        self.total_steps = request.steps
        self.result: JobResult | None = None
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._listeners: list[Callable[[Job], None]] = []
        self._lock = threading.Lock()

    # --- read side -------------------------------------------------------------------------------------------
    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job ends; return its result or raise JobCancelled / JobFailed / TimeoutError."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.id} still {self.state.value} after {timeout} s")
        if self.state == JobState.DONE and self.result is not None:
            return self.result
        if self.state == JobState.CANCELLED:
            raise JobCancelled(f"{self.id} was cancelled")
        if isinstance(self.error, EngineError):
            raise self.error
        raise JobFailed(str(self.error) if self.error else "job failed")

    def wait_done(self, timeout: float | None = None) -> bool:
        """Wait for the job to end, whatever its outcome; True if it ended in time."""
        return self._done.wait(timeout)

    def on_change(self, listener: Callable[[Job], None]) -> None:
        """Call ``listener(job)`` after each state change and step (from the worker thread)."""
        with self._lock:
            self._listeners.append(listener)

    # --- write side (worker and doors) -----------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the job to stop: a queued job never starts; a running one stops at its next step."""
        self._cancel.set()

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(self)
            except Exception:  # a broken listener (closed browser tab) must not break generation
                pass

    def mark_running(self) -> None:
        self.state = JobState.RUNNING
        self.started = time.monotonic()
        self._notify()

    def mark_step(self, step: int, total: int) -> None:
        self.step, self.total_steps = step, total
        self._notify()

    def finish(self, state: JobState, *, result: JobResult | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.state = state
        self.finished = time.monotonic()
        self._done.set()
        self._notify()
