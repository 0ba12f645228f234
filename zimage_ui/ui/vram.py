"""The three-segment VRAM bar as HTML: a pure function of (snapshot, projected need, admission).

The engine measures (``zimage_ui.memory``); this module only draws. Everything it shows is in the markup as data
(``data-segment``, integer ``data-bytes``, ``data-state``) so tests and scripts read the same numbers a user sees.

    >>> from zimage_ui.memory.probe import MemorySnapshot
    >>> from zimage_ui.units import GiB
    >>> snap = MemorySnapshot("cuda", "H100", "GPU · VRAM", 80 * GiB, 20 * GiB, 0, 0, 2 * GiB, 58 * GiB, 0)
    >>> view = bar_view(snap, need_bytes=3 * GiB, state="ok")
    >>> [(s.name, round(s.percent, 1)) for s in view.segments]
    [('weights', 25.0), ('other', 2.5), ('working', 0.0), ('free', 72.5)]
    >>> round(view.projected_left, 1), round(view.projected_width, 2)
    (27.5, 3.75)

Drawing order is weights, other, working, cache, free (the snapshot's order is weights, working, cache, other,
free). A request runs when the worker is idle, so the running job's working memory, PyTorch's cache and the free
memory are what the next request can use (the estimator's admission counts them the same way): drawn side by side
at the right, they make one region, and the projected yellow block of the next request starts where it begins.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from .i18n import format_bytes, t

# Bar order (see the module docstring). weights, working and free are always drawn; cache and other only when > 0.
DRAW_ORDER = ("weights", "other", "working", "cache", "free")
ALWAYS_DRAWN = frozenset({"weights", "working", "free"})
STATES = ("ok", "tight", "over")


@dataclass(frozen=True)
class Segment:
    name: str
    bytes: int
    percent: float  # of the device total


@dataclass(frozen=True)
class BarView:
    """The numbers behind one drawing of the bar (tested without HTML)."""

    label: str
    device_name: str
    total_bytes: int
    used_bytes: int
    segments: tuple[Segment, ...]
    need_bytes: int | None
    state: str
    projected_left: float  # percent of the bar where the projected block starts
    projected_width: float  # percent of the bar it covers (clipped at the right end)


def bar_view(snapshot: Any, need_bytes: int | None, state: str) -> BarView:
    """Segment widths and the projected block's place for ``snapshot`` (a ``MemorySnapshot``)."""
    total = max(int(snapshot.total_bytes), 1)
    sizes = dict(snapshot.segments())
    segments = tuple(Segment(name, int(sizes.get(name, 0)), 100.0 * int(sizes.get(name, 0)) / total)
                     for name in DRAW_ORDER if name in ALWAYS_DRAWN or sizes.get(name, 0) > 0)
    fixed = sizes.get("weights", 0) + sizes.get("other", 0)
    left = 100.0 * fixed / total
    width = 0.0
    if need_bytes:
        width = min(100.0 * need_bytes / total, 100.0 - left)
    return BarView(label=snapshot.label, device_name=snapshot.device_name, total_bytes=int(snapshot.total_bytes),
                   used_bytes=int(snapshot.total_bytes) - int(sizes.get("free", 0)), segments=segments,
                   need_bytes=need_bytes, state=state if state in STATES else "ok", projected_left=left,
                   projected_width=max(width, 0.0))


def admission_message(admission: Any, largest: tuple[int, int, int] | None, lang: str) -> str:
    """What the line under the bar says about the current parameters, in ``lang``.

    ``largest`` is (width, height, batch) of the largest request of the same shape that fits, for the over state.
    """
    if admission is None:
        return t(lang, "state.unknown")
    need = format_bytes(admission.need_bytes)
    available = format_bytes(admission.available_bytes)
    if admission.state == "over":
        others = getattr(admission, "other_processes_bytes", None)
        if others:  # another program (an LLM server, say) leaves too little for even the smallest request
            return t(lang, "state.over_others", others=format_bytes(others), need=need, available=available)
        if largest is None:
            return t(lang, "state.over_none", need=need, available=available)
        return t(lang, "state.over", need=need, available=available, largest=shape_text(largest, lang))
    if admission.state == "tight":
        return t(lang, "state.tight", need=need, available=available, margin=format_bytes(admission.margin_bytes))
    return t(lang, "state.ok", need=need, available=available)


def shape_text(shape: tuple[int, int, int], lang: str) -> str:
    """``1024×768`` or ``1024×768 × 2`` (a batch of two)."""
    width, height, batch = shape
    key = "largest_shape_batch" if batch > 1 else "largest_shape"
    return t(lang, key, width=width, height=height, batch=batch)


COMPACT_FROM = 4  # more replicas than this: one thin bar each, no legend (the bar of the next request keeps it)


def render_vram_bar(snapshot: Any, *, need_bytes: int | None = None, admission: Any = None,
                    largest: tuple[int, int, int] | None = None, lang: str = "en", bar_id: str = "vram-bar",
                    title: str | None = None, replica: str | None = None, legend: bool = True) -> str:
    """The bar's HTML: head line, ``#vram-bar`` with one child per segment, legend with GiB figures, message.

    With several replicas (``render_vram_bars``) each bar has its own ``bar_id``, a ``title`` naming the replica
    (``data-replica``), and only the bar of the replica that takes the next request shows the projection."""
    esc = html.escape
    tag = f' data-replica="{esc(replica)}"' if replica is not None else ""
    if snapshot is None:
        head = f'<div class="zb-head"><span class="zb-label">{esc(title)}</span></div>' if title else ""
        return (f'<div class="zb">{head}<div id="{bar_id}" class="zb-bar" data-state="ok" data-total-bytes="0"'
                f'{tag}></div><div class="zb-msg">{esc(t(lang, "state.unknown"))}</div></div>')
    state = admission.state if admission is not None else "ok"
    view = bar_view(snapshot, need_bytes, state)
    used = t(lang, "bar_title_used", used=format_bytes(view.used_bytes), total=format_bytes(view.total_bytes))
    parts = [
        '<div class="zb">',
        '<div class="zb-head">',
        f'<span class="zb-label">{esc(title or view.label)}</span>',
        # "CPU" beside "CPU · RAM" says nothing; a GPU's name does
        f'<span class="zb-device">{esc("" if view.device_name in view.label else view.device_name)}</span>',
        f'<span class="zb-used">{esc(used)}</span>',
        '</div>',
        f'<div id="{bar_id}" class="zb-bar" data-state="{esc(view.state)}" data-total-bytes="{view.total_bytes}"'
        f' data-need-bytes="{int(need_bytes or 0)}"{tag} role="img" aria-label="{esc(_aria(view, lang))}">',
    ]
    for seg in view.segments:
        title = f"{t(lang, 'seg.' + seg.name)}: {format_bytes(seg.bytes)}"
        parts.append(f'<div class="zb-seg" data-segment="{seg.name}" data-bytes="{seg.bytes}"'
                     f' style="width:{seg.percent:.4f}%" title="{esc(title)}"></div>')
    if need_bytes:
        title = f"{t(lang, 'seg.projected')}: {t(lang, 'bar_need', need=format_bytes(need_bytes))}"
        parts.append(f'<div class="zb-projected" data-projected-bytes="{int(need_bytes)}"'
                     f' style="left:{view.projected_left:.4f}%;width:{view.projected_width:.4f}%"'
                     f' title="{esc(title)}"></div>')
    parts.append('</div>')
    if not legend:
        if admission is not None or replica is None:
            parts.append(f'<div class="zb-msg" data-state="{esc(view.state)}">'
                         f'{esc(admission_message(admission, largest, lang))}</div>')
        parts.append('</div>')
        return "".join(parts)
    parts.append('<div class="zb-legend">')
    for seg in view.segments:
        parts.append(f'<span class="zb-key" data-key="{seg.name}"><i class="zb-swatch"></i>'
                     f'{esc(t(lang, "seg." + seg.name))} <b>{esc(format_bytes(seg.bytes))}</b></span>')
    if need_bytes:
        parts.append(f'<span class="zb-key" data-key="projected"><i class="zb-swatch"></i>'
                     f'{esc(t(lang, "seg.projected"))} <b>≈ {esc(format_bytes(need_bytes))}</b></span>')
    parts.append('</div>')
    parts.append(f'<div class="zb-msg" data-state="{esc(view.state)}">'
                 f'{esc(admission_message(admission, largest, lang))}</div>')
    parts.append('</div>')
    return "".join(parts)


def _aria(view: BarView, lang: str) -> str:
    return "; ".join(f"{t(lang, 'seg.' + s.name)} {format_bytes(s.bytes)}" for s in view.segments)


def render_vram_bars(replicas: list[dict[str, Any]], *, target: str | None, need_bytes: int | None = None,
                     admission: Any = None, largest: tuple[int, int, int] | None = None, lang: str = "en") -> str:
    """One bar per replica (``EngineAPI.replicas()``), in a ``.zb-multi`` block; compact (thin, no
    legend) when there are more than ``COMPACT_FROM``. The bar of ``target``, the replica that would take the
    request, is ``#vram-bar`` and carries the projection and the admission message.

    >>> from zimage_ui.memory.probe import MemorySnapshot
    >>> snap = MemorySnapshot("cuda", "H200", "GPU · VRAM", 100, 20, 0, 0, 0, 80, 0).to_dict()
    >>> page = render_vram_bars([{"replica": "a", "host": "h", "gpu": "0", "snapshot": snap},
    ...                          {"replica": "b", "host": "h", "gpu": "1", "snapshot": snap}], target="b")
    >>> page.count('data-replica='), 'id="vram-bar" class="zb-bar" data-state="ok" data-total-bytes="100"' in page
    (2, True)
    """
    from ..memory.probe import MemorySnapshot

    compact = len(replicas) > COMPACT_FROM
    parts = [f'<div class="zb-multi{" zb-compact" if compact else ""}" data-replicas="{len(replicas)}">']
    for index, r in enumerate(replicas):
        mine = r.get("replica") == target
        snapshot = MemorySnapshot.from_dict(r["snapshot"]) if r.get("snapshot") else None
        title = t(lang, "replica_label", replica=r.get("replica"), host=r.get("host"), gpu=r.get("gpu"))
        if not r.get("ready"):
            title += " — " + t(lang, "replica_loading", state=r.get("state"))
        elif mine:
            title += " — " + t(lang, "replica_takes")
        parts.append(render_vram_bar(snapshot, need_bytes=need_bytes if mine else None,
                                     admission=admission if mine else None, largest=largest if mine else None,
                                     lang=lang, bar_id="vram-bar" if mine else f"vram-bar-{index}", title=title,
                                     replica=str(r.get("replica")), legend=mine or not compact))
    parts.append('</div>')
    return "".join(parts)
