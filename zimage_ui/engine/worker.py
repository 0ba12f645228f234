"""The serial GPU worker: one thread, one job at a time, fed by a bounded queue.

Only this thread touches the pipeline, so two browser tabs, the CLI and the REST API never race on the GPU;
they get a queue position and an ETA instead. The queue is a deque (not ``queue.Queue``) so a cancelled job
leaves it at once and positions stay exact.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

from .eta import JobPace, StepTimer
from .jobs import ClientBusy, Job, JobCancelled, JobFailed, JobResult, JobState, JobStatus, QueueFull

log = logging.getLogger(__name__)


class SerialWorker:
    """Runs ``execute(job)`` for each submitted job, in order, on one thread."""

    # How often the idle hook runs while the queue is empty: the engine gives the allocator's cache back from it,
    # within 2 s of the queue going empty (tick + 0.3 s + the release itself, ~0.8 s for 20 GiB on an H200).
    IDLE_TICK_S = 0.5

    def __init__(self, execute: Callable[[Job], JobResult], *, max_queue: int = 16, jobs_per_client: int = 1,
                 timer: StepTimer | None = None, name: str = "zimage-gpu-worker",
                 on_idle: Callable[[], None] | None = None,
                 finish: Callable[[Job, JobResult], None] | None = None):
        self._execute = execute
        self.on_idle = on_idle  # called on this thread every IDLE_TICK_S while the queue is empty
        # ``finish(job, result)`` (save the PNGs, run the result hooks) runs on a second thread, in job order, while
        # this one starts the next job's denoise; the job is done when it returns. None: done when execute returns.
        self._finish = finish
        self._finishing: collections.deque[Job] = collections.deque()
        self._finish_queue: collections.deque[tuple[Job, JobResult] | None] = collections.deque()
        self._finish_cond = threading.Condition()
        self._finisher = (threading.Thread(target=self._finish_loop, name=name + "-finish", daemon=True)
                          if finish is not None else None)
        self.max_queue = max_queue
        self.jobs_per_client = jobs_per_client
        self.timer = timer or StepTimer()
        self._queue: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], object], concurrent.futures.Future]] = collections.deque()
        self._running: Job | None = None
        self._pace: JobPace | None = None  # the running job's own step times
        self._cond = threading.Condition()
        self._stopping = False
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.last_heartbeat = time.monotonic()

    # --- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if self._finisher is not None:
            self._finisher.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting; cancel everything waiting; give the running job ``grace_s`` to finish, then cancel it."""
        with self._cond:
            self._accepting = False
            waiting = list(self._queue)
            self._queue.clear()
        for job in waiting:
            job.cancel()
            job.finish(JobState.CANCELLED)
        running = self._running
        if running is not None and not running.done and not running.wait_done(grace_s):
            running.cancel()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=max(grace_s, 0) + 30)
        if self._finisher is not None and self._finisher.is_alive():
            with self._finish_cond:  # after the jobs already handed over are finished
                self._finish_queue.append(None)
                self._finish_cond.notify_all()
            self._finisher.join(timeout=30)

    # --- running code on this thread -------------------------------------------------------------------------
    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker thread, before any queued job; returns a Future of its result.

        For work that must share the jobs' thread: warm-up (CUDA libraries keep per-thread state, so kernels
        warmed on another thread are cold for the first job) and idle unload.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("worker stopped")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    # --- submitting ------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue ``job``; raise QueueFull or ClientBusy rather than over-commit."""
        with self._cond:
            if not self._accepting:
                raise QueueFull(len(self._queue), retry_after_s=30)
            if job.owner is not None:
                mine = sum(1 for j in self._active() if j.owner == job.owner)
                if mine >= self.jobs_per_client:
                    raise ClientBusy(job.owner, self.jobs_per_client)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue), retry_after_s=self._retry_after())
            self._queue.append(job)
            self._cond.notify_all()
        job.on_change(self._on_job_change)
        job._notify()
        return job

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: a waiting job leaves the queue now, a running one stops at its next step."""
        job.cancel()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                removed = True
            else:
                removed = False
        if removed:
            job.finish(JobState.CANCELLED)
            self._notify_positions()

    def cancel_owner(self, owner: str) -> int:
        """Cancel every job of ``owner`` (a closed browser tab, a dropped HTTP client). Returns how many."""
        jobs = [j for j in self._active() if j.owner == owner]
        for job in jobs:
            self.cancel(job)
        return len(jobs)

    # --- reading ---------------------------------------------------------------------------------------------
    def _active(self) -> list[Job]:
        running = [self._running] if self._running is not None and not self._running.done else []
        finishing = [j for j in list(self._finishing) if not j.done and j is not self._running]
        return finishing + running + list(self._queue)

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the running one)."""
        return len(self._queue)

    @property
    def running(self) -> Job | None:
        return self._running

    def position(self, job: Job) -> int:
        with self._cond:
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return 0

    def eta(self, job: Job) -> float | None:
        """Seconds until ``job`` is done: the running job's rest, the jobs ahead, then its own.

        The running job's rest follows its own measured steps once it has two; the learnt estimates of the jobs
        behind it are scaled by how far its pace is from what was learnt (the machine is faster or slower now
        than the average of past jobs says)."""
        if job.done:
            return 0.0
        with self._cond:
            ahead = list(self._queue)[: self._queue.index(job)] if job in self._queue else []
            running, pace = self._running, self._pace
        now = time.monotonic()
        scale = self._scale(running, pace)
        if job is running:
            return self._rest(job, pace, scale, now)
        total = 0.0
        if running is not None and not running.done:
            rest = self._rest(running, pace, scale, now)
            if rest is None:
                return None
            total += rest
        for other in ahead + [job]:
            seconds = self.timer.job_seconds(other.request)
            if seconds is None:
                return None
            total += seconds * scale
        return total

    def _scale(self, running: Job | None, pace: JobPace | None) -> float:
        """Measured seconds per step of the running job ÷ the learnt ones (1 until both are known)."""
        measured = pace.seconds_per_step() if pace is not None and running is not None else None
        learnt = self.timer.step_seconds(running.request) if running is not None else None
        return measured / learnt if measured is not None and learnt else 1.0

    def _rest(self, job: Job, pace: JobPace | None, scale: float, now: float) -> float | None:
        steps_left = pace.seconds_left(job.total_steps, now) if pace is not None else None
        if steps_left is None:
            return self.timer.job_seconds(job.request, job.step)
        return steps_left + self.timer.overhead_seconds(job.request) * scale

    def status(self, job: Job) -> JobStatus:
        now = time.monotonic()
        elapsed = now - (job.started or job.created) if not job.done else (job.finished or now) - job.created
        return JobStatus(id=job.id, state=job.state, position=self.position(job), step=job.step,
                         total_steps=job.total_steps, eta_s=self.eta(job), elapsed_s=elapsed)

    def _retry_after(self) -> float:
        jobs = self._active()
        estimates = [self.timer.job_seconds(j.request) for j in jobs]
        known = [e for e in estimates if e is not None]
        return max(1.0, sum(known) / max(len(jobs), 1)) if known else 5.0

    # --- the loop --------------------------------------------------------------------------------------------
    def _on_job_change(self, job: Job) -> None:
        self.last_heartbeat = now = time.monotonic()
        pace = self._pace
        if pace is not None and job is self._running:
            pace.mark(job.step, now)

    def _notify_positions(self) -> None:
        for waiting in list(self._queue):
            waiting._notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._calls and not self._stopping:
                    self._cond.wait(timeout=self.IDLE_TICK_S)
                    self.last_heartbeat = time.monotonic()
                    if self.on_idle is not None and not self._queue and not self._stopping:
                        break
                if self._stopping and not self._queue and not self._calls:
                    return
                call = self._calls.popleft() if self._calls else None
                job = self._queue.popleft() if self._queue and call is None else None
                self._running = job
                self._pace = JobPace() if job is not None else None
            if call is not None:
                self._run_call(*call)
                continue
            if job is None:  # idle: run the hook outside the lock, so submit() never waits for it
                self._idle()
                continue
            self._notify_positions()
            self._run_one(job)
            with self._cond:
                self._running = None
                self._pace = None
            self.last_heartbeat = time.monotonic()

    def _run_call(self, fn: Callable[[], object], future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller through the future
            future.set_exception(exc)
        self.last_heartbeat = time.monotonic()

    def _idle(self) -> None:
        try:
            self.on_idle()
        except Exception:  # the worker must survive its idle hook too
            log.exception("idle hook failed")
        self.last_heartbeat = time.monotonic()

    def _run_one(self, job: Job) -> None:
        if job.cancel_requested:
            job.finish(JobState.CANCELLED)
            return
        job.mark_running()
        try:
            result = self._execute(job)
        except JobCancelled:
            job.finish(JobState.CANCELLED)
        except JobFailed as exc:
            job.finish(JobState.FAILED, error=exc)
        except Exception as exc:  # the worker must survive any job
            log.exception("job %s failed", job.id)
            job.finish(JobState.FAILED, error=JobFailed(f"{type(exc).__name__}: {exc}"))
        else:
            if self._finisher is None:
                job.finish(JobState.DONE, result=result)
                return
            with self._finish_cond:
                self._finishing.append(job)
                self._finish_queue.append((job, result))
                self._finish_cond.notify_all()

    def _finish_loop(self) -> None:
        while True:
            with self._finish_cond:
                while not self._finish_queue:
                    self._finish_cond.wait()
                item = self._finish_queue.popleft()
            if item is None:
                return
            job, result = item
            try:
                self._finish(job, result)
            except Exception as exc:  # the finisher must survive any job too
                log.exception("finishing job %s failed", job.id)
                job.finish(JobState.FAILED, error=JobFailed(f"{type(exc).__name__}: {exc}"))
            else:
                job.finish(JobState.DONE, result=result)
            finally:
                with self._finish_cond:
                    self._finishing.remove(job)
            self.last_heartbeat = time.monotonic()
