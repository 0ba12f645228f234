"""What the routes of one app share: the engine (its face), the settings, the server's own state, the stores."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine.api import EngineAPI
    from ..limits import DoorLimits
    from ..settings import Settings
    from .history import History
    from .metrics import ServiceMetrics


@dataclasses.dataclass
class ServiceState:
    """What the server (not the engine) knows: shutting down, or unhealthy and about to exit."""

    draining: bool = False
    fatal: str | None = None

    def readiness(self, engine: EngineAPI) -> tuple[bool, str, str]:
        """(ready, status, reason) as /readyz reports it."""
        if self.fatal is not None:
            return False, "unhealthy", self.fatal
        if self.draining:
            return False, "stopping", "shutting down"
        state = engine.state.value
        if state == "ready" and not engine.ready:
            return False, "unhealthy", "the GPU worker is not running"
        if state == "ready":
            return True, "ready", "ready"
        return False, state, engine.reason


@dataclasses.dataclass
class ServiceContext:
    """One app's parts, handed to each router factory (``service/routes``)."""

    engine: EngineAPI
    settings: Settings
    state: ServiceState
    metrics: ServiceMetrics
    history: History | None
    limits: DoorLimits
    users: Any  # security.load_users(settings): {name: password hash}, empty when no logins
    output_dir: Path  # resolved: history serves files from here only
