"""Prometheus metrics of one service: a registry per app (tests and two apps in one process never collide).

Series (all ``zimage_``): queue depth and running job, jobs by outcome (ok, cancelled, rejected, oom, error),
rejections by reason, generation seconds and seconds per step (histograms by preset), VRAM bytes by segment,
OOMs recovered, model load and warm-up seconds, readiness.

    >>> from prometheus_client import generate_latest
    >>> m = ServiceMetrics(engine=None)
    >>> m.count_rejection("rate_limited")
    >>> b'zimage_jobs_total{outcome="rejected"} 1.0' in generate_latest(m.registry)
    True
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine.api import LOCAL_REPLICA
from ..engine.jobs import REJECTION_KINDS, EngineError, Job, JobState, NotReady, error_kind

if TYPE_CHECKING:
    from ..engine.api import EngineAPI

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "cancelled", "rejected", "oom", "error")
VRAM_SEGMENTS = ("total", "weights", "working", "cache", "other", "free")
# Turbo at 1024² is ~1 s on an H200 and a few on smaller cards; CPU and base presets reach minutes.
GENERATION_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


def job_outcome(job: Job) -> str:
    """ok, cancelled, oom or error for a finished job."""
    if job.state == JobState.DONE:
        return "ok"
    if job.state == JobState.CANCELLED:
        return "cancelled"
    return "oom" if error_kind(job.error) == "oom" else "error"


def rejection_reason(error: EngineError) -> str:
    """The ``reason`` label of a refused submission: the error's kind (``engine.jobs.REJECTION_KINDS``) or other."""
    kind = error_kind(error)
    return kind if kind in REJECTION_KINDS else "other"


class _EngineCollector(Collector):
    """Values read from the engine at scrape time (its face: ``queue_info``, ``model_info``, ``memory_snapshot``):
    nothing to keep in sync, nothing stale."""

    def __init__(self, engine: EngineAPI | None, unhealthy: Callable[[], bool]):
        self.engine = engine
        self.unhealthy = unhealthy

    def collect(self) -> Iterator[Any]:
        engine = self.engine
        queue = engine.queue_info() if engine is not None else None
        info = engine.model_info() if engine is not None else {}
        yield GaugeMetricFamily("zimage_queue_depth", "Jobs waiting behind the running one.",
                                value=queue.depth if queue is not None else 0)
        yield GaugeMetricFamily("zimage_queue_running", "1 while a job is running.",
                                value=int(queue is not None and queue.running_job is not None))
        ready = bool(engine is not None and engine.ready and not self.unhealthy())
        yield GaugeMetricFamily("zimage_ready", "1 when /readyz answers 200.", value=int(ready))
        yield GaugeMetricFamily("zimage_model_load_seconds", "Seconds the model took to load.",
                                value=info.get("load_seconds", 0.0))
        yield GaugeMetricFamily("zimage_warmup_seconds", "Seconds the warm-up took.",
                                value=info.get("warmup_seconds", 0.0))
        yield GaugeMetricFamily("zimage_model_unloaded", "1 while the weights are unloaded after idle "
                                "(idle_unload_minutes); the next request reloads them.",
                                value=int(bool(info.get("unloaded", False))))
        yield CounterMetricFamily("zimage_model_reloads", "Reloads after an idle unload.",
                                  value=info.get("reloads", 0))
        reload_s = info.get("last_reload_seconds")
        if reload_s is not None:
            yield GaugeMetricFamily("zimage_model_reload_seconds", "Seconds the last reload after an idle "
                                    "unload took.", value=reload_s)
        yield CounterMetricFamily("zimage_oom_recovered", "Jobs that ran out of memory and still finished (a "
                                  "retry, or a smaller VAE decode).", value=info.get("oom_recovered", 0))
        oom_events = info.get("oom_events") or {}
        family = CounterMetricFamily("zimage_oom", "Out-of-memory errors in admitted jobs, by phase; each one "
                                     "teaches the memory estimator that request's need.", labels=["phase"])
        for phase in ("denoise", "decode"):
            family.add_metric([phase], oom_events.get(phase, 0))
        yield family
        yield CounterMetricFamily("zimage_cache_releases", "Times the allocator's cache went back to the driver "
                                  "(queue empty, after warm-up).", value=info.get("cache_releases", 0))
        yield CounterMetricFamily("zimage_cache_released_bytes", "Bytes of allocator cache given back.",
                                  value=info.get("cache_released_bytes", 0))
        budget = info.get("budget")
        if budget is not None:
            yield GaugeMetricFamily("zimage_vram_budget_bytes", "The VRAM budget for the whole process "
                                    "(nvidia-smi's figure, CUDA context included).", value=budget["budget_bytes"])
            yield GaugeMetricFamily("zimage_allocator_cap_bytes", "The allocator's cap under the budget: budget "
                                    "less the memory outside the allocator and its headroom.",
                                    value=budget["allocator_cap_bytes"])
        cache = info.get("prompt_cache")
        if cache is not None:
            family = CounterMetricFamily("zimage_prompt_cache", "Prompt-embedding cache lookups.",
                                         labels=["result"])
            family.add_metric(["hit"], cache["hits"])
            family.add_metric(["miss"], cache["misses"])
            yield family
        vram = GaugeMetricFamily("zimage_vram_bytes", "Device memory by segment (the memory probe's snapshot).",
                                 labels=["segment"])
        snapshot = _snapshot(engine)
        for segment in VRAM_SEGMENTS:
            value = snapshot.get(f"{segment}_bytes")
            if isinstance(value, int):
                vram.add_metric([segment], value)
        yield vram
        if isinstance(snapshot.get("peak_working_bytes"), int):
            yield GaugeMetricFamily("zimage_vram_peak_working_bytes", "Peak working memory of the last job.",
                                    value=snapshot["peak_working_bytes"])
        replicas = engine.replicas() if engine is not None else []
        if any(r.get("replica") != LOCAL_REPLICA for r in replicas):  # per-replica series: Ray Serve's replicas
            yield from replica_families(replicas)


REPLICA_LABELS = ["replica", "host", "gpu"]


def replica_families(replicas: list[dict[str, Any]]) -> Iterator[Any]:
    """Per-replica series (Ray Serve scale-out), labelled ``replica``, ``host`` and ``gpu``.

    >>> fams = list(replica_families([{"replica": "a1", "host": "h", "gpu": "0", "ready": True, "served": 3,
    ...                                "queue": {"depth": 1}, "snapshot": {"weights_bytes": 5}}]))
    >>> [(f.name, f.samples[0].value) for f in fams][:3]
    [('zimage_replica_ready', 1), ('zimage_replica_queue_depth', 1), ('zimage_replica_jobs', 3)]
    >>> fams[0].samples[0].labels
    {'replica': 'a1', 'host': 'h', 'gpu': '0'}
    """
    ready = GaugeMetricFamily("zimage_replica_ready", "1 while the replica is ready.", labels=REPLICA_LABELS)
    depth = GaugeMetricFamily("zimage_replica_queue_depth", "Jobs waiting or running on the replica.",
                              labels=REPLICA_LABELS)
    served = CounterMetricFamily("zimage_replica_jobs", "Jobs this door sent to the replica that ended.",
                                 labels=REPLICA_LABELS)
    vram = GaugeMetricFamily("zimage_replica_vram_bytes", "Device memory of the replica by segment.",
                             labels=[*REPLICA_LABELS, "segment"])
    for r in replicas:
        labels = [str(r.get("replica")), str(r.get("host")), str(r.get("gpu"))]
        ready.add_metric(labels, int(bool(r.get("ready"))))
        depth.add_metric(labels, (r.get("queue") or {}).get("depth", 0))
        served.add_metric(labels, r.get("served", 0))
        snapshot = r.get("snapshot") or {}
        for segment in VRAM_SEGMENTS:
            value = snapshot.get(f"{segment}_bytes")
            if isinstance(value, int):
                vram.add_metric([*labels, segment], value)
    yield from (ready, depth, served, vram)


def _snapshot(engine: EngineAPI | None) -> dict[str, Any]:
    if engine is None:
        return {}
    try:
        return engine.memory_snapshot().to_dict()
    except NotReady:  # nothing loaded yet
        return {}
    except Exception:  # a scrape must never fail because the probe hiccupped
        log.debug("memory snapshot failed", exc_info=True)
        return {}


class ServiceMetrics:
    """The service's registry and the counters fed by the engine's hooks."""

    def __init__(self, engine: EngineAPI | None, *, unhealthy: Callable[[], bool] = lambda: False):
        self.registry = CollectorRegistry()
        self.jobs = Counter("zimage_jobs", "Jobs by outcome.", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.jobs.labels(outcome)  # every outcome shows from the first scrape, at 0
        self.rejections = Counter("zimage_rejections", "Refused requests by reason.", ["reason"],
                                  registry=self.registry)
        self.generation_seconds = Histogram("zimage_generation_seconds", "Seconds per finished job (encode, "
                                            "denoise, decode).", ["preset"], buckets=GENERATION_BUCKETS,
                                            registry=self.registry)
        self.step_seconds = Histogram("zimage_step_seconds", "Seconds per denoising step.", ["preset"],
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine, unhealthy))

    def attach(self, engine: EngineAPI) -> None:
        """Count every job the engine ends or refuses, whichever door sent it."""
        engine.add_end_hook(self.on_job_end)
        engine.add_reject_hook(self.on_reject)

    def on_job_end(self, job: Job) -> None:
        self.jobs.labels(job_outcome(job)).inc()
        result = job.result
        if job.state == JobState.DONE and result is not None:
            preset = result.request.preset
            self.generation_seconds.labels(preset).observe(result.timings.get("total_s", 0.0))
            self.step_seconds.labels(preset).observe(result.timings.get("per_step_s", 0.0))

    def on_reject(self, error: EngineError) -> None:
        self.count_rejection(rejection_reason(error))

    def count_rejection(self, reason: str) -> None:
        """A refusal the engine never saw (rate limit, shutting down)."""
        self.jobs.labels("rejected").inc()
        self.rejections.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
