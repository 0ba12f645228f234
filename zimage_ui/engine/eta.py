"""Running estimates of how long a job takes, from measured time per step (no hard-coded speeds).

:class:`StepTimer` learns from finished jobs, for jobs that have not started; :class:`JobPace` times the running
job's own steps, which is what its time left, and the queue behind it, should follow: the learnt average lags
behind a machine that just got faster (another process stopped using the GPU) or slower.

    >>> pace = JobPace()
    >>> pace.mark(1, 10.0); pace.mark(3, 11.0)
    >>> pace.seconds_per_step()
    0.5
    >>> pace.seconds_left(total_steps=8, now=11.2)
    2.3
"""

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

    def overhead_seconds(self, request: RunRequest) -> float:
        """The learnt fixed part of a job (prompt encode + decode) for ``request``'s size; 0 before any."""
        return (self._overhead_per_pixel or 0.0) * request.pixels * request.batch

    def job_seconds(self, request: RunRequest, steps_done: int = 0) -> float | None:
        per_step = self.step_seconds(request)
        if per_step is None:
            return None
        return per_step * max(request.steps - steps_done, 0) + self.overhead_seconds(request)


class JobPace:
    """When each step of one running job ended: its own seconds per step and its time left.

    The first step is not a measure (it starts after the prompt encode); from the second on, the pace is the
    mean over the steps seen, and the time left counts down between steps instead of waiting for the next one.
    """

    def __init__(self) -> None:
        self._first: tuple[int, float] | None = None
        self._last: tuple[int, float] | None = None
        self._lock = threading.Lock()

    def mark(self, step: int, now: float) -> None:
        """Step ``step`` (1-based) ended at ``now`` (``time.monotonic()``)."""
        if step < 1:
            return
        with self._lock:
            if self._first is None:
                self._first = (step, now)
            if self._last is None or step > self._last[0]:
                self._last = (step, now)

    def seconds_per_step(self) -> float | None:
        """Mean seconds per step since the first one ended; None until two steps have."""
        with self._lock:
            first, last = self._first, self._last
        if first is None or last is None or last[0] <= first[0]:
            return None
        return (last[1] - first[1]) / (last[0] - first[0])

    def seconds_left(self, total_steps: int, now: float) -> float | None:
        """Seconds until the last step ends, counted down from the last step's end; None until measured.

        A step that runs longer than the pace is taken to end now, not to have gone negative."""
        per_step = self.seconds_per_step()
        if per_step is None:
            return None
        with self._lock:
            step, at = self._last  # type: ignore[misc]  # set whenever per_step is
        remaining = max(total_steps - step, 0)
        if remaining == 0:
            return 0.0
        return round(max(per_step * remaining - (now - at), per_step * (remaining - 1)), 6)
