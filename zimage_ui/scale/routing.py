"""The request router: a ready replica predicted to fit, and among those the one with the fewest ongoing requests.

Ray Serve's router calls ``choose_replicas`` for each request and tries the ranks it returns in order; within a
rank it picks the replica with the shortest queue that still has a free slot (``max_ongoing_requests``), and when
none has one the request waits in the caller's queue and is routed again. The ranks come from each replica's
routing stats (``ZImageReplica.record_routing_stats``: ready, unloaded, available working memory):

* some ready replica is predicted to fit the request (``need_bytes``): those, the loaded ones first, then the ones
  whose weights were unloaded after idle (a reload costs seconds);
* none fits but some are ready: the ready ones (the replica's admission then refuses with its numbers);
* none is ready: every replica (each answers "not ready", so the door says so instead of waiting forever).

A replica that is loading or unloaded is thus never picked while another can answer.

    >>> ranks([{"ready": True, "available_bytes": 10}, {"ready": True, "available_bytes": 1}, {"ready": False}],
    ...       need_bytes=5)
    [[0]]
    >>> ranks([{"ready": True, "unloaded": True}, {"ready": True}, {"ready": False}], need_bytes=0)
    [[1], [0]]
    >>> ranks([{"ready": False}, {}], need_bytes=0)
    [[0, 1]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def ranks(stats: Sequence[dict[str, Any]], need_bytes: int) -> list[list[int]]:
    """The ranks (indexes into ``stats``) for a request needing ``need_bytes`` of working memory."""
    ready = [i for i, s in enumerate(stats) if s.get("ready")]
    if not ready:
        return [list(range(len(stats)))] if stats else []
    fits = [i for i in ready if not need_bytes or stats[i].get("available_bytes") is None
            or stats[i]["available_bytes"] >= need_bytes]
    if not fits:
        return [ready]
    loaded = [i for i in fits if not stats[i].get("unloaded")]
    unloaded = [i for i in fits if stats[i].get("unloaded")]
    return [rank for rank in (loaded, unloaded) if rank]


class ZImageRouter(RequestRouter):
    """Memory- and readiness-aware routing for ``ZImageReplica`` (``request_router_config``)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        need = 0
        if pending_request is not None:
            need = int(pending_request.kwargs.get("need_bytes", 0) or 0)
            # every rank below is all there is to try: when all are busy, back off before the next round (Ray's
            # own routers set this once their last fallback is reached; left False, routing spins on the CPU)
            pending_request.routing_context.should_backoff = True
        stats = [r.routing_stats or {} for r in candidate_replicas]
        return [[candidate_replicas[i] for i in rank] for rank in ranks(stats, need)]
