"""Running estimates of how long a job takes, from measured time per step (no hard-coded speeds)."""

from __future__ import annotations

import threading

from ..validation import RunRequest


class StepTimer:
    """Seconds per step and fixed overhead (prompt encode + VAE decode), learnt per work size.

    Step time scales with transformer tokens × batch × (2 with CFG); we keep an exponential average of
    seconds per unit of that work, plus the fixed per-job overhead, and scale from the nearest size seen.
    """

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self._per_unit: float | None = None
        self._overhead_per_pixel: float | None = None
        self._lock = threading.Lock()

    @staticmethod
    def units(request: RunRequest) -> float:
        tokens = (request.width // 16) * (request.height // 16)
        return tokens * request.batch * (2 if request.cfg else 1)

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def record(self, request: RunRequest, step_seconds: float, overhead_seconds: float) -> None:
        with self._lock:
            self._per_unit = self._avg(self._per_unit, step_seconds / self.units(request))
            pixels = request.pixels * request.batch
            self._overhead_per_pixel = self._avg(self._overhead_per_pixel, max(overhead_seconds, 0.0) / pixels)

    @property
    def known(self) -> bool:
        return self._per_unit is not None

    def step_seconds(self, request: RunRequest) -> float | None:
        return None if self._per_unit is None else self._per_unit * self.units(request)

    def job_seconds(self, request: RunRequest, steps_done: int = 0) -> float | None:
        per_step = self.step_seconds(request)
        if per_step is None:
            return None
        overhead = (self._overhead_per_pixel or 0.0) * request.pixels * request.batch
        return per_step * max(request.steps - steps_done, 0) + overhead
