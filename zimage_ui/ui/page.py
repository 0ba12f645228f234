"""The Gradio page: widgets, their events, and the handlers that turn widget values into engine calls.

A thin adapter: every request goes ``engine.validate`` → ``engine.submit``; memory comes from
``engine.memory_snapshot`` / ``engine.admit``; the page never touches the pipeline. Handlers take the widgets'
values as one dict (``inputs=set``) and build one :class:`GenerationRequest` from it, never a positional list.

Events and the queue:

* parameter edits (``.input``: user edits only, so our own value updates do not echo back), the VRAM timer, the
  language switch, Cancel and the pre-queue check run with ``queue=False``: they never wait behind a generation;
* Generate runs in Gradio's queue with a concurrency limit of ``max_queue + 1`` so that a second tab's job reaches
  the engine's queue at once and shows its real position and ETA (the engine's worker is the one serial queue).
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from ..engine.jobs import ClientBusy, EngineError, Job, JobState, MemoryRefused, NotReady, QueueFull
from ..limits import Client, DoorLimits
from ..messages import word
from ..models.shapes_world import EXAMPLE_PROMPTS
from ..paths import ASSETS_DIR
from ..sizes import SizeTable, load_sizes
from ..validation import GenerationRequest, RequestError, RunRequest, Validated
from .gpu import GpuHistory, render_gpu_panel
from .i18n import LANGUAGES, format_bytes, format_seconds, pick_language, render, strings, t
from .vram import render_vram_bar, render_vram_bars

if TYPE_CHECKING:
    from ..engine.api import EngineAPI

log = logging.getLogger(__name__)

CSS_FILE = ASSETS_DIR / "ui.css"
PROMPT_PLACEHOLDER = "x"  # stands in for an empty prompt when only the memory projection is wanted
POLL_S = 0.5  # longest wait between status updates when the job reports nothing (queue ETA counts down)


# The named API endpoints' arguments (check, generate), in order, and the widget each one comes from.
PARAM_NAMES = ("lang", "prompt", "negative_prompt", "preset", "steps", "guidance", "width", "height", "seed",
               "random_seed", "batch")
PARAM_WIDGETS = ("lang", "prompt", "negative", "preset", "steps", "guidance", "width", "height", "seed",
                 "random_seed", "batch")


@dataclass
class Widgets:
    """The page's components, by role (handlers read values and address updates through these)."""

    lang: Any
    title: Any
    banner: Any
    vram: Any
    prompt: Any
    negative: Any
    preset: Any
    preset_info: Any
    aspect: Any
    size_class: Any
    size_readout: Any
    advanced: Any
    steps: Any
    guidance: Any
    width: Any
    height: Any
    seed: Any
    random_seed: Any
    batch: Any
    generate: Any
    cancel: Any
    notice: Any
    status: Any
    gallery: Any
    gallery_state: Any
    gpu_accordion: Any
    gpu: Any
    ready_seen: Any
    last_active: Any
    examples: Any = None  # the trained demo model's example prompts (hidden otherwise)

    def params(self) -> set[Any]:
        """The widgets a request is built from (plus the language, which every text needs)."""
        return set(self.param_list())

    def param_list(self) -> list[Any]:
        """The same widgets in the order of :data:`PARAM_NAMES` (the named API endpoints' arguments)."""
        return [getattr(self, attr) for attr in PARAM_WIDGETS]

    def pack(self, args: tuple[Any, ...]) -> dict[Any, Any]:
        """Positional values in :data:`PARAM_NAMES` order → the ``{widget: value}`` dict handlers read."""
        return dict(zip(self.param_list(), args, strict=True))


class Page:
    """One page (Blocks) over one engine; every browser tab is a session of it."""

    def __init__(self, engine: EngineAPI, settings: Any, limits: DoorLimits | None = None):
        self.engine = engine
        self.settings = settings
        # shared with the REST API when the service mounts the page: one client, one count, whichever door
        self.limits = limits or DoorLimits(settings)
        self._session_jobs: dict[str, set[Job]] = {}  # what Cancel and a closed tab stop: this tab's jobs
        self._session_lock = threading.Lock()
        self.sizes: SizeTable = load_sizes()
        self.kiosk = bool(getattr(settings, "kiosk", False))
        self.gallery_max = int(getattr(settings, "ui_gallery_max", 24))
        self.kiosk_idle_s = float(getattr(settings, "kiosk_idle_seconds", 120.0))
        self.gpu_history = GpuHistory(self._read_gpu, min_interval_s=max(0.2, settings.vram_poll_seconds * 0.8))
        self._scratch: Path | None = None
        self._scratch_lock = threading.Lock()
        self.w: Widgets | None = None

    # --- facts from the engine ------------------------------------------------------------------------------------
    def _read_gpu(self) -> Any:
        return self.engine.gpu_stats()

    def _knows_shapes(self) -> bool:
        """Whether the loaded model is the trained demo model (it draws the shapes world's prompts)."""
        return bool(self.engine.model_info().get("trained_demo"))

    def _is_demo(self) -> bool:
        return bool(self.engine.model_info().get("is_demo"))

    def _default_preset(self) -> Any:
        book = self.engine.presets()
        return book.presets[book.default]

    def _preset(self, name: str | None) -> Any:
        book = self.engine.presets()
        return book.presets.get(name or "", book.presets[book.default])

    def _class_choices(self) -> list[str]:
        limit = self.engine.presets().limits.side[1]
        return self.sizes.classes(demo=self._is_demo(), max_side=limit)

    # --- request building -----------------------------------------------------------------------------------------
    def raw_request(self, values: dict[Any, Any], **override: Any) -> GenerationRequest:
        """The request the widgets describe; ``override`` replaces fields (values a handler is about to set)."""
        w = self.w
        fields = dict(prompt=values.get(w.prompt), negative_prompt=values.get(w.negative),
                      preset=values.get(w.preset), steps=values.get(w.steps), guidance=values.get(w.guidance),
                      width=values.get(w.width), height=values.get(w.height),
                      seed=None if values.get(w.random_seed) else values.get(w.seed), batch=values.get(w.batch))
        fields.update(override)
        return GenerationRequest(**fields)

    def _for_projection(self, raw: GenerationRequest) -> Validated | None:
        """Validate for the bar: memory does not depend on the prompt, so an empty one is stood in for."""
        if not (isinstance(raw.prompt, str) and raw.prompt.strip()):
            raw = GenerationRequest(**{**raw.__dict__, "prompt": PROMPT_PLACEHOLDER})
        try:
            return self.engine.validate(raw)
        except RequestError:
            return None

    # --- the bar, the notice, the button --------------------------------------------------------------------------
    def projection(self, request: RunRequest | None, lang: str) -> tuple[str, bool]:
        """(bar HTML, Generate enabled) for ``request`` against the memory now."""
        replicas = self.engine.replicas()  # Ray Serve replicas: one bar each (one engine here: one bar)
        if len(replicas) > 1:
            return self._replica_bars(replicas, request, lang)
        if not self.engine.ready:
            snapshot = self._snapshot()
            return render_vram_bar(snapshot, lang=lang), False
        snapshot = self._snapshot()
        if request is None:
            return render_vram_bar(snapshot, lang=lang), True
        need = int(self.engine.predict_working_bytes(request))
        admission = self.engine.admit(request)
        suggestion = getattr(admission, "suggestion", None)
        largest = (suggestion.width, suggestion.height, suggestion.batch) if suggestion is not None else None
        html = render_vram_bar(snapshot, need_bytes=need, admission=admission, largest=largest, lang=lang)
        return html, admission.state != "over"

    def _replica_bars(self, replicas: list[dict[str, Any]], request: RunRequest | None,
                      lang: str) -> tuple[str, bool]:
        """One bar per replica; the projection on the bar of the replica that would take ``request``."""
        if not self.engine.ready or request is None:
            return render_vram_bars(replicas, target=self.engine.target_replica(), lang=lang), self.engine.ready
        need = int(self.engine.predict_working_bytes(request))
        admission = self.engine.admit(request)
        suggestion = getattr(admission, "suggestion", None)
        largest = (suggestion.width, suggestion.height, suggestion.batch) if suggestion is not None else None
        html = render_vram_bars(replicas, target=self.engine.target_replica(need), need_bytes=need,
                                admission=admission, largest=largest, lang=lang)
        return html, admission.state != "over"

    def _snapshot(self) -> Any:
        try:
            return self.engine.memory_snapshot()
        except NotReady:  # nothing loaded yet: the bar says "not available"
            return None
        except Exception:  # a failed reading must not break the page; the bar says "not available"
            log.exception("memory snapshot failed")
            return None

    def notice(self, validated: Validated | None, lang: str, *, applied: bool) -> str:
        """Markdown listing what the validator changes (seed draws aside) and how the preset will run."""
        if validated is None:
            return ""
        lines = [render(c.message, lang) for c in validated.changes if not c.is_seed_draw]
        if self.engine.ready:
            lines += [render(note, lang) for note in self.engine.notes_for(validated.request)]
        if not lines:
            return ""
        title = t(lang, "clamped_title" if applied else "clamp_preview_title")
        return f"**{title}**\n" + "\n".join(f"- {line}" for line in lines)

    # --- handlers: parameters -------------------------------------------------------------------------------------
    def on_params(self, values: dict[Any, Any]) -> dict[Any, Any]:
        """A parameter was edited: redraw the bar, say what would be clamped, enable or disable Generate."""
        return self._refresh(values, self.raw_request(values))

    def _refresh(self, values: dict[Any, Any], raw: GenerationRequest,
                 extra: dict[Any, Any] | None = None) -> dict[Any, Any]:
        w, lang = self.w, values.get(self.w.lang) or "en"
        validated = self._for_projection(raw)
        bar, enabled = self.projection(validated.request if validated else None, lang)
        guidance = validated.request.guidance if validated else 0.0
        out = {w.vram: bar, w.generate: gr.update(interactive=enabled),
               w.notice: notice_update(self.notice(validated, lang, applied=False)),
               w.negative: gr.update(visible=guidance > 0)}
        merge_updates(out, extra or {})
        return out

    def on_preset(self, values: dict[Any, Any]) -> dict[Any, Any]:
        """A preset was chosen: fill its steps and guidance (size stays the user's), then refresh."""
        w, lang = self.w, values.get(self.w.lang) or "en"
        preset = self._preset(values.get(w.preset))
        raw = self.raw_request(values, steps=preset.steps, guidance=preset.guidance)
        return self._refresh(values, raw, {w.steps: preset.steps, w.guidance: preset.guidance,
                                             w.preset_info: self.preset_info(preset.name, lang)})

    def on_size(self, values: dict[Any, Any]) -> dict[Any, Any]:
        """The aspect ratio or size class changed: set width and height from the table, then refresh."""
        w, lang = self.w, values.get(self.w.lang) or "en"
        size_class, ratio = values.get(w.size_class), values.get(w.aspect)
        if size_class not in self.sizes.sizes or ratio not in self.sizes.ratios:
            return self.on_params(values)
        width, height = self.sizes.size(size_class, ratio)
        raw = self.raw_request(values, width=width, height=height)
        return self._refresh(values, raw, {w.width: width, w.height: height,
                                             w.size_readout: self.size_readout(width, height, lang)})

    def on_dimensions(self, values: dict[Any, Any]) -> dict[Any, Any]:
        """Width or height typed in Advanced: update the size readout and the picker (when it is a table size)."""
        w, lang = self.w, values.get(self.w.lang) or "en"
        width, height = values.get(w.width), values.get(w.height)
        extra: dict[Any, Any] = {w.size_readout: self.size_readout(width, height, lang)}
        found = self.sizes.find(int(width or 0), int(height or 0))
        if found:
            extra[w.size_class], extra[w.aspect] = found
        return self._refresh(values, self.raw_request(values), extra)

    def preset_info(self, name: str, lang: str) -> str:
        preset = self._preset(name)
        return t(lang, f"preset_info.{preset.name}", steps=preset.steps, guidance=f"{preset.guidance:g}")

    @staticmethod
    def size_readout(width: Any, height: Any, lang: str) -> str:
        try:
            return t(lang, "size_readout", width=int(width), height=int(height))
        except (TypeError, ValueError):
            return ""

    # --- handlers: timer, load, language --------------------------------------------------------------------------
    def on_tick(self, values: dict[Any, Any]) -> dict[Any, Any]:
        """Every ``vram_poll_seconds``: the bar, the GPU panel, Generate's state; the first tick after the model is
        ready also fills in what depends on it (model line, demo banner, size classes)."""
        w, lang = self.w, values.get(self.w.lang) or "en"
        validated = self._for_projection(self.raw_request(values))
        bar, enabled = self.projection(validated.request if validated else None, lang)
        self.gpu_history.sample()
        out: dict[Any, Any] = {w.vram: bar, w.generate: gr.update(interactive=enabled),
                               w.gpu: render_gpu_panel(self.gpu_history, lang)}
        if self.engine.ready and values.get(w.ready_seen) is False:
            # the tab opened while the model was loading (its load handler said so): fill in what depends on it
            # and say it is ready. Not while the load handler's answer is still on its way (None): a tick sent
            # then would reset a size the user picked in the meantime to the default.
            merge_updates(out, self.model_updates(lang, fill_size=True))
            out[w.status] = self.idle_status(lang)
        elif not self.engine.ready:
            out[w.title] = self.title_html(lang)
            out[w.status] = self.idle_status(lang)
        return out

    def on_load(self, values: dict[Any, Any], request: gr.Request) -> dict[Any, Any]:
        """A tab opened: pick its language, fill in model facts, draw the bar."""
        w = self.w
        accept = request.headers.get("accept-language") if request is not None else None
        lang = pick_language(getattr(self.settings, "language", "auto"), accept)
        values = {**values, w.lang: lang}
        out = self.language_updates(lang, values)
        merge_updates(out, {w.lang: lang})
        if self.engine.ready:
            merge_updates(out, self.model_updates(lang, fill_size=True))
            preset = self._default_preset()
            values.update({w.width: preset.width, w.height: preset.height})
        else:
            out[w.ready_seen] = False  # the first tick after the model is ready fills in the rest
        merge_updates(out, self.on_tick(values))
        out[w.status] = self.idle_status(lang)
        return out

    def on_language(self, values: dict[Any, Any]) -> dict[Any, Any]:
        """The language switch: relabel everything, redraw the texts built on the server."""
        lang = values.get(self.w.lang) or "en"
        out = self.language_updates(lang, values)
        merge_updates(out, self._refresh(values, self.raw_request(values)))
        out[self.w.status] = self.idle_status(lang)
        return out

    def idle_status(self, lang: str) -> str:
        if self.engine.ready:
            return t(lang, "status_idle")
        return t(lang, "status_not_ready", reason=self.reason_text(lang))

    def reason_text(self, lang: str) -> str:
        """Why the engine is not ready, in ``lang``: its state in words (loading, warming up, …), or the failure's
        own text."""
        state = getattr(self.engine.state, "value", str(self.engine.state))
        if state in ("new", "loading", "warming", "stopped"):
            return word(lang, state)
        return self.engine.reason

    def title_html(self, lang: str) -> str:
        """Title, subtitle and the model line (model, device, dtype; or why it is not ready)."""
        info = self.engine.model_info()
        if self.engine.ready:
            label = info.get("label") or ""
            if info.get("is_demo"):  # the demo model's name in the page's language (a real model's is a name)
                label = t(lang, "model.demo_trained" if info.get("trained_demo") else "model.demo_untrained")
            model = t(lang, "model_line", model=label, device=info.get("device") or "", dtype=info.get("dtype") or "")
        elif getattr(self.engine.state, "value", "") == "failed":
            model = t(lang, "model_failed", reason=self.engine.reason)
        else:
            model = t(lang, "model_loading", reason=self.reason_text(lang))
        import html as _html

        return (f'<div><h1>{_html.escape(t(lang, "title"))}</h1>'
                f'<div class="zi-sub">{_html.escape(t(lang, "subtitle"))}</div>'
                f'<div id="zi-model">{_html.escape(model)}</div></div>')

    def banner_update(self, lang: str) -> Any:
        if not self._is_demo():
            return gr.update(visible=False)
        text = f"**{t(lang, 'demo_title')}** — {t(lang, 'demo_text_trained' if self._knows_shapes() else 'demo_text')}"
        return gr.update(value=text, visible=True)

    def model_updates(self, lang: str, *, fill_size: bool) -> dict[Any, Any]:
        """What depends on the loaded model: title, banner, size classes and (once per tab) the default size."""
        w = self.w
        out: dict[Any, Any] = {w.title: self.title_html(lang), w.banner: self.banner_update(lang),
                               w.ready_seen: True, w.examples: gr.update(visible=self._knows_shapes())}
        classes = self._class_choices()
        out[w.size_class] = gr.update(choices=classes)
        if fill_size:
            preset = self._default_preset()
            found = self.sizes.find(preset.width, preset.height)
            out[w.width], out[w.height] = preset.width, preset.height
            out[w.size_readout] = self.size_readout(preset.width, preset.height, lang)
            # a size of no class (the demo model's 256²) leaves none chosen, not the class the page was drawn with
            out[w.size_class] = gr.update(choices=classes, value=found[0] if found else None)
            if found:
                out[w.aspect] = found[1]
        return out

    def language_updates(self, lang: str, values: dict[Any, Any]) -> dict[Any, Any]:
        """Every label, placeholder, button and explanatory line in ``lang`` (``values``: the widgets' values)."""
        w = self.w
        book = self.engine.presets()
        return {
            w.preset_info: self.preset_info(values.get(w.preset), lang),
            w.size_readout: self.size_readout(values.get(w.width), values.get(w.height), lang),
            w.title: self.title_html(lang),
            w.banner: self.banner_update(lang),
            w.lang: gr.update(label=t(lang, "language_label")),
            w.prompt: gr.update(label=t(lang, "prompt_label"), placeholder=t(lang, "prompt_placeholder")),
            w.negative: gr.update(label=t(lang, "negative_label"), placeholder=t(lang, "negative_placeholder")),
            w.preset: gr.update(label=t(lang, "preset_label"),
                                choices=[(t(lang, f"preset.{n}") if f"preset.{n}" in strings(lang) else p.label, n)
                                         for n, p in book.presets.items()]),
            w.aspect: gr.update(label=t(lang, "aspect_label")),
            w.size_class: gr.update(label=t(lang, "class_label")),
            w.advanced: gr.update(label=t(lang, "advanced_label")),
            w.steps: gr.update(label=t(lang, "steps_label")),
            w.guidance: gr.update(label=t(lang, "guidance_label")),
            w.width: gr.update(label=t(lang, "width_label")),
            w.height: gr.update(label=t(lang, "height_label")),
            w.seed: gr.update(label=t(lang, "seed_label")),
            w.random_seed: gr.update(label=t(lang, "random_seed_label")),
            w.batch: gr.update(label=t(lang, "batch_label")),
            w.generate: gr.update(value=t(lang, "generate")),
            w.cancel: gr.update(value=t(lang, "cancel")),
            w.gallery: gr.update(label=t(lang, "gallery_label")),
            w.gpu_accordion: gr.update(label=t(lang, "gpu_title")),
            w.gpu: render_gpu_panel(self.gpu_history, lang),
            w.notice: notice_update(self.notice(self._for_projection(self.raw_request(values)), lang,
                                                applied=False)),
        }

    # --- handlers: generate, cancel, unload -----------------------------------------------------------------------
    def _checked(self, values: dict[Any, Any], lang: str) -> Validated | str:
        """The request as it will run, or why it can't run, in ``lang``."""
        try:
            return self.limits.shape(self.engine.validate(self.raw_request(values)), self.engine)
        except RequestError as exc:
            return t(lang, "invalid", errors=exc.render(lang))
        except Exception as exc:  # not ready yet: the tokenizer-less validator can't be reached
            return self.refusal_text(exc, lang)

    def on_check_failed(self, values: dict[Any, Any]) -> dict[Any, Any]:
        """The check refused the request: say why on the status line (the browser shows no toast for an error of
        an unqueued event)."""
        checked = self._checked(values, values.get(self.w.lang) or "en")
        return {self.w.status: checked} if isinstance(checked, str) else {}

    def on_check(self, values: dict[Any, Any]) -> dict[Any, Any]:
        """Before queueing (``queue=False``): validate, write the clamped values back, say what changed.

        A request that can't run at all stops here with an error (for gradio_client, an exception; on the page,
        :meth:`on_check_failed` then puts it on the status line), so it never enters a queue.
        """
        w, lang = self.w, values.get(self.w.lang) or "en"
        validated = self._checked(values, lang)
        if isinstance(validated, str):
            raise gr.Error(validated)
        r = validated.request
        out: dict[Any, Any] = {w.notice: notice_update(self.notice(validated, lang, applied=True)), w.steps: r.steps,
                               w.guidance: r.guidance, w.width: r.width, w.height: r.height, w.batch: r.batch,
                               w.size_readout: self.size_readout(r.width, r.height, lang)}
        if not values.get(w.random_seed):
            out[w.seed] = r.seed
        return out

    def refusal_text(self, exc: BaseException, lang: str) -> str:
        """An engine refusal in ``lang``: not ready (with the state in words), or the refusal's own message."""
        if isinstance(exc, NotReady) or not isinstance(exc, EngineError):
            return t(lang, "status_not_ready", reason=self.reason_text(lang))
        return render(exc.message, lang) if exc.message is not None else str(exc)

    def on_generate(self, values: dict[Any, Any], request: gr.Request) -> Iterator[dict[Any, Any]]:
        """Submit to the engine as this session and stream its queue position, steps, then the images."""
        w, lang = self.w, values.get(self.w.lang) or "en"
        session = request.session_hash if request is not None else None
        client = client_of(request)
        owner = self.limits.owner(client, alone=session) if session else None
        history = list(values.get(w.gallery_state) or [])
        try:
            validated = self.limits.shape(self.engine.validate(self.raw_request(values)), self.engine)
        except RequestError as exc:
            yield from refuse(w, t(lang, "invalid", errors=exc.render(lang)))
        except EngineError as exc:
            yield from refuse(w, self.refusal_text(exc, lang))
        first: dict[Any, Any] = {w.status: t(lang, "status_submitting"), w.last_active: time.monotonic()}
        note = self.notice(validated, lang, applied=True)
        if note:
            first[w.notice] = notice_update(note)
        if (wait_s := self.limits.hit(client)) is not None:
            yield from refuse(w, t(lang, "rate_limited", n=self.limits.per_minute, retry=f"{math.ceil(wait_s)}"))
        try:
            job = self.engine.submit(validated, owner=owner)
        except ClientBusy:
            yield from refuse(w, t(lang, "busy"))
        except QueueFull as exc:
            yield from refuse(w, t(lang, "queue_full", depth=exc.depth, retry=f"{exc.retry_after_s:.0f}"))
        except MemoryRefused as exc:
            yield from refuse(w, t(lang, "memory_refused", message=render(exc.admission.message, lang)))
        except EngineError as exc:
            yield from refuse(w, self.refusal_text(exc, lang))
        changed = threading.Event()
        job.on_change(lambda _job: changed.set())
        self._track(session, job)
        try:
            yield first
            while not job.done:
                # Yield at least every POLL_S, changed or not: Gradio notices a tab whose stream has gone only
                # between two items, and closes this generator then (its ``finally`` cancels the job). Waiting
                # in here for the text to change kept a closed tab's job alive for as long as a step, or for
                # ever for a queued job whose line stays the same.
                yield {w.status: self.progress_text(self.engine.status(job), lang)}
                changed.wait(POLL_S)
                changed.clear()
            final = self.finished(job, history, lang)
            if note:  # repeated in the last update, which is all a client that only waits for the result sees
                final[w.notice] = notice_update(note)
            yield final
        finally:
            # the tab went away mid-run (Gradio closed the generator): don't leave the GPU working for nobody
            if not job.done:
                self.engine.cancel(job)
            self._untrack(session, job)

    def _track(self, session: str | None, job: Job) -> None:
        if session:
            with self._session_lock:
                self._session_jobs.setdefault(session, set()).add(job)

    def _untrack(self, session: str | None, job: Job) -> None:
        with self._session_lock:
            jobs = self._session_jobs.get(session or "")
            if jobs is not None:
                jobs.discard(job)
                if not jobs:
                    del self._session_jobs[session]

    def cancel_session(self, session: str) -> int:
        """Cancel this tab's jobs (not the other tabs' of the same client); returns how many were active."""
        with self._session_lock:
            jobs = [j for j in self._session_jobs.get(session, ()) if not j.done]
        for job in jobs:
            self.engine.cancel(job)
        return len(jobs)

    def progress_text(self, status: Any, lang: str) -> str:
        """Queue position and ETA, or step i/n and time left (decoding after the last step)."""
        if status.state == JobState.QUEUED:
            if status.eta_s is None:
                return t(lang, "status_queued", position=status.position)
            return t(lang, "status_queued_eta", position=status.position, eta=format_seconds(status.eta_s, lang))
        if status.state == JobState.RUNNING:
            if status.step == 0:
                return t(lang, "status_starting")
            if status.step >= status.total_steps:
                return t(lang, "status_decoding")
            if status.eta_s is None:
                return t(lang, "status_running", step=status.step, total=status.total_steps)
            return t(lang, "status_running_eta", step=status.step, total=status.total_steps,
                     eta=format_seconds(status.eta_s, lang))
        return ""

    def finished(self, job: Any, history: list, lang: str) -> dict[Any, Any]:
        """The last update of a run: images into the gallery and the summary line, or why there are none."""
        w = self.w
        out: dict[Any, Any] = {w.last_active: time.monotonic()}
        if job.state == JobState.CANCELLED:
            out[w.status] = t(lang, "status_cancelled")
            return out
        if job.state != JobState.DONE or job.result is None:
            kind = getattr(job.error, "kind", "error")
            error = job.error
            said = render(error.message, lang) if isinstance(error, EngineError) and error.message else str(error)
            out[w.status] = t(lang, "status_oom" if kind == "oom" else "status_failed", error=said)
            return out
        result = job.result
        r = result.request
        paths = result.paths or self._write_scratch(job, result)
        items = [(str(p), f"seed {seed}") for p, seed in zip(paths, result.seeds, strict=False)]
        history = (items + history)[: self.gallery_max]
        count = t(lang, "images_one") if len(items) == 1 else t(lang, "images_many", n=len(items))
        out[w.status] = t(lang, "status_done", count=count, width=r.width, height=r.height, steps=r.steps,
                          seed=r.seed, seconds=format_seconds(result.timings.get("total_s", 0.0), lang),
                          peak=format_bytes(result.peak_working_bytes))
        out[w.gallery] = history
        out[w.gallery_state] = history
        out[w.seed] = r.seed
        return out

    def _write_scratch(self, job: Any, result: Any) -> list[Path]:
        """With ``save_images`` off the engine writes nothing; the gallery still needs files (with metadata, so a
        download carries its parameters), kept in one temporary folder per page."""
        from ..metadata import save_png

        with self._scratch_lock:
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="zimage-ui-gallery-"))
        return [save_png(image, self._scratch / f"{job.id}-{seed}.png", result.request, seed=seed,
                         model=result.model_id, extra={"timings": result.timings})
                for image, seed in zip(result.images, result.seeds, strict=True)]

    # Named endpoints for gradio_client users (and tests): the same handlers, with real parameter names.
    def api_check(self, lang: str, prompt: str, negative_prompt: str, preset: str, steps: float | None,
                  guidance: float | None, width: float | None, height: float | None, seed: float | None,
                  random_seed: bool, batch: float) -> dict[Any, Any]:
        """Validate without queueing; returns the notice and the clamped values."""
        return self.on_check(self.w.pack((lang, prompt, negative_prompt, preset, steps, guidance, width, height,
                                          seed, random_seed, batch)))

    def api_generate(self, lang: str, prompt: str, negative_prompt: str, preset: str, steps: float | None,
                     guidance: float | None, width: float | None, height: float | None, seed: float | None,
                     random_seed: bool, batch: float, gallery: list, request: gr.Request) -> Iterator[dict[Any, Any]]:
        """Generate as this session: streams status, then the gallery (newest first), the seed and the notice."""
        values = self.w.pack((lang, prompt, negative_prompt, preset, steps, guidance, width, height, seed,
                              random_seed, batch))
        values[self.w.gallery_state] = gallery
        yield from self.on_generate(values, request)

    def api_cancel(self, lang: str, request: gr.Request) -> dict[Any, Any]:
        """Cancel this session's jobs."""
        return self.on_cancel({self.w.lang: lang}, request)

    def on_cancel(self, values: dict[Any, Any], request: gr.Request) -> dict[Any, Any]:
        """Cancel this session's jobs: a queued one leaves the queue now, a running one stops at its next step."""
        lang = values.get(self.w.lang) or "en"
        session = request.session_hash if request is not None else None
        count = self.cancel_session(session) if session else 0
        return {self.w.status: t(lang, "status_cancelling" if count else "status_nothing_to_cancel")}

    def on_unload(self, request: gr.Request) -> None:
        """The tab closed: its jobs are nobody's any more."""
        if request is not None and request.session_hash:
            count = self.cancel_session(request.session_hash)
            if count:
                log.info("tab closed: cancelled %d job(s) of session %s", count, request.session_hash[:8])

    def on_kiosk_tick(self, values: dict[Any, Any]) -> dict[Any, Any]:
        """Kiosk: after ``kiosk_idle_seconds`` without activity, clear the images and the prompt for the next
        visitor (the gallery is this session's; nothing else is kept)."""
        w, lang = self.w, values.get(self.w.lang) or "en"
        last = values.get(w.last_active)
        if not values.get(w.gallery_state) or last is None or time.monotonic() - last < self.kiosk_idle_s:
            return {}
        return {w.gallery: [], w.gallery_state: [], w.prompt: "", w.last_active: None,
                w.status: t(lang, "kiosk_cleared")}

    def on_activity(self) -> float:
        return time.monotonic()

    # --- layout ---------------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        """Lay out the page and wire its events."""
        lang = getattr(self.settings, "language", "auto")
        lang = lang if lang in LANGUAGES else "en"
        book = self.engine.presets()
        preset = book.presets[book.default]
        lim = book.limits
        classes = self._class_choices()
        found = self.sizes.find(preset.width, preset.height)
        with gr.Blocks(title="Z-Image", analytics_enabled=False, fill_width=False) as demo:
            with gr.Column(elem_classes=["zi-kiosk"] if self.kiosk else []):
                with gr.Row(elem_id="zi-header", equal_height=True):
                    title = gr.HTML(self.title_html(lang), elem_id="zi-title")
                    lang_radio = gr.Radio([(strings(code)["language_name"], code) for code in LANGUAGES],
                                          value=lang, label=t(lang, "language_label"), elem_id="zi-lang",
                                          container=False, scale=0, min_width=180)
                banner = gr.Markdown(visible=False, elem_id="zi-banner")
                vram = gr.HTML(render_vram_bar(None, lang=lang), elem_id="vram-panel")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=5, min_width=340):
                        with gr.Group():
                            prompt = gr.Textbox(label=t(lang, "prompt_label"), lines=3, max_lines=8,
                                                placeholder=t(lang, "prompt_placeholder"), elem_id="prompt",
                                                autofocus=True)
                            negative = gr.Textbox(label=t(lang, "negative_label"), lines=2, max_lines=4,
                                                  placeholder=t(lang, "negative_placeholder"),
                                                  visible=preset.guidance > 0, elem_id="negative-prompt")
                        with gr.Column(visible=False, elem_id="zi-examples") as examples:  # trained demo only
                            gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt],
                                        label=t(lang, "demo_examples_label"))
                        with gr.Group():
                            preset_radio = gr.Radio([(t(lang, f"preset.{n}"), n) for n in book.presets],
                                                    value=preset.name, label=t(lang, "preset_label"),
                                                    elem_id="preset")
                            preset_info = gr.Markdown(self.preset_info(preset.name, lang), elem_id="preset-info")
                        with gr.Group():
                            with gr.Row():
                                aspect = gr.Dropdown(list(self.sizes.ratios), value=found[1] if found else "1:1",
                                                     label=t(lang, "aspect_label"), elem_id="aspect", min_width=120)
                                size_class = gr.Radio(classes, value=found[0] if found else None,
                                                      label=t(lang, "class_label"), elem_id="size-class", scale=2)
                            size_readout = gr.Markdown(self.size_readout(preset.width, preset.height, lang),
                                                       elem_id="size-readout")
                        with gr.Accordion(t(lang, "advanced_label"), open=False, visible=not self.kiosk,
                                          elem_id="advanced") as advanced:
                            # Numbers, not sliders: a slider refuses values outside its range before our
                            # validator sees them, and the validator's clamp message is the point
                            with gr.Row():
                                steps = gr.Number(preset.steps, label=t(lang, "steps_label"), precision=0,
                                                  step=1, elem_id="steps", min_width=100)
                                guidance = gr.Number(preset.guidance, label=t(lang, "guidance_label"), step=0.5,
                                                     elem_id="guidance", min_width=100)
                                batch = gr.Slider(lim.batch[0], lim.batch[1], value=1, step=1,
                                                  label=t(lang, "batch_label"), elem_id="batch", min_width=140)
                            with gr.Row():
                                width = gr.Number(preset.width, label=t(lang, "width_label"), precision=0,
                                                  step=lim.side_multiple, elem_id="width", min_width=100)
                                height = gr.Number(preset.height, label=t(lang, "height_label"), precision=0,
                                                   step=lim.side_multiple, elem_id="height", min_width=100)
                            with gr.Row():
                                seed = gr.Number(None, label=t(lang, "seed_label"), precision=0, elem_id="seed",
                                                 min_width=140)
                                random_seed = gr.Checkbox(True, label=t(lang, "random_seed_label"),
                                                          elem_id="random-seed")
                        with gr.Row():
                            generate = gr.Button(t(lang, "generate"), variant="primary", elem_id="generate-btn",
                                                 scale=3, interactive=False)
                            cancel = gr.Button(t(lang, "cancel"), variant="stop", elem_id="cancel-btn", scale=1)
                        notice = gr.Markdown("", elem_id="zi-notice", visible=False)
                    with gr.Column(scale=6, min_width=340):
                        status = gr.Markdown(self.idle_status(lang), elem_id="status")
                        gallery = gr.Gallery(label=t(lang, "gallery_label"), elem_id="gallery", columns=2,
                                             height=560, format="png", object_fit="contain",
                                             buttons=["download", "fullscreen"], interactive=False)
                with gr.Accordion(t(lang, "gpu_title"), open=False, elem_id="gpu-panel") as gpu_accordion:
                    gpu = gr.HTML(render_gpu_panel(self.gpu_history, lang), elem_id="gpu-stats")
            gallery_state = gr.State([])
            ready_seen = gr.State(None)  # None until the load handler answers; False: opened while loading
            last_active = gr.State(None)
            self.w = Widgets(lang=lang_radio, title=title, banner=banner, vram=vram, prompt=prompt,
                                 negative=negative, preset=preset_radio, preset_info=preset_info, aspect=aspect,
                                 size_class=size_class, size_readout=size_readout, advanced=advanced, steps=steps,
                                 guidance=guidance, width=width, height=height, seed=seed, random_seed=random_seed,
                                 batch=batch, generate=generate, cancel=cancel, notice=notice, status=status,
                                 gallery=gallery, gallery_state=gallery_state, gpu_accordion=gpu_accordion, gpu=gpu,
                                 ready_seen=ready_seen, last_active=last_active, examples=examples)
            self._wire(demo)
        return demo

    def _wire(self, demo: gr.Blocks) -> None:
        w = self.w
        params = w.params()
        refresh_out = [w.vram, w.generate, w.notice, w.negative]
        quick = dict(queue=False, show_progress="hidden", trigger_mode="always_last", api_visibility="private")
        w.preset.input(self.on_preset, params, refresh_out + [w.steps, w.guidance, w.preset_info], **quick)
        for picker in (w.aspect, w.size_class):
            picker.input(self.on_size, params | {w.aspect, w.size_class},
                         refresh_out + [w.width, w.height, w.size_readout], **quick)
        for number in (w.width, w.height):
            number.input(self.on_dimensions, params,
                         refresh_out + [w.size_readout, w.size_class, w.aspect], **quick)
        for widget in (w.steps, w.guidance, w.batch):
            widget.input(self.on_params, params, refresh_out, **quick)

        everything = [w.title, w.banner, w.lang, w.prompt, w.negative, w.preset, w.aspect, w.size_class,
                      w.advanced, w.steps, w.guidance, w.width, w.height, w.seed, w.random_seed, w.batch,
                      w.generate, w.cancel, w.gallery, w.gpu_accordion, w.gpu, w.vram, w.notice, w.status,
                      w.size_readout, w.preset_info, w.ready_seen, w.examples]
        w.lang.input(self.on_language, params, everything, **quick)
        demo.load(self.on_load, params, everything, **quick)

        tick_out = [w.vram, w.generate, w.gpu, w.title, w.banner, w.size_class, w.aspect, w.width, w.height,
                    w.size_readout, w.ready_seen, w.status, w.examples]
        timer = gr.Timer(self.settings.vram_poll_seconds)
        timer.tick(self.on_tick, params | {w.ready_seen}, tick_out, **quick)

        check_out = [w.notice, w.steps, w.guidance, w.width, w.height, w.batch, w.seed, w.size_readout]
        generate_out = [w.status, w.gallery, w.gallery_state, w.seed, w.notice, w.last_active]
        queued = dict(show_progress="minimal", show_progress_on=[w.gallery], concurrency_id="generate",
                      concurrency_limit=self.settings.max_queue + 1)
        inputs = w.param_list()
        # Enter in the prompt box generates too, like the button; only the button's chain is a named endpoint
        for trigger, names in ((w.generate.click, ("check", "generate")), (w.prompt.submit, (None, None))):
            visibility = {"api_name": names[0]} if names[0] else {"api_visibility": "private"}
            check = trigger(self.api_check, inputs, check_out, queue=False, show_progress="hidden", **visibility)
            visibility = {"api_name": names[1]} if names[1] else {"api_visibility": "private"}
            check.success(self.api_generate, inputs + [w.gallery_state], generate_out, **queued, **visibility)
            check.failure(self.on_check_failed, set(inputs), [w.status], queue=False, show_progress="hidden",
                          api_visibility="private")
        w.cancel.click(self.api_cancel, [w.lang], [w.status], queue=False, api_name="cancel")
        demo.unload(self.on_unload)

        if self.kiosk:
            kiosk_timer = gr.Timer(5.0)
            kiosk_timer.tick(self.on_kiosk_tick, {w.lang, w.last_active, w.gallery_state},
                             [w.gallery, w.gallery_state, w.prompt, w.last_active, w.status], **quick)
            w.prompt.input(self.on_activity, None, [w.last_active], **quick)


def _is_update(value: Any) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"


def merge_updates(out: dict[Any, Any], more: dict[Any, Any]) -> dict[Any, Any]:
    """Add ``more`` to ``out``; two updates of one component combine (a label and a value, say) instead of the
    second replacing the first. A plain value counts as an update of ``value``."""
    for component, new in more.items():
        if component not in out:
            out[component] = new
            continue
        old = out[component]
        old_u = old if _is_update(old) else {"__type__": "update", "value": old}
        new_u = new if _is_update(new) else {"__type__": "update", "value": new}
        out[component] = {**old_u, **new_u}
    return out


def refuse(w: Widgets, message: str) -> Iterator[dict[Any, Any]]:
    """A job that was not started: the status line says why, and the event ends in an error (a toast in the
    browser, an exception in gradio_client), not in a result that looks like success."""
    yield {w.status: message}
    raise gr.Error(message, print_exception=False)


def client_of(request: gr.Request | None) -> Client:
    """The client behind a Gradio request: its address (the peer uvicorn saw) and its login, if any."""
    peer = getattr(request, "client", None) if request is not None else None
    return Client(address=getattr(peer, "host", None) or "unknown",
                  user=getattr(request, "username", None) or None)


def notice_update(text: str) -> Any:
    """The notice box shows only when it has something to say."""
    return gr.update(value=text, visible=bool(text))


def build_page(engine: EngineAPI, settings: Any, limits: DoorLimits | None = None) -> gr.Blocks:
    """The page's Blocks, queue configured (``api_open=False``: no way around the queue). ``limits``: the
    service's, so that the page and the API count one client together (None: the page's own)."""
    demo = Page(engine, settings, limits).build()
    demo.queue(api_open=False, max_size=None, default_concurrency_limit=1)
    quiet_queue(demo)
    return demo


QUEUE_IDLE_POLL_S = 0.05
"""How often Gradio's queue looks for work when it has none. Gradio polls every 1 ms on Linux (its own figure on
Windows is 50 ms): 7% of a core for an idle server on a 2-core machine, taken from the demo model's generation
time on a CPU box, or from Ray's replicas beside it. 50 ms is nothing beside a picture's seconds."""


def quiet_queue(demo: gr.Blocks) -> None:
    """Gradio's queue polls at ``QUEUE_IDLE_POLL_S`` (and its progress loop at twice that) when idle. Gradio has no
    setting for it; where its queue has no such attributes (another version), nothing changes."""
    queue = getattr(demo, "_queue", None)
    for name, floor in (("sleep_when_free", QUEUE_IDLE_POLL_S), ("progress_update_sleep_when_free",
                                                                  2 * QUEUE_IDLE_POLL_S)):
        if isinstance(getattr(queue, name, None), (int, float)):
            setattr(queue, name, max(getattr(queue, name), floor))


def mount_page(app: Any, engine: EngineAPI, settings: Any, path: str = "/", limits: DoorLimits | None = None) -> None:
    """Serve the page on a FastAPI app: our CSS, no links out of a kiosk, outputs readable by the gallery."""
    from ..users import gradio_auth

    demo = build_page(engine, settings, limits)
    kiosk = bool(getattr(settings, "kiosk", False))
    gr.mount_gradio_app(
        app, demo, path=path,
        auth=gradio_auth(settings),  # the same users as the REST API, through Gradio's own login page
        css_paths=[CSS_FILE],
        footer_links=[] if kiosk else ["api", "settings"],
        run_history=False if kiosk else None,
        allowed_paths=[str(Path(settings.output_dir).resolve())],
        show_error=True,
    )
