"""``RemoteEngine``: the door's engine when the engines are Ray Serve replicas. It implements ``EngineAPI``, so the
web UI and the REST routes do not know the difference.

* **State**: read from the board (``board.py``) every ``poll_s``: ready while at least one replica is ready.
* **Requests**: validated here (the preset book comes from a replica; the replica checks the prompt's length,
  which needs its tokenizer), then sent as a stream to the deployment; the router (``routing.py``) picks a ready
  replica predicted to fit. Each remote job is mirrored into a local ``Job`` (``RemoteJob``): queue position,
  step, the end, the replica that ran it; ``cancel`` cancels the stream and the replica cancels its job.
* **Limits**: jobs per client are counted here, across replicas (the replicas see no owners); the rate limit lives
  in the door already (``limits.DoorLimits``). A full queue (``max_queue`` jobs waiting for a replica) is
  ``QueueFull``, as with one engine: the door answers 503 + Retry-After.
* **Faults**: a job whose replica dies ends FAILED with a message naming the replica (never a hang); Ray replaces
  the replica; a job that waited in the queue is routed to a live one.
* **Memory**: ``replicas()`` lists every replica's snapshot (device, host, GPU, segments);
  ``memory_snapshot()`` is the one that would take the next request (the single-engine shape).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..engine.api import QueueInfo
from ..engine.jobs import ClientBusy, EngineError, Job, JobFailed, JobResult, JobState, JobStatus, NotReady, QueueFull
from ..validation import GenerationRequest, RunRequest, Validated, validate
from .replica import MAX_ONGOING, refusal_error

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the board is read (the page polls once a second)
STALE_S = 3.0  # a replica not heard from for this long is gone (died, replaced)
FIRST_WORD_S = 1.0  # how long submit waits for a free replica's first word (accepted or refused)
LOST_S = 8.0  # a running job whose replica is gone this long ends FAILED (the stream's own error usually comes first)


class RemoteState:
    """Duck-types ``EngineState``: doors read ``engine.state.value``."""

    def __init__(self, value: str):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return getattr(other, "value", other) == self.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"RemoteState({self.value!r})"


class RemoteJob(Job):
    """A local mirror of a job that runs on a replica: the door's progress, cancel and answer read it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.replica: str | None = None  # the replica that took it (X-Zimage-Replica)
        self.replica_host: str | None = None
        self.position = 1
        self.eta_s: float | None = None
        self.stream: Any = None  # the DeploymentResponseGenerator while it runs
        self.seen_replica_at = time.monotonic()
        self.answered = threading.Event()  # the first word from a replica (accepted or refused), or the end
        self.refused: BaseException | None = None


class RemoteEngine:
    """``EngineAPI`` over a Ray Serve application of ``ZImageReplica``s."""

    def __init__(self, settings: Any, handle: Any, *, app_name: str = "zimage", board: Any = None,
                 on_shutdown: Callable[[], None] | None = None, poll_s: float = POLL_S):
        self.settings = settings
        self.handle = handle
        self.app_name = app_name
        self._board = board
        self._on_shutdown = on_shutdown
        self._poll_s = poll_s
        self._replicas: list[dict[str, Any]] = []
        self._replicas_at = 0.0
        self._jobs: list[RemoteJob] = []  # jobs not ended yet, oldest first
        self._lock = threading.Lock()
        self._accepting = True
        self._stopped = threading.Event()
        self._started = False
        self._result_hooks: list[Callable[[Job, JobResult], None]] = []
        self._end_hooks: list[Callable[[Job], None]] = []
        self._reject_hooks: list[Callable[[EngineError], None]] = []
        self._book: Any = None
        self._estimators: dict[str, Any] = {}
        self.served: dict[str, int] = {}  # jobs ended per replica (metrics)
        self.lost_jobs = 0  # jobs whose replica died under them

    # --- life -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start reading the board (the replicas start themselves)."""
        if self._started:
            return
        self._started = True
        if self._board is None:
            from .board import get_board

            self._board = get_board(self.app_name)
        self._refresh()
        threading.Thread(target=self._poll_loop, name="zimage-remote-poll", daemon=True).start()

    def start_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.start, name="zimage-remote-start", daemon=True)
        thread.start()
        return thread

    @property
    def state(self) -> RemoteState:
        if self._stopped.is_set():
            return RemoteState("stopped")
        if not self._started:
            return RemoteState("new")
        states = [r.get("state") for r in self._posts()]
        if "ready" in states:
            return RemoteState("ready")
        if states and all(s == "failed" for s in states):
            return RemoteState("failed")
        if "warming" in states:
            return RemoteState("warming")
        return RemoteState("loading")

    @property
    def reason(self) -> str:
        replicas = self._posts()
        if self._stopped.is_set():
            return "stopped"
        if not replicas:
            return "waiting for the replicas to start"
        ready = sum(1 for r in replicas if r.get("ready"))
        if ready:
            return f"ready ({ready} of {len(replicas)} replicas)"
        return "; ".join(sorted({str(r.get("reason")) for r in replicas}))

    @property
    def ready(self) -> bool:
        return not self._stopped.is_set() and any(r.get("ready") for r in self._posts())

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Drain: refuse new jobs, cancel those still waiting for a replica, let the running ones finish within
        ``grace_s`` (then cancel them), then stop the application if this process started it."""
        with self._lock:
            self._accepting = False
            jobs = list(self._jobs)
        for job in jobs:
            if job.replica is None:
                self.cancel(job)
        deadline = time.monotonic() + grace_s
        for job in jobs:
            if not job.wait_done(max(0.0, deadline - time.monotonic())):
                self.cancel(job)
        for job in jobs:
            job.wait_done(5.0)
        self._stopped.set()
        if self._on_shutdown is not None:
            try:
                self._on_shutdown()
            except Exception:
                log.exception("stopping the Ray Serve application failed")

    # --- replicas ---------------------------------------------------------------------------------------------
    def _posts(self) -> list[dict[str, Any]]:
        """The replicas heard from recently (the board's posts), oldest first."""
        if self._started and time.monotonic() - self._replicas_at > 4 * self._poll_s:
            self._refresh()  # the poller is late (a busy machine): read now
        return self._replicas

    def _refresh(self) -> None:
        import ray

        try:
            posts = ray.get(self._board.read.remote(STALE_S), timeout=2)
        except Exception as exc:
            log.warning("could not read the replicas' board: %s", exc)
            return
        self._replicas, self._replicas_at = posts, time.monotonic()
        for post in posts:
            if post.get("book") is not None and self._book is None:
                self._book = post["book"]
        self._check_lost(posts)

    def _poll_loop(self) -> None:
        while not self._stopped.wait(self._poll_s):
            self._refresh()

    def _check_lost(self, posts: list[dict[str, Any]]) -> None:
        alive = {p["replica"] for p in posts}
        now = time.monotonic()
        with self._lock:
            running = [j for j in self._jobs if j.replica is not None and not j.done]
        for job in running:
            if job.replica in alive:
                job.seen_replica_at = now
            elif now - job.seen_replica_at > LOST_S:
                self._lose(job, f"replica {job.replica} went silent")

    def replicas(self) -> list[dict[str, Any]]:
        """Every replica (``EngineAPI.replicas``): ``replica``, ``host``, ``gpu``, ``state``, ``ready``, ``queue``
        and ``snapshot`` (a ``MemorySnapshot.to_dict()``, None while loading) — what /api/v1/vram lists, the
        metrics label and the page draws; also ``pid`` and ``actor_name`` (Ray's), ``available_bytes``, ``served``."""
        return [{"replica": r["replica"], "host": r.get("host"), "gpu": r.get("gpu"), "pid": r.get("pid"),
                 "actor_name": r.get("actor_name"),
                 "state": r.get("state"), "ready": bool(r.get("ready")), "unloaded": bool(r.get("unloaded")),
                 "queue": r.get("queue"), "device": (r.get("model") or {}).get("device"),
                 "available_bytes": r.get("available_bytes"), "snapshot": r.get("snapshot"),
                 "served": self.served.get(r["replica"], 0)} for r in self._posts()]

    def _target(self, need_bytes: int = 0) -> dict[str, Any] | None:
        """The replica the router would pick now (ready, fits, most working memory free), for the bar."""
        ready = [r for r in self._posts() if r.get("ready")]
        fits = [r for r in ready if (r.get("available_bytes") or 0) >= need_bytes] or ready
        return max(fits, key=lambda r: r.get("available_bytes") or 0) if fits else None

    # --- requests ---------------------------------------------------------------------------------------------
    def presets(self) -> Any:
        if self._book is not None:
            return self._book
        from ..presets import load_presets

        return load_presets(self.settings.presets_file, max_side=self.settings.max_side)

    def validate(self, raw: GenerationRequest | Mapping[str, Any]) -> Validated:
        """The one validator with the replicas' preset book; the prompt's token count is checked on the replica."""
        return validate(raw, self.presets())

    def notes_for(self, request: RunRequest) -> list[str]:
        return []  # a replica adds its notes to the job's result

    def submit(self, raw: GenerationRequest | Mapping[str, Any] | Validated, *, owner: str | None = None) -> Job:
        try:
            if not self.ready:
                raise NotReady(f"not ready: {self.reason}")
            validated = raw if isinstance(raw, Validated) else self.validate(raw)
            job = RemoteJob(validated.request, changes=validated.changes, owner=owner)
            with self._lock:
                if not self._accepting:
                    raise QueueFull(0, retry_after_s=30)
                waiting = [j for j in self._jobs if j.replica is None]
                if owner is not None:
                    mine = sum(1 for j in self._jobs if j.owner == owner)
                    if mine >= self.settings.jobs_per_client:
                        raise ClientBusy(owner, self.settings.jobs_per_client)
                # what the replicas hold (MAX_ONGOING each), plus max_queue waiting for one of them
                held = MAX_ONGOING * sum(1 for r in self._posts() if r.get("ready"))
                if len(self._jobs) >= held + self.settings.max_queue:
                    depth = len(self._jobs) - held
                    raise QueueFull(depth, retry_after_s=self._retry_after(depth))
                job.position = len(waiting) + 1
                self._jobs.append(job)
            need = self._need(validated.request)
            job.on_change(self._job_changed)
            threading.Thread(target=self._follow, args=(job, validated, need), name=f"zimage-{job.id}",
                             daemon=True).start()
            # a free replica answers at once: its refusal (memory, not ready) is the submitter's, as with one engine;
            # a job that waits for a replica is returned queued
            job.answered.wait(FIRST_WORD_S)
            if job.refused is not None:
                raise job.refused
            return job
        except EngineError as exc:
            for hook in self._reject_hooks:
                _call(hook, exc)
            raise

    def _retry_after(self, waiting: int) -> float:
        ready = max(1, sum(1 for r in self._posts() if r.get("ready")))
        return max(2.0, 3.0 * waiting / ready)

    def _need(self, request: RunRequest) -> int:
        try:
            return int(self.predict_working_bytes(request))
        except Exception:
            return 0

    def _follow(self, job: RemoteJob, validated: Validated, need: int) -> None:
        """Send the job and mirror its stream into ``job`` (one thread per job in flight)."""
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        ended = False
        try:
            stream = self.handle.options(stream=True, method_name="run").remote(validated, need_bytes=need)
            job.stream = stream
            if job.cancel_requested:
                stream.cancel()
            for event in stream:
                kind = event["t"]
                if kind == "refused":
                    job.replica = event.get("replica")
                    error = refusal_error(event)
                    if not job.answered.is_set():  # submit raises it: a refusal, not a job that ended
                        job.refused = error
                        job._end_hooks_fired = True  # type: ignore[attr-defined]
                    self._end(job, JobState.FAILED, error=error)
                    ended = True
                elif kind == "accepted":
                    job.replica, job.replica_host = event["replica"], event.get("host")
                    job.seen_replica_at = time.monotonic()
                    job.answered.set()
                    self._positions_changed()
                elif kind == "status":
                    job.position, job.eta_s = event["position"], event.get("eta_s")
                    if event["state"] == "running" and job.state == JobState.QUEUED:
                        job.mark_running()
                    if event["step"] != job.step or event["total_steps"] != job.total_steps:
                        job.mark_step(event["step"], event["total_steps"])
                elif kind == "done":
                    result: JobResult = event["result"]
                    for hook in self._result_hooks:
                        _call(hook, job, result)
                    self._end(job, JobState.DONE, result=result)
                    ended = True
                elif kind == "end":
                    state = JobState.CANCELLED if event["state"] == "cancelled" else JobState.FAILED
                    error = None if state == JobState.CANCELLED else JobFailed(event["message"], event["kind"])
                    self._end(job, state, error=error)
                    ended = True
        except RequestCancelledError:
            self._end(job, JobState.CANCELLED)
            ended = True
        except BackPressureError:  # Ray's own queue limit (max_queued_requests): the same answer as ours
            error = QueueFull(self.settings.max_queue, self._retry_after(self.settings.max_queue))
            if not job.answered.is_set():
                job.refused = error
                job._end_hooks_fired = True  # type: ignore[attr-defined]
            self._end(job, JobState.FAILED, error=error)
            ended = True
        except (RayActorError, RayTaskError) as exc:
            if job.cancel_requested:
                self._end(job, JobState.CANCELLED)
            else:
                self._lose(job, f"replica {job.replica or '?'} failed: {type(exc).__name__}")
            ended = True
        except Exception as exc:  # anything else: an explicit error, never a hang
            log.exception("%s: the stream from replica %s failed", job.id, job.replica)
            self._end(job, JobState.CANCELLED if job.cancel_requested else JobState.FAILED,
                      error=None if job.cancel_requested else JobFailed(f"the replica's answer failed: {exc}"))
            ended = True
        if not ended:
            self._end(job, JobState.CANCELLED if job.cancel_requested else JobState.FAILED,
                      error=None if job.cancel_requested else JobFailed(
                          f"replica {job.replica} ended the job without a result"))

    def _lose(self, job: RemoteJob, why: str) -> None:
        if job.done:
            return
        self.lost_jobs += 1
        log.warning("%s lost: %s", job.id, why)
        if job.stream is not None:
            try:
                job.stream.cancel()
            except Exception:
                pass
        self._end(job, JobState.FAILED, error=JobFailed(f"{why} while it held this job; nothing was made, "
                                                        "try again (another replica takes it)"))

    def _end(self, job: RemoteJob, state: JobState, *, result: JobResult | None = None,
             error: BaseException | None = None) -> None:
        with self._lock:
            if job.done:
                return
            if job in self._jobs:
                self._jobs.remove(job)
            if job.replica is not None:
                self.served[job.replica] = self.served.get(job.replica, 0) + 1
        job.finish(state, result=result, error=error)
        job.answered.set()
        self._positions_changed()

    def _positions_changed(self) -> None:
        with self._lock:
            waiting = [j for j in self._jobs if j.replica is None]
        for position, job in enumerate(waiting, start=1):
            if job.position != position:
                job.position = position
                job._notify()

    def _job_changed(self, job: Job) -> None:
        if not job.done:
            return
        with self._lock:
            if getattr(job, "_end_hooks_fired", False):
                return
            job._end_hooks_fired = True  # type: ignore[attr-defined]
        for hook in self._end_hooks:
            _call(hook, job)

    def generate(self, raw: GenerationRequest | Mapping[str, Any] | Validated, *, owner: str | None = None,
                 timeout: float | None = None) -> JobResult:
        return self.submit(raw, owner=owner).wait(timeout)

    def status(self, job: Job) -> JobStatus:
        position = 0 if job.state != JobState.QUEUED else getattr(job, "position", 1)
        elapsed = (job.finished or time.monotonic()) - (job.started or job.created)
        return JobStatus(id=job.id, state=job.state, position=position, step=job.step, total_steps=job.total_steps,
                         eta_s=getattr(job, "eta_s", None), elapsed_s=elapsed)

    def cancel(self, job: Job) -> None:
        """A job still waiting for a replica ends now; one on a replica stops at its next step."""
        job.cancel()
        stream = getattr(job, "stream", None)
        if stream is not None:
            try:
                stream.cancel()
            except Exception:
                log.debug("stream cancel failed", exc_info=True)
        if isinstance(job, RemoteJob) and job.replica is None:
            self._end(job, JobState.CANCELLED)

    def cancel_owner(self, owner: str) -> int:
        with self._lock:
            mine = [j for j in self._jobs if j.owner == owner]
        for job in mine:
            self.cancel(job)
        return len(mine)

    def queue_info(self) -> QueueInfo:
        """Jobs not ended yet (waiting for a replica or on one); no running job to watch here: each replica's
        health check watches its own worker."""
        with self._lock:
            depth = len(self._jobs)
        return QueueInfo(depth=depth, running_job=None, last_heartbeat=time.monotonic())

    # --- memory -----------------------------------------------------------------------------------------------
    def memory_snapshot(self) -> Any:
        """The snapshot of the replica that would take the next request (the single-engine shape)."""
        target = self._target() or next((r for r in self._posts() if r.get("snapshot")), None)
        if target is None or target.get("snapshot") is None:
            raise NotReady("no replica has a memory reading yet")
        return _snapshot_of(target)

    def target_replica(self, need_bytes: int = 0) -> str | None:
        """The id of the replica the router would pick now for ``need_bytes`` (the page marks its bar)."""
        target = self._target(need_bytes)
        return target["replica"] if target is not None else None

    def gpu_stats(self) -> Any:
        return None  # NVML's reading is the replica host's; the page shows each replica's bar instead

    def _estimator(self, replica: dict[str, Any]) -> Any:
        from ..memory.estimator import WorkingMemoryEstimator

        data = replica.get("estimator")
        if data is None:
            return None
        key = f"{replica['replica']}:{hash(repr(data))}"
        est = self._estimators.get(key)
        if est is None:
            est = WorkingMemoryEstimator.from_json(data)
            self._estimators = {k: v for k, v in self._estimators.items() if not k.startswith(replica["replica"])}
            self._estimators[key] = est
        return est

    def predict_working_bytes(self, request: RunRequest) -> int:
        from ..memory.estimator import WorkShape

        target = self._target()
        est = self._estimator(target) if target is not None else None
        if est is None:
            raise NotReady("no replica is ready")
        return est.predict(WorkShape(request.width, request.height, request.batch, request.cfg))

    def admit(self, request: RunRequest) -> Any:
        """Admission as the replica the router would pick judges it (its snapshot and estimator)."""
        from ..memory.admission import admit_shape
        from ..memory.estimator import WorkShape

        shape = WorkShape(request.width, request.height, request.batch, request.cfg)
        target = self._target()
        est = self._estimator(target) if target is not None else None
        if est is None:
            raise NotReady("no replica is ready")
        target = self._target(est.predict(shape)) or target
        est = self._estimator(target) or est
        return admit_shape(est, _snapshot_of(target), shape, int(target.get("margin_bytes", 0)))

    # --- what it is -------------------------------------------------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        replicas = self._posts()
        first = next((r for r in replicas if r.get("ready")), replicas[0] if replicas else None)
        info = dict(first.get("model") or {}) if first is not None else {
            "id": None, "label": None, "is_demo": False, "device": None, "dtype": None}
        ready = sum(1 for r in replicas if r.get("ready"))
        info["replicas"] = {"count": len(replicas), "ready": ready, "app": self.app_name}
        if first is not None and len(replicas) > 1:
            info["device"] = f"{len(replicas)} replicas ({info.get('device')})"
        info["state"], info["reason"] = self.state.value, self.reason
        return info

    # --- hooks ------------------------------------------------------------------------------------------------
    def add_result_hook(self, hook: Callable[[Job, JobResult], None]) -> None:
        self._result_hooks.append(hook)

    def add_end_hook(self, hook: Callable[[Job], None]) -> None:
        self._end_hooks.append(hook)

    def add_reject_hook(self, hook: Callable[[EngineError], None]) -> None:
        self._reject_hooks.append(hook)


def _snapshot_of(replica: dict[str, Any]) -> Any:
    from ..memory.probe import MemorySnapshot

    return MemorySnapshot.from_dict(replica["snapshot"])


def _call(hook: Callable[..., None], *args: Any) -> None:
    try:
        hook(*args)
    except Exception:
        log.exception("engine hook %r failed", hook)
