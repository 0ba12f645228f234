"""Starting the replicas: ``zimage-ui serve --replicas N`` (a local Ray instance) or ``--ray-address`` (a cluster
where the application was deployed with ``serve deploy deploy/ray-serve.yaml``).

One host: one replica per GPU (at most ``--replicas``), or on a machine without a GPU ``N`` replicas of the demo
model (or whatever ``--model`` names), each with ``cpus // N`` CPUs and as many torch threads. The web UI and the
API run in this process, on the usual port, over a ``RemoteEngine``. Ray's HTTP proxy is off: the door is ours.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from .client import RemoteEngine

log = logging.getLogger(__name__)

APP_NAME = "zimage"


@dataclass(frozen=True)
class LocalPlan:
    """How many replicas, and what each gets.

    >>> LocalPlan.for_machine(replicas=2, gpus=0, cpus=2)
    LocalPlan(replicas=2, num_gpus=0, num_cpus=1, threads=1)
    >>> LocalPlan.for_machine(replicas=0, gpus=4, cpus=64)
    LocalPlan(replicas=4, num_gpus=1, num_cpus=1, threads=None)
    >>> LocalPlan.for_machine(replicas=8, gpus=2, cpus=64).replicas  # one replica per GPU at most
    2
    """

    replicas: int
    num_gpus: float
    num_cpus: float
    threads: int | None

    @classmethod
    def for_machine(cls, *, replicas: int, gpus: int, cpus: int) -> LocalPlan:
        if gpus:
            return cls(replicas=min(replicas, gpus) if replicas else gpus, num_gpus=1, num_cpus=1, threads=None)
        replicas = max(1, replicas)
        share = max(1, cpus // replicas)
        return cls(replicas=replicas, num_gpus=0, num_cpus=share, threads=share)


def start_local(settings: Any, *, plan: LocalPlan | None = None, health_period_s: float = 5.0,
                ray_init: dict[str, Any] | None = None) -> RemoteEngine:
    """Start Ray on this machine, deploy ``plan.replicas`` replicas and return the door's engine (started).
    Its ``shutdown`` drains the jobs, then stops the application and Ray."""
    import ray
    from ray import serve

    from .board import shutdown_board
    from .replica import build_app

    owns_ray = not ray.is_initialized()
    if owns_ray:
        cpus = max(os.cpu_count() or 1, int(plan.replicas * plan.num_cpus) if plan is not None else 1)
        ray.init(**{"num_cpus": cpus, "include_dashboard": False, "namespace": "zimage", **(ray_init or {})})
    if plan is None:  # the GPUs Ray found on this machine (CUDA_VISIBLE_DEVICES respected)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        plan = LocalPlan.for_machine(replicas=settings.replicas, gpus=gpus, cpus=os.cpu_count() or 1)
    serve.start(proxy_location="Disabled")
    log.info("starting %d replica(s) on Ray Serve (%s each)", plan.replicas,
             f"{plan.num_gpus:g} GPU" if plan.num_gpus else f"{plan.num_cpus:g} CPUs, {plan.threads} threads")
    app = build_app(settings, replicas=plan.replicas, app_name=APP_NAME, num_gpus=plan.num_gpus,
                    num_cpus=plan.num_cpus, threads=plan.threads, health_period_s=health_period_s)
    handle = serve.run(app, name=APP_NAME, route_prefix=None)

    def stop() -> None:
        serve.delete(APP_NAME)
        shutdown_board(APP_NAME)
        if owns_ray:
            serve.shutdown()
            ray.shutdown()

    engine = RemoteEngine(settings, handle, app_name=APP_NAME, on_shutdown=stop)
    engine.start()
    return engine


def connect(settings: Any) -> RemoteEngine:
    """The door of a cluster: connect to ``settings.ray_address`` and the application deployed there."""
    import ray
    from ray import serve

    ray.init(address=settings.ray_address, namespace="zimage")
    handle = serve.get_app_handle(settings.ray_app)
    engine = RemoteEngine(settings, handle, app_name=settings.ray_app, on_shutdown=ray.shutdown)
    engine.start()
    return engine


def remote_engine(settings: Any) -> RemoteEngine:
    """The engine ``zimage-ui serve`` uses with ``--replicas`` or ``--ray-address``."""
    return connect(settings) if settings.ray_address else start_local(settings)

