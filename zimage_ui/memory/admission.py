"""Admission: does a request's working memory fit next to the loaded model now? ``ok``, ``tight`` or ``over``.

A request runs when the worker is idle, so the previous job's working memory and the allocator's cache are
available to it. Hence ``available = total − weights − other − reserve``, where ``other`` (see
:mod:`.probe`) already holds our CUDA context and other processes, and ``reserve`` (CUDA: 256 MiB, CPU: 0) covers
what appears outside the caching allocator during a job (cuBLAS/cuDNN workspaces and kernel modules loaded
lazily on first use). Then ``ok``: need + margin ≤ available; ``tight``: need ≤ available < need + margin;
``over``: need > available. The need is the :mod:`.estimator`'s prediction.

An :class:`Admission` is numbers and a state; its :attr:`~Admission.message` is a code with those numbers, which
each door says in its language (``str()``: English).

    >>> from zimage_ui.memory.probe import MemorySnapshot
    >>> snap = MemorySnapshot(device_kind="cpu", device_name="cpu", label="CPU", total_bytes=8 * GiB,
    ...                       weights_bytes=2 * GiB, working_bytes=0, cache_bytes=0, other_bytes=1 * GiB,
    ...                       free_bytes=5 * GiB, peak_working_bytes=0)
    >>> a = admit(snap, need_bytes=6 * GiB, margin_bytes=GiB // 2)
    >>> a.state, a.message.code, str(a.message)
    ('over', 'admission.over', 'needs 6.0 GiB working memory, 5.0 GiB available — too large')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from zimage_ui.memory.estimator import (
    CUDA_RUNTIME_RESERVE_BYTES,
    DEFAULT_MARGIN_BYTES,
    GiB,
    WorkingMemoryEstimator,
    WorkShape,
)
from zimage_ui.memory.probe import MemorySnapshot
from zimage_ui.messages import Count, Message

__all__ = ["Admission", "AdmissionState", "GiB", "admit", "admit_request", "admit_shape", "available_bytes",
           "explain_cohost", "largest_fitting"]


class AdmissionState:
    """The three admission outcomes."""

    OK = "ok"
    TIGHT = "tight"
    OVER = "over"
    ALL = (OK, TIGHT, OVER)


@dataclass(frozen=True)
class Admission:
    """Whether a request's working memory fits next to the loaded model: the state and the figures that say why
    (:attr:`message` puts them in words)."""

    state: str
    need_bytes: int
    available_bytes: int
    margin_bytes: int
    suggestion: WorkShape | None = None
    decode_batch: int | None = None  # the VAE decodes this many images at a time (None: the whole batch)
    other_processes_bytes: int | None = None  # set when other processes leave too little for even the smallest
    smallest_side: int | None = None  # with other_processes_bytes: the smallest square (side²) does not fit either

    @property
    def message(self) -> Message:
        """Why, as a message code with these figures: ``admission.ok``, ``…tight``, ``…over``, ``…over_suggest``
        (names the largest shape that fits), ``…over_others`` (other processes hold the memory), ``…ok_chunked``
        and ``…tight_chunked`` (the VAE decodes fewer images per call)."""
        values: dict[str, Any] = {"need_bytes": self.need_bytes, "available_bytes": self.available_bytes,
                                  "margin_bytes": self.margin_bytes}
        code = self.state
        if self.state == AdmissionState.OVER:
            if self.other_processes_bytes:
                code = "over_others"
                values.update(other_processes_bytes=self.other_processes_bytes, side=self.smallest_side)
            elif self.suggestion is not None:
                code = "over_suggest"
                values.update(width=self.suggestion.width, height=self.suggestion.height)
        elif self.decode_batch is not None:
            code += "_chunked"
            values["images"] = Count(self.decode_batch, "images")
        return Message(f"admission.{code}", values)

    @property
    def runnable(self) -> bool:
        """True for ``ok`` and ``tight``."""
        return self.state != AdmissionState.OVER

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``suggestion`` as ``{"width", "height", "batch", "cfg"}`` or ``None``."""
        s = self.suggestion
        return {
            "state": self.state,
            "need_bytes": self.need_bytes,
            "available_bytes": self.available_bytes,
            "margin_bytes": self.margin_bytes,
            "message": str(self.message),
            "code": self.message.code,
            "suggestion": None if s is None else {"width": s.width, "height": s.height, "batch": s.batch, "cfg": s.cfg},
            "decode_batch": self.decode_batch,
            "other_processes_bytes": self.other_processes_bytes,
        }


def available_bytes(snapshot: MemorySnapshot, reserve_bytes: int | None = None) -> int:
    """Working memory a request can use once the worker is idle: ``total − weights − other − reserve`` (≥ 0)."""
    if reserve_bytes is None:
        reserve_bytes = CUDA_RUNTIME_RESERVE_BYTES if snapshot.device_kind == "cuda" else 0
    return max(0, snapshot.total_bytes - snapshot.weights_bytes - snapshot.other_bytes - reserve_bytes)


def admit(
    snapshot: MemorySnapshot,
    need_bytes: int,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
    reserve_bytes: int | None = None,
    suggestion: WorkShape | None = None,
) -> Admission:
    """Classify ``need_bytes`` against the snapshot's available memory: ``ok``, ``tight`` or ``over``.

    ``suggestion`` (say, from :func:`largest_fitting`) is named in the message when the state is ``over``.
    """
    available = available_bytes(snapshot, reserve_bytes)
    if need_bytes + margin_bytes <= available:
        state = AdmissionState.OK
    elif need_bytes <= available:
        state = AdmissionState.TIGHT
    else:
        state = AdmissionState.OVER
    if state != AdmissionState.OVER:
        suggestion = None
    return Admission(state, int(need_bytes), int(available), int(margin_bytes), suggestion)


def largest_fitting(
    estimator: WorkingMemoryEstimator,
    snapshot: MemorySnapshot,
    shape: WorkShape,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
    multiple: int = 16,
    min_side: int = 256,
    *,
    max_side: int = 2048,
    allow_tight: bool = False,
    reserve_bytes: int | None = None,
) -> WorkShape | None:
    """Largest shape with ``shape``'s aspect ratio, batch and CFG whose sides are multiples of ``multiple`` within
    ``[min_side, max_side]`` and whose admission is ``ok`` (or also ``tight`` with ``allow_tight``); ``None`` if
    even the smallest doesn't fit. The shorter side steps by ``multiple``; the longer one is rounded to the nearest
    multiple, so the aspect ratio is kept to within one ``multiple``.
    """
    accept = AdmissionState.ALL[:2] if allow_tight else (AdmissionState.OK,)
    short, long_ = sorted((shape.width, shape.height))
    ratio = long_ / short
    lowest = math.ceil(min_side / multiple) * multiple
    for side in range(max_side // multiple * multiple, lowest - 1, -multiple):
        other = max(multiple, round(side * ratio / multiple) * multiple)
        if other > max_side:
            continue
        w, h = (other, side) if shape.width >= shape.height else (side, other)
        candidate = replace(shape, width=w, height=h)
        if admit(snapshot, estimator.predict(candidate), margin_bytes, reserve_bytes).state in accept:
            return candidate
    return None


def admit_shape(
    estimator: WorkingMemoryEstimator,
    snapshot: MemorySnapshot,
    shape: WorkShape,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
    reserve_bytes: int | None = None,
) -> Admission:
    """``admit`` for a shape: predicts its need and, when it is ``over``, names the largest shape that fits."""
    need = estimator.predict(shape)
    first = admit(snapshot, need, margin_bytes, reserve_bytes)
    if first.state == AdmissionState.OK:
        return first
    # A batch whose decode is what does not fit can decode fewer images at a time: same images, less memory
    # (the decode is compute-bound, so it costs about the same time).
    for accept in ((AdmissionState.OK,), AdmissionState.ALL[:2]):
        for chunk in range(shape.batch - 1, 0, -1):
            chunked = admit(snapshot, estimator.predict_chunked(shape, chunk), margin_bytes, reserve_bytes)
            if chunked.state in accept and (first.state == AdmissionState.OVER or chunked.state == AdmissionState.OK):
                return replace(chunked, decode_batch=chunk)
    if first.state != AdmissionState.OVER:
        return first
    best = largest_fitting(estimator, snapshot, shape, margin_bytes, reserve_bytes=reserve_bytes)
    return admit(snapshot, need, margin_bytes, reserve_bytes, suggestion=best)


def explain_cohost(admission: Admission, estimator: WorkingMemoryEstimator, snapshot: MemorySnapshot,
                   min_side: int) -> Admission:
    """An ``over`` admission, when other processes leave too little for even the smallest request (``min_side``²):
    the same figures plus the others' use (``other_processes_bytes``, from NVML), and no size to suggest."""
    if admission.state != AdmissionState.OVER:
        return admission
    smallest = admit(snapshot, estimator.predict(WorkShape(min_side, min_side)), 0)
    others = (snapshot.nvml or {}).get("other_processes_bytes")
    if smallest.state != AdmissionState.OVER or not others:
        return admission
    return replace(admission, suggestion=None, other_processes_bytes=int(others), smallest_side=min_side)


def admit_request(estimator: WorkingMemoryEstimator, snapshot: MemorySnapshot, shape: WorkShape, margin_bytes: int,
                  min_side: int) -> Admission:
    """What the engine asks for every request: :func:`admit_shape`, then :func:`explain_cohost`."""
    return explain_cohost(admit_shape(estimator, snapshot, shape, margin_bytes), estimator, snapshot, min_side)
