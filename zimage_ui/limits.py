"""Who may start what, the same through every door (web page and REST API): one owner per client, one rate limit,
and in kiosk mode the kiosk page's limits.

A browser session id is made up by the client, so it can't be what a limit counts: a client is its address, and
the user it logged in as. ``rate_limit_per_minute`` counts starts per client; with it on, or with logins
(``auth``/``auth_file``), the jobs of one client count together against ``jobs_per_client`` whichever door they
came through (a classroom). Without either (one person's machine) each browser tab and each API request is
its own owner.

A kiosk's page offers the presets as they are, one image a run and the sizes of its size picker; the API of a
kiosk takes the same, and says what it changed.

    >>> from zimage_ui.settings import Settings
    >>> limits = DoorLimits(Settings(rate_limit_per_minute=2))
    >>> client = Client("10.0.0.7")
    >>> limits.owner(client, alone="tab-1") == limits.owner(client, alone="tab-2")
    True
    >>> [limits.hit(client, now=t) for t in (0.0, 1.0, 2.0)]
    [None, None, 58.0]

Nothing here imports a door: the page (``zimage_ui.ui``) and the service (``zimage_ui.service``) both import it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import Any

from .messages import Count
from .presets import PresetBook
from .validation import Change, Validated


class RateLimiter:
    """At most ``per_minute`` hits per key in any 60-second window (a sliding log; keys are clients).

    >>> limiter = RateLimiter(2)
    >>> limiter.hit("a", now=0.0), limiter.hit("a", now=1.0), limiter.hit("a", now=2.0)
    (None, None, 58.0)
    """

    WINDOW_S = 60.0

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._hits: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()
        self._last_sweep = 0.0

    def hit(self, key: str, *, now: float | None = None) -> float | None:
        """Count one hit for ``key``; None if allowed, else the seconds until the next one would be."""
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits.setdefault(key, collections.deque())
            while hits and hits[0] <= now - self.WINDOW_S:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return max(hits[0] + self.WINDOW_S - now, 0.0)
            hits.append(now)
            if now - self._last_sweep > self.WINDOW_S:  # forget clients gone quiet so the map stays small
                self._last_sweep = now
                for stale in [k for k, v in self._hits.items() if not v or v[-1] <= now - self.WINDOW_S]:
                    del self._hits[stale]
            return None


@dataclasses.dataclass(frozen=True)
class Client:
    """Who is asking, as far as the server can tell: the peer address, and the user when logged in."""

    address: str
    user: str | None = None

    @property
    def key(self) -> str:
        # the user and the address together: one shared class login on thirty machines is thirty clients
        return f"{self.user}@{self.address}" if self.user else self.address


class DoorLimits:
    """The limits every door applies before ``engine.submit``; one instance is shared by the page and the API."""

    def __init__(self, settings: Any):
        per_minute = int(getattr(settings, "rate_limit_per_minute", 0) or 0)
        self.per_minute = per_minute
        self.limiter = RateLimiter(per_minute) if per_minute > 0 else None
        logins = bool(getattr(settings, "auth", None) or getattr(settings, "auth_file", None))
        self.grouped = self.limiter is not None or logins
        self.kiosk = bool(getattr(settings, "kiosk", False))

    def owner(self, client: Client, *, alone: str) -> str:
        """The owner ``jobs_per_client`` counts: the client (classroom), else ``alone`` (a tab, a request)."""
        return f"client:{client.key}" if self.grouped else alone

    def hit(self, client: Client, *, now: float | None = None) -> float | None:
        """Count one start for ``client``; None if allowed, else the seconds until the next one would be."""
        return None if self.limiter is None else self.limiter.hit(client.key, now=now)

    def shape(self, validated: Validated, engine: Any) -> Validated:
        """``validated`` as this server runs it: unchanged, or within the kiosk page's limits. ``engine``: an
        ``engine.api.EngineAPI`` (typed loosely: this shared module sits below the engine's layer)."""
        if not self.kiosk:
            return validated
        return kiosk_request(validated, engine.presets(), demo=bool(engine.model_info().get("is_demo")))


def kiosk_pixels(book: PresetBook, *, demo: bool) -> int:
    """The largest image a kiosk's size picker offers (width × height)."""
    from .sizes import load_sizes

    sizes = load_sizes()
    classes = sizes.classes(demo=demo, max_side=book.limits.side[1])
    areas = [w * h for name in classes for (w, h) in sizes.sizes[name].values()]
    return max(areas) if areas else book.limits.side[1] ** 2


def kiosk_request(validated: Validated, book: PresetBook, *, demo: bool) -> Validated:
    """Hold a request to what a kiosk's page can send: its preset's steps and guidance, one image, a size no
    larger than the size picker's largest (same aspect ratio). Each change is listed with the reason."""
    r = validated.request
    preset = book.presets[r.preset]
    lim = book.limits
    changes = list(validated.changes)
    fields: dict[str, Any] = {}

    def change(name: str, before: Any, after: Any, code: str, **values: Any) -> None:
        if before != after:
            changes.append(Change(name, before, after, f"kiosk_{code}", values))
            fields[name] = after

    change("steps", r.steps, preset.steps, "steps", preset=preset.name, steps=preset.steps)
    change("guidance", r.guidance, preset.guidance, "guidance", preset=preset.name, guidance=float(preset.guidance))
    change("batch", r.batch, lim.batch[0], "batch", images=Count(lim.batch[0], "images"))
    top = kiosk_pixels(book, demo=demo)
    if r.width * r.height > top:
        scale = math.sqrt(top / (r.width * r.height))
        step = lim.side_multiple
        for name, side in (("width", r.width), ("height", r.height)):
            change(name, side, max(lim.side[0], int(side * scale) // step * step), "pixels",
                   megapixels=round(top / 1e6, 1))
    if r.negative_prompt and preset.guidance == 0 and "guidance" in fields:
        change("negative_prompt", r.negative_prompt, "", "negative_ignored")
    if not fields:
        return validated
    return Validated(request=dataclasses.replace(r, **fields), changes=tuple(changes))
