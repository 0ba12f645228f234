"""The Ray Serve deployment: each replica holds one ``Engine`` (one GPU, or a share of the CPUs).

A replica starts its engine in the background and is a Serve replica at once; its routing stats say whether it is
ready, unloaded (idle unload) and how much working memory it has, so the router (``routing.py``) sends work only
to a ready replica predicted to fit. ``check_health`` fails when the engine failed to start or its worker died:
Serve then replaces the replica. Every half second the replica posts its state, memory snapshot and queue to the
board (``board.py``), where the door reads all replicas at once.

``run`` is a streaming method: it submits the validated request to the engine and yields the job's progress
(queued, running step n of m) and then its end (the ``JobResult``, or how it failed). Refusals (not ready, memory,
queue full, an invalid prompt) travel as data (``refusal``/``raise_refusal``): the engine's errors carry
arguments that do not survive pickling as exceptions. When the caller cancels the stream (the door's cancel, a
client gone), the replica cancels the job.

Concurrency: ``max_ongoing_requests`` is 2, one job running and one waiting in the serial worker, so the next job
starts with no round trip between them; further requests wait in the caller's queue, which holds at most
``max_queued_requests`` (``max_queue``): beyond that Ray refuses at once (the door's 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..engine.jobs import ClientBusy, EngineError, JobFailed, JobState, MemoryRefused, NotReady, QueueFull
from ..validation import RequestError, Validated

log = logging.getLogger(__name__)

MAX_ONGOING = 2  # one job running, one waiting in the serial worker: the next starts without a round trip
REPORT_S = 0.5  # how often a replica posts to the board
STATUS_EVERY_S = 0.1  # progress events of a running job: at most ten a second
ROUTER_CLASS = "zimage_ui.scale.routing:ZImageRouter"
DEPLOYMENT_NAME = "ZImageReplica"


def refusal(exc: BaseException) -> dict[str, Any]:
    """An engine refusal as data (the exceptions themselves do not pickle with their arguments).

    >>> raise_refusal(refusal(QueueFull(3, 12.0)))
    Traceback (most recent call last):
    ...
    zimage_ui.engine.jobs.QueueFull: queue full: 3 jobs waiting; try again in about 12 s
    """
    if isinstance(exc, RequestError):
        return {"kind": "invalid", "errors": list(exc.errors)}
    if isinstance(exc, QueueFull):
        return {"kind": "queue_full", "depth": exc.depth, "retry_after_s": exc.retry_after_s}
    if isinstance(exc, MemoryRefused):
        return {"kind": "memory", "admission": exc.admission}
    if isinstance(exc, ClientBusy):
        return {"kind": "client_busy", "message": str(exc)}
    if isinstance(exc, NotReady):
        return {"kind": "not_ready", "message": str(exc)}
    return {"kind": "error", "message": str(exc)}


def refusal_error(data: dict[str, Any]) -> BaseException:
    """The exception ``refusal`` described."""
    kind = data.get("kind")
    if kind == "invalid":
        return RequestError([tuple(e) for e in data["errors"]])
    if kind == "queue_full":
        return QueueFull(int(data["depth"]), float(data["retry_after_s"]))
    if kind == "memory":
        return MemoryRefused(data["admission"])
    if kind == "client_busy":
        error = ClientBusy("", 1)
        error.args = (data["message"],)
        return error
    if kind == "not_ready":
        return NotReady(data["message"])
    return JobFailed(data.get("message", "refused"))


def raise_refusal(data: dict[str, Any]) -> None:
    raise refusal_error(data)


class ZImageReplica:
    """One engine in one Serve replica. ``settings``: ``Settings`` fields as a dict (it travels to the replica)."""

    def __init__(self, settings: dict[str, Any], *, threads: int | None = None, app_name: str = "zimage",
                 report_s: float = REPORT_S):
        if threads:  # each replica its own share of the CPUs: two replicas must not fight over the same cores
            import torch

            torch.set_num_threads(int(threads))
        from ..engine.engine import Engine
        from ..settings import Settings
        from .board import get_board

        self.settings = Settings(**settings)
        self.engine = Engine(self.settings)
        self.replica, self.actor_name = _identity()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.gpu = _gpu_label()
        self.started_at = time.time()
        self.threads = threads
        self.engine.start_in_background()
        self._board = get_board(app_name)
        self._stop = threading.Event()
        self._report_s = report_s
        threading.Thread(target=self._report_loop, name="zimage-replica-report", daemon=True).start()

    # --- Serve's hooks ------------------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; raising makes Serve replace the replica."""
        state = self.engine.state.value
        if state == "failed":
            raise RuntimeError(f"the engine failed to start: {self.engine.reason}")
        if state == "ready" and not self.engine.ready:
            raise RuntimeError("the GPU worker thread died")
        limit = self.settings.watchdog_seconds  # the single server's watchdog, here per replica
        queue = self.engine.queue_info()
        if limit > 0 and queue.running_job is not None and time.monotonic() - queue.last_heartbeat > limit:
            raise RuntimeError(f"{queue.running_job.id} made no progress for {limit:g} s")

    def record_routing_stats(self) -> dict[str, Any]:
        """What the router (``routing.ZImageRouter``) decides by: ready, unloaded, working memory available."""
        engine = self.engine
        stats: dict[str, Any] = {"ready": bool(engine.ready), "unloaded": bool(getattr(engine, "unloaded", False)),
                                 "depth": engine.queue_info().depth}
        if engine.ready:
            try:
                stats["available_bytes"] = int(engine.available_working_bytes())
            except Exception:  # a reading that failed must not fail the stats call
                log.debug("available_working_bytes failed", exc_info=True)
        return stats

    def __del__(self) -> None:  # Serve's graceful shutdown of a replica (scale-down, redeploy, serve.shutdown)
        stop = getattr(self, "_stop", None)
        if stop is None:
            return
        stop.set()
        self.engine.shutdown(grace_s=self.settings.grace_seconds)
        try:
            self._board.forget.remote(self.replica)
        except Exception:
            pass

    # --- the door's calls ---------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Everything the door shows of this replica: identity, state, memory, queue, model, preset book."""
        engine = self.engine
        snapshot = estimator = available = None
        try:
            if engine.state.value in ("warming", "ready"):
                snapshot = engine.memory_snapshot().to_dict()
        except Exception:
            log.debug("memory snapshot failed", exc_info=True)
        if engine.ready:
            try:
                available = int(engine.available_working_bytes())
                est = getattr(engine, "estimator", None)
                estimator = est.to_json() if est is not None else None
            except Exception:
                log.debug("admission figures failed", exc_info=True)
        queue = engine.queue_info()
        model = engine.model_info()
        model["knows_shapes"] = bool(model.get("trained_demo"))  # the door's page reads trained_demo itself
        return {"replica": self.replica, "actor_name": self.actor_name, "host": self.host, "pid": self.pid,
                "gpu": self.gpu, "started_at": self.started_at, "threads": self.threads,
                "state": engine.state.value, "reason": engine.reason, "ready": bool(engine.ready),
                "unloaded": bool(getattr(engine, "unloaded", False)), "snapshot": snapshot,
                "available_bytes": available, "estimator": estimator,
                "margin_bytes": int(self.settings.memory_margin_bytes),
                "queue": {"depth": queue.depth, "running": queue.running_job is not None}, "model": model,
                "book": engine.presets() if engine.ready else None}

    async def run(self, validated: Validated, need_bytes: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Submit ``validated`` and stream its progress, then its end. ``need_bytes`` is for the router only."""
        me = {"replica": self.replica, "host": self.host, "gpu": self.gpu}
        try:
            self._check_prompt(validated)
            job = self.engine.submit(validated)
        except (EngineError, RequestError) as exc:
            yield {"t": "refused", **me, **refusal(exc)}
            return
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def changed(_job: Any) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop is gone
                pass

        job.on_change(changed)
        yield {"t": "accepted", **me, "job": job.id}
        last: tuple[Any, ...] | None = None
        sent = 0.0
        try:
            while not job.done:
                wake.clear()
                status = self.engine.status(job)
                now = (status.state.value, status.position, status.step, status.total_steps)
                # every change of state or position; steps at most every STATUS_EVERY_S (each event is a message)
                if now != last and (last is None or now[:2] != last[:2] or time.monotonic() - sent >= STATUS_EVERY_S):
                    last, sent = now, time.monotonic()
                    yield {"t": "status", "state": status.state.value, "position": status.position,
                           "step": status.step, "total_steps": status.total_steps, "eta_s": status.eta_s}
                if job.done:
                    break
                try:
                    await asyncio.wait_for(wake.wait(), 1.0)
                except TimeoutError:
                    pass
            if job.state == JobState.DONE:
                yield {"t": "done", "result": job.result}
            else:
                error = job.error
                yield {"t": "end", "state": job.state.value, "message": str(error) if error else job.state.value,
                       "kind": getattr(error, "kind", "error")}
        finally:  # the caller cancelled the stream (or went away): the job must not run on for nobody
            if not job.done:
                self.engine.cancel(job)

    def _check_prompt(self, validated: Validated) -> None:
        """The prompt-length check the door cannot make (it has no tokenizer): the validator again, here."""
        from ..validation import GenerationRequest

        r = validated.request
        self.engine.validate(GenerationRequest(prompt=r.prompt, negative_prompt=r.negative_prompt, preset=r.preset,
                                               steps=r.steps, guidance=r.guidance, width=r.width, height=r.height,
                                               seed=r.seed, batch=r.batch))

    # --- the board ----------------------------------------------------------------------------------------------
    def _report_loop(self) -> None:
        while not self._stop.wait(self._report_s):
            try:
                self._board.post.remote(self.replica, self.info())
            except Exception:  # the board restarts (max_restarts=-1); the next post lands
                log.debug("board post failed", exc_info=True)


def _identity() -> tuple[str, str | None]:
    """(replica id, Ray actor name) inside a Serve replica; (pid-based id, None) elsewhere (tests, doctests)."""
    try:
        from ray import serve

        context = serve.get_replica_context()
        import ray

        return context.replica_id.unique_id, ray.get_runtime_context().get_actor_name()
    except Exception:
        return f"pid{os.getpid()}", None


def _gpu_label() -> str:
    try:
        import ray

        ids = ray.get_gpu_ids()
    except Exception:
        ids = []
    return ",".join(str(i) for i in ids) if ids else "cpu"


def deployment_options(*, replicas: int, num_gpus: float = 0, num_cpus: float = 1, max_queued: int = 16,
                       grace_s: float = 30.0, health_period_s: float = 5.0) -> dict[str, Any]:
    """The Serve options of the deployment (the same in ``build_app`` and the repo's Serve config file).

    >>> deployment_options(replicas=2)["ray_actor_options"]
    {'num_cpus': 1}
    >>> deployment_options(replicas=4, num_gpus=1)["ray_actor_options"]
    {'num_gpus': 1, 'num_cpus': 1}
    """
    actor: dict[str, Any] = {"num_gpus": num_gpus, "num_cpus": num_cpus} if num_gpus else {"num_cpus": num_cpus}
    return {"name": DEPLOYMENT_NAME, "num_replicas": replicas, "ray_actor_options": actor,
            "max_ongoing_requests": MAX_ONGOING, "max_queued_requests": max_queued,
            "health_check_period_s": health_period_s, "health_check_timeout_s": max(30.0, 3 * health_period_s),
            "graceful_shutdown_timeout_s": grace_s + 5,
            "request_router_config": {"request_router_class": ROUTER_CLASS, "request_routing_stats_period_s": 1.0,
                                      "request_routing_stats_timeout_s": 5.0}}


def build_app(settings: Any, *, replicas: int, app_name: str = "zimage", num_gpus: float = 0,
              num_cpus: float = 1, threads: int | None = None, health_period_s: float = 5.0) -> Any:
    """The Serve application: ``replicas`` engines with ``settings`` (a ``Settings``), ready for ``serve.run``."""
    from ray import serve

    replica_settings = settings.model_dump(exclude_none=True)
    for name in ("output_dir", "cache_dir", "model_dir", "presets_file"):  # a replica's working folder is Ray's
        if name in replica_settings:
            replica_settings[name] = str(Path(replica_settings[name]).expanduser().resolve())
    replica_settings["max_queue"] = max(settings.max_queue, MAX_ONGOING)
    replica_settings["jobs_per_client"] = 100  # the door counts a client's jobs across replicas
    # the door refuses beyond max_queue itself (RemoteEngine.submit); Ray's limit is the backstop for requests in
    # transit, with room for those the replicas are about to take
    options = deployment_options(replicas=replicas, num_gpus=num_gpus, num_cpus=num_cpus,
                                 max_queued=settings.max_queue + MAX_ONGOING * replicas,
                                 grace_s=settings.grace_seconds,
                                 health_period_s=health_period_s)
    return serve.deployment(ZImageReplica, **options).bind(replica_settings, threads=threads, app_name=app_name)


def app_builder(args: dict[str, Any]) -> Any:
    """The application of a Serve config file (``import_path: zimage_ui.scale.replica:app_builder``).

    ``args``: ``replicas``, ``num_gpus`` (per replica; 0 on CPU), ``num_cpus``, ``threads``, ``app_name`` and
    any ``Settings`` field (``model``, ``max_queue``, ``output_dir`` …)."""
    from ..settings import Settings

    args = dict(args)
    scale = {k: args.pop(k) for k in ("replicas", "num_gpus", "num_cpus", "threads", "app_name",
                                      "health_period_s") if k in args}
    settings = Settings(**args)
    return build_app(settings, replicas=int(scale.get("replicas", 1)), app_name=scale.get("app_name", "zimage"),
                     num_gpus=float(scale.get("num_gpus", 0)), num_cpus=float(scale.get("num_cpus", 1)),
                     threads=scale.get("threads"), health_period_s=float(scale.get("health_period_s", 5.0)))
