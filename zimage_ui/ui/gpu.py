"""The collapsible GPU panel: utilisation, clocks, temperature and power, each with a short rolling history.

One :class:`GpuHistory` per page (all tabs share it): a second tab must not double the sampling rate, so a reading
younger than ``min_interval_s`` is reused. The chart is an inline SVG polyline: no chart library, nothing fetched.

    >>> from zimage_ui.memory.nvml import GpuStats
    >>> h = GpuHistory(reader=lambda: GpuStats(0, "H100", "550", 80, 1, 97, 1980, 2619, 61, 512.0, 700.0))
    >>> h.sample(now=0.0).utilization_percent
    97
    >>> 'data-metric="temperature_c"' in render_gpu_panel(h, "en")
    True
"""

from __future__ import annotations

import collections
import html
import threading
import time
from collections.abc import Callable
from typing import Any

from .i18n import t

# (field of GpuStats, i18n key, unit, fixed upper bound of the chart or the field holding it)
METRICS: tuple[tuple[str, str, str, float | str | None], ...] = (
    ("utilization_percent", "gpu_util", "%", 100.0),
    ("sm_clock_mhz", "gpu_sm_clock", "MHz", None),
    ("memory_clock_mhz", "gpu_mem_clock", "MHz", None),
    ("temperature_c", "gpu_temp", "°C", 100.0),
    ("power_w", "gpu_power", "W", "power_limit_w"),
)


class GpuHistory:
    """The last ``size`` readings of ``reader()`` (``nvml.gpu_stats`` for one GPU; ``None`` = no GPU)."""

    def __init__(self, reader: Callable[[], Any], size: int = 60, min_interval_s: float = 0.5):
        self.reader = reader
        self.min_interval_s = min_interval_s
        self.samples: collections.deque[Any] = collections.deque(maxlen=size)
        self._last = -float("inf")
        self._lock = threading.Lock()
        self.available: bool | None = None  # None until the first reading

    def sample(self, now: float | None = None) -> Any:
        """Read the GPU unless a reading younger than ``min_interval_s`` exists; return the newest (or None)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._last < self.min_interval_s:
                return self.samples[-1] if self.samples else None
            self._last = now
        stats = self.reader()
        with self._lock:
            self.available = stats is not None
            if stats is not None:
                self.samples.append(stats)
        return stats

    def series(self, field: str) -> list[float]:
        with self._lock:
            return [float(v) for s in self.samples if (v := getattr(s, field, None)) is not None]


def _sparkline(values: list[float], top: float | None) -> str:
    """An inline SVG polyline of ``values`` scaled to ``top`` (or their own maximum)."""
    if len(values) < 2:
        return '<svg class="zg-spark" viewBox="0 0 100 24" preserveAspectRatio="none"></svg>'
    high = max(top or 0.0, max(values), 1e-9)
    step = 100.0 / (len(values) - 1)
    points = " ".join(f"{i * step:.1f},{24 - 22 * v / high:.1f}" for i, v in enumerate(values))
    return (f'<svg class="zg-spark" viewBox="0 0 100 24" preserveAspectRatio="none">'
            f'<polyline points="{points}" fill="none" vector-effect="non-scaling-stroke"/></svg>')


def _value_text(value: Any, unit: str) -> str:
    if value is None:
        return "—"
    return f"{value:.0f} {unit}" if isinstance(value, float) else f"{value} {unit}"


def render_gpu_panel(history: GpuHistory, lang: str) -> str:
    """Tiles for each metric (current value and its history), or a line saying there is no GPU."""
    latest = history.samples[-1] if history.samples else None
    if latest is None:
        return f'<div class="zg zg-none" data-gpu="none">{html.escape(t(lang, "gpu_none"))}</div>'
    name = html.escape(f"{latest.name or 'GPU'} #{latest.index}")
    driver = f" · driver {html.escape(latest.driver_version)}" if latest.driver_version else ""
    tiles = []
    for field, key, unit, top in METRICS:
        bound = getattr(latest, top) if isinstance(top, str) else top
        value = getattr(latest, field)
        tiles.append(f'<div class="zg-tile" data-metric="{field}">'
                     f'<div class="zg-name">{html.escape(t(lang, key))}</div>'
                     f'<div class="zg-value">{html.escape(_value_text(value, unit))}</div>'
                     f'{_sparkline(history.series(field), bound)}</div>')
    return (f'<div class="zg" data-gpu="{latest.index}"><div class="zg-head">{name}{driver}</div>'
            f'<div class="zg-tiles">{"".join(tiles)}</div>'
            f'<div class="zg-hint">{html.escape(t(lang, "gpu_hint"))}</div></div>')
