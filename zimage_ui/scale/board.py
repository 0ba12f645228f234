"""The board: where every replica posts what it is (state, memory snapshot, queue, model) twice a second.

A DeploymentHandle routes each call to one replica of its choosing, so the door cannot ask "every replica" through
it; and a replica's own request slots (``max_ongoing_requests``) are for generations, not for the VRAM bar's
polling. So each replica posts to this actor, and the door reads all of them in one call. An entry older than
``max_age_s`` is a replica that died or was replaced: it is left out.

    >>> board = Board()
    >>> board.post("r1", {"ready": True}, now=100.0)
    >>> [e["ready"] for e in board.read(max_age_s=2.0, now=101.0)], board.read(max_age_s=2.0, now=103.0)
    ([True], [])
"""

from __future__ import annotations

import time
from typing import Any

BOARD_NAMESPACE = "zimage"


def board_name(app_name: str) -> str:
    return f"zimage-board-{app_name}"


class Board:
    """Latest post of each replica, with the time it came."""

    def __init__(self) -> None:
        self._posts: dict[str, tuple[float, dict[str, Any]]] = {}

    def post(self, replica: str, info: dict[str, Any], now: float | None = None) -> None:
        self._posts[replica] = (time.time() if now is None else now, info)

    def forget(self, replica: str) -> None:
        self._posts.pop(replica, None)

    def read(self, max_age_s: float = 3.0, now: float | None = None) -> list[dict[str, Any]]:
        """The posts younger than ``max_age_s``, oldest replica first (by its start time); older ones are dropped."""
        now = time.time() if now is None else now
        for replica in [r for r, (t, _) in self._posts.items() if now - t > 10 * max_age_s]:
            del self._posts[replica]
        fresh = [info for t, info in self._posts.values() if now - t <= max_age_s]
        return sorted(fresh, key=lambda info: (info.get("started_at", 0.0), info.get("replica", "")))


def get_board(app_name: str) -> Any:
    """The board actor of ``app_name`` (created on first use; detached, so it outlives the replica that made it:
    ``shutdown_board`` ends it)."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1)(Board)
    return actor.options(name=board_name(app_name), namespace=BOARD_NAMESPACE, lifetime="detached",
                         get_if_exists=True).remote()


def shutdown_board(app_name: str) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(board_name(app_name), namespace=BOARD_NAMESPACE))
    except ValueError:  # never made, or gone already
        pass
