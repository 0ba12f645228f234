"""The FastAPI app: REST API, health, readiness, metrics and history over one engine; the web UI mounts on it.

    >>> from zimage_ui.settings import Settings
    >>> from zimage_ui.engine.engine import Engine
    >>> settings = Settings(model="demo", save_images=False)
    >>> app = create_app(settings, Engine(settings), history=None, ui=False)
    >>> sorted(r.path for r in app.routes if r.path.startswith("/api/"))[:2]
    ['/api/v1/generate', '/api/v1/history']

Every request goes through the same validator and the same serial worker as the UI. The route never blocks the
event loop: it waits for its job on an ``asyncio.Event`` set from the worker thread, and cancels the job when the
client goes away.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import importlib.util
import json
import logging
import math
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Match

from .. import __version__
from ..engine.jobs import ClientBusy, Job, JobFailed, JobResult, JobState, MemoryRefused, NotReady, QueueFull
from ..limits import Client, DoorLimits
from ..messages import Count, Message
from ..metadata import encode_png, png_info
from ..settings import Settings
from ..validation import Change, RequestError
from .history import History, HistoryUnavailable
from .metrics import ServiceMetrics
from .security import (
    HEALTH_PATHS,
    SERVICE_PREFIXES,
    BodyLimitMiddleware,
    GradioDoorsMiddleware,
    GuardMiddleware,
    LoginThrottle,
    allowed_hosts,
    allowed_origins,
    basic_user,
    load_users,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # a prompt is at most 8000 characters; anything far bigger is not a request
DISCONNECT_POLL_S = 0.2  # how quickly a dropped client's job is cancelled
NOT_READY_RETRY_S = 5
MAX_HISTORY_ID = 2**63 - 1  # SQLite's largest integer
MAX_IMAGE_INDEX = 10_000
# Where a message would name a file on the server: an absolute path of two or more parts (POSIX or Windows).
_ABSOLUTE_PATH = re.compile(r"(?:(?<![\w.:/])/|\b[A-Za-z]:\\)[^\s'\"():;,]+(?:[/\\][^\s'\"():;,]+)+")


@dataclasses.dataclass
class ServiceState:
    """What the server (not the engine) knows: shutting down, or unhealthy and about to exit."""

    draining: bool = False
    fatal: str | None = None

    def readiness(self, engine: Any) -> tuple[bool, str, str]:
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


class GenerateBody(BaseModel):
    """The JSON body of POST /api/v1/generate, for the docs. The validator reads the raw JSON itself, so
    numeric text ("8") is accepted and every error names its field the same way the UI and CLI do."""

    prompt: str = Field(..., description="What to draw.", examples=["a red fox in the snow, watercolor"])
    negative_prompt: str | None = Field(None, description="What to avoid; needs guidance > 0.")
    preset: str | None = Field(None, description="turbo (default), standard or quality; see /api/v1/presets.")
    steps: int | None = Field(None, description="Transformer passes; clamped to the preset's range.")
    guidance: float | None = Field(None, description="CFG scale; clamped to the preset's range.")
    width: int | None = Field(None, description="Pixels; clamped to the limits and snapped to a multiple of 16.")
    height: int | None = Field(None, description="Pixels; clamped to the limits and snapped to a multiple of 16.")
    seed: int | None = Field(None, description="0–4294967295; omitted or -1 draws one (see X-Zimage-Seed).")
    batch: int | None = Field(None, description="Images per run; seeds are seed, seed+1, …")

    model_config = {"extra": "forbid"}


class ErrorBody(BaseModel):
    """Every error answer of the API."""

    error: str = Field(..., description="A short code: invalid_request, body_too_large, queue_full, ...")
    message: str = Field(..., description="What is wrong, in one line; names the field when one is to blame.")
    field: str | None = Field(None, description="The request field to blame (422, 413).")
    message_code: str | None = Field(None, description="The message's code in the catalogue (refusal.queue_full, "
                                     "admission.over, ...), with its figures in `message_values`, for a client "
                                     "that says it in another language.")
    message_values: dict[str, Any] | None = Field(None, description="The figures the message is made of.")


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "model": ErrorBody}


_BAD_INPUT: dict[int | str, dict[str, Any]] = {
    413: _err("The body is larger than the server takes."),
    422: _err("Not a request: `field` names the culprit."),
}
_HISTORY_RESPONSES: dict[int | str, dict[str, Any]] = {
    403: _err("Kiosk mode keeps no history to show."),
    404: _err("No such item, or this server keeps no history."),
    422: _err("A parameter out of range: `field` names it."),
}


def _generate_openapi(preset_names: list[str]) -> dict[str, Any]:
    schema = GenerateBody.model_json_schema()
    if preset_names:  # the names the validator knows (it takes their labels too, in any case)
        schema["properties"]["preset"] = {"anyOf": [{"type": "string", "enum": preset_names}, {"type": "null"}],
                                          "default": None, "title": "Preset",
                                          "description": schema["properties"]["preset"].get("description")}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The first image as PNG (its `parameters` chunk carries the seed); with "
                         "`Accept: application/json`, every image base64 with the request, clamps and timings.",
          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}, "application/json": {}}},
    409: _err("Predicted not to fit in memory now; the body gives the predicted need."),
    **_BAD_INPUT,
    429: _err("Rate limit (classroom setting) reached; see Retry-After."),
    500: _err("The generation failed; the message says why (the server log has the rest)."),
    503: _err("Queue full, still loading, or shutting down; see Retry-After."),
    507: _err("Ran out of memory even with the tiled retry; try a smaller size or batch."),
}


REPLICA_HEADER = "X-Zimage-Replica"


def replica_name(job: Job) -> str:
    """The replica that ran ``job`` (``X-Zimage-Replica``): a Ray Serve replica's id, or ``local`` (one engine in
    this process)."""
    return getattr(job, "replica", None) or "local"


def replica_memory(engine: Any, snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """Every replica's memory for /api/v1/vram: the engine's list (Ray Serve replicas), or the one engine here."""
    listing = getattr(engine, "replica_snapshots", None)
    if listing is not None:
        return listing()
    import socket

    info = engine.model_info()
    return [{"replica": "local", "host": socket.gethostname(), "gpu": info.get("device"), "device": info.get("device"),
             "state": engine.state.value, "ready": bool(engine.ready), "snapshot": snapshot}]


def without_paths(text: str) -> str:
    """``text`` with absolute file paths replaced by their last part: answers never show the server's folders.

    >>> without_paths("cannot open /home/ops/outputs/2026/x.png: gone")
    'cannot open …/x.png: gone'
    """
    return _ABSOLUTE_PATH.sub(lambda m: "…/" + re.split(r"[/\\]", m.group(0))[-1], text)


def _error(status: int, code: str, message: Message | str, *, retry_after: float | None = None,
           **extra: Any) -> JSONResponse:
    """An error answer: the code, the message in English and, for a typed message, its code and figures."""
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    if isinstance(message, Message):
        typed = message.to_dict()
        extra = {"message_code": typed["code"], "message_values": typed["values"], **extra}
    return JSONResponse({"error": code, "message": without_paths(str(message)), **extra}, status_code=status,
                        headers=headers)


def _invalid(errors: list[tuple[str, Message | str]]) -> JSONResponse:
    errors = [(f or '""', m) for f, m in errors]  # an empty key is still a field the client sent
    field = errors[0][0] if errors else "body"
    message = "; ".join(f"{f}: {m}" for f, m in errors) or "invalid request"
    return _error(422, "invalid_request", message, field=field,
                  errors=[{"field": f, "message": str(m)}
                          | ({"code": m.code, "values": m.to_dict()["values"]} if isinstance(m, Message) else {})
                          for f, m in errors])


def header_text(text: str) -> str:
    """A header-safe form of ``text``: our arrows and dashes as ASCII, anything else unsafe percent-encoded.

    >>> header_text("steps 999 → 16 (turbo allows 1–16)")
    'steps 999 -> 16 (turbo allows 1-16)'
    >>> header_text("negative_prompt 'a \\ud800' → ''; é").isascii()
    True
    """
    text = text.replace("→", "->").replace("–", "-")
    # keep printable ASCII readable; ';' separates clamps and '%' starts an escape, so those are encoded too.
    # Text that is not valid Unicode (a lone surrogate) still gives ASCII: escaped, never an exception.
    return quote(text, safe=" !\"#$&'()*+,-./:<=>?@[\\]^_`{|}~", errors="backslashreplace")


def is_seed_draw(change: Change) -> bool:
    """A drawn random seed is reported (X-Zimage-Seed), but it is not a clamp."""
    return change.is_seed_draw


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _read_json(request: Request) -> Any:
    """The body as JSON; raises ``_BodyError`` with the answer for oversized or unparsable bodies."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _BodyError(_error(413, "body_too_large", f"body: larger than {MAX_BODY_BYTES} bytes", field="body"))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _BodyError(_error(413, "body_too_large", f"body: larger than {MAX_BODY_BYTES} bytes",
                                    field="body"))
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise _BodyError(_invalid([("body", Message("error.empty_body"))]))
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # ValueError covers JSONDecodeError, bad UTF-8, huge ints
        raise _BodyError(_invalid([("body", f"not valid JSON: {str(exc)[:120]}")])) from None


class _BodyError(Exception):
    def __init__(self, response: Response):
        self.response = response


def _image_entries(result: JobResult, history_id: int | None) -> list[dict[str, Any]]:
    return [{"seed": seed, "url": f"/api/v1/history/{history_id}/images/{i}" if history_id and result.paths
             else None} for i, seed in enumerate(result.seeds)]


def _png_bytes(result: JobResult, index: int) -> bytes:
    """Image ``index`` as PNG with its metadata: the saved file when there is one, else encoded now."""
    if index < len(result.paths):
        try:
            return Path(result.paths[index]).read_bytes()
        except OSError:
            log.warning("saved image %s is gone; encoding again", result.paths[index])
    return encode_png(result.images[index], png_info(result.request, seed=result.seeds[index],
                                                     model=result.model_id, extra={"timings": result.timings}))


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "application/json" in accept and "image/png" not in accept


def _history_item(item: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """A history row as the API shows it: relative file names and image URLs, never absolute server paths."""
    paths = item.pop("paths", [])
    item.pop("owner", None)
    item["created_at"] = dt.datetime.fromtimestamp(item["created_at"]).astimezone().isoformat(timespec="seconds")
    item["images"] = []
    for index, (seed, path) in enumerate(zip(item["seeds"], paths or [None] * len(item["seeds"]), strict=False)):
        file = None
        if path:
            try:
                file = str(Path(path).resolve().relative_to(output_dir))
            except ValueError:
                file = Path(path).name
        item["images"].append({"seed": seed, "file": file,
                               "url": f"/api/v1/history/{item['id']}/images/{index}" if path else None})
    return item


def _mount_has_auth(app: FastAPI) -> bool:
    """Whether every Gradio app mounted on ``app`` asks for a login."""
    mounts = [r for r in app.routes if hasattr(r, "app") and hasattr(r.app, "get_blocks")]
    return bool(mounts) and all(getattr(r.app.get_blocks(), "auth", None) or getattr(r.app, "auth_dependency", None)
                                for r in mounts)


def create_app(settings: Settings, engine: Any, *, state: ServiceState | None = None,
               history: History | None | bool = True, metrics: ServiceMetrics | None = None,
               ui: bool | None = None) -> FastAPI:
    """The service app over ``engine`` (started or starting).

    ``history``: a History, True (open ``settings.history_db`` or ``output_dir/history.sqlite3``) or None/False
    (no history). ``ui``: mount the web UI at ``/`` (None = when ``zimage_ui.ui`` is installed).
    The app keeps what it built on ``app.state``: ``engine``, ``settings``, ``service`` (a ServiceState),
    ``metrics``, ``history``, ``limits`` (the DoorLimits the API and the page share), ``rate_limiter`` (its
    limiter, None when off), ``users``.
    """
    state = state or ServiceState()
    users = load_users(settings)
    origins = allowed_origins(settings)
    if history is True:
        # a kiosk keeps no history at all: nothing of one visitor's is left for the next to find
        history = None if settings.kiosk else History(
            Path(settings.history_db or Path(settings.output_dir) / "history.sqlite3"))
    history = history or None
    if metrics is None:
        metrics = ServiceMetrics(engine, unhealthy=lambda: state.fatal is not None or state.draining)
        metrics.attach(engine)
    if history is not None:
        history.attach(engine)
        metrics.registry.register(history.collector())
    limits = DoorLimits(settings)  # one count per client for the API and the page together
    limiter = limits.limiter
    output_dir = Path(settings.output_dir).resolve()

    app = FastAPI(title="zimage-ui", version=__version__, description="Z-Image-Turbo text-to-image: REST API, "
                  "health and metrics. Every request runs through the same validator and GPU queue as the web UI.")
    app.state.engine, app.state.settings, app.state.service = engine, settings, state
    app.state.metrics, app.state.history, app.state.rate_limiter, app.state.users = metrics, history, limiter, users
    app.state.limits = limits

    @app.exception_handler(RequestValidationError)
    async def _query_errors(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid([(str(e["loc"][-1]) if e.get("loc") else "request", e.get("msg", "invalid"))
                         for e in exc.errors()])

    @app.exception_handler(HistoryUnavailable)
    async def _history_unavailable(request: Request, exc: HistoryUnavailable) -> JSONResponse:
        return _error(503, "history_unavailable", str(exc))

    # --- health ---------------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"], summary="Liveness: 200 while the process lives")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: 200 once loaded, warm and healthy; 503 with the reason",
             responses={503: {"description": "loading, warming, stopping, failed or unhealthy"}})
    async def readyz() -> JSONResponse:
        ready, status, reason = state.readiness(engine)
        body = {"status": status, "reason": without_paths(reason), "model": engine.model_info().get("label")}
        if history is not None and history.problem is not None:
            body["degraded"] = {"history": history.problem}  # still ready: images are made and answered
        if ready:
            return JSONResponse(body)
        retry = NOT_READY_RETRY_S if status in ("new", "loading", "warming") else None
        return JSONResponse(body, status_code=503,
                            headers={"Retry-After": str(retry)} if retry is not None else None)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (zimage_ series)",
             response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}})
    async def metrics_route() -> Response:
        body, content_type = await run_in_threadpool(metrics.render)
        return Response(body, media_type=content_type)

    # --- information ----------------------------------------------------------------------------------------
    @app.get("/api/v1/vram", tags=["api"], summary="The memory probe's snapshot (bytes by segment)",
             responses={503: _err("No memory reading yet (still loading); see Retry-After.")})
    async def vram() -> JSONResponse:
        if getattr(engine, "probe", None) is None:
            ready, status, reason = state.readiness(engine)
            return _error(503, "not_ready", f"no memory reading yet: {reason}", retry_after=NOT_READY_RETRY_S)
        snapshot = await run_in_threadpool(engine.memory_snapshot)
        body = snapshot.to_dict()
        body["replicas"] = await run_in_threadpool(replica_memory, engine, snapshot.to_dict())
        return JSONResponse(body)

    @app.get("/api/v1/presets", tags=["api"], summary="Presets and the limits the validator enforces")
    async def presets() -> dict[str, Any]:
        book = engine.presets().to_dict()
        book["queue"] = {"max_queue": settings.max_queue, "jobs_per_client": settings.jobs_per_client}
        book["kiosk"] = settings.kiosk
        return book

    @app.get("/api/v1/info", tags=["api"], summary="Model, state and queue")
    async def info() -> dict[str, Any]:
        queue = engine.queue_info()
        ready, status, reason = state.readiness(engine)
        return {"version": __version__, "model": engine.model_info(), "status": status, "reason": reason,
                "queue": {"depth": queue.depth, "max_queue": settings.max_queue,
                          "running": queue.running_job is not None}}

    # --- generate -------------------------------------------------------------------------------------------
    try:
        preset_names = list(engine.presets().presets)
    except Exception:  # an engine without a preset book still gets a schema
        preset_names = []

    @app.post("/api/v1/generate", tags=["api"], summary="Make image(s); PNG by default, JSON on request",
              openapi_extra=_generate_openapi(preset_names), responses=_GENERATE_RESPONSES, response_class=Response)
    async def generate(request: Request) -> Response:
        try:
            raw = await _read_json(request)
        except _BodyError as exc:
            return exc.response
        if state.draining or state.fatal:
            metrics.count_rejection("stopping")
            return _error(503, "stopping", "the server is shutting down; try again shortly",
                          retry_after=NOT_READY_RETRY_S)
        try:
            validated = limits.shape(engine.validate(raw), engine)  # a kiosk's API takes what its page can send
        except RequestError as exc:
            return _invalid(exc.errors)
        address = client_address(request)
        client = Client(address, basic_user(request.headers.get("authorization"), users) if users else None)
        if (wait_s := limits.hit(client)) is not None:
            metrics.count_rejection("rate_limited")
            return _error(429, "rate_limited", f"at most {settings.rate_limit_per_minute} generations a minute "
                          f"per client; try again in {math.ceil(wait_s)} s", retry_after=wait_s)
        # One HTTP request = one job, unless this is a classroom (rate limit or logins on): then a client's
        # requests and its browser tabs are one owner, and jobs_per_client counts them together.
        owner = limits.owner(client, alone=f"api:{uuid.uuid4().hex}")
        try:
            job = engine.submit(validated, owner=owner)
        except NotReady:
            ready, status, reason = state.readiness(engine)
            return _error(503, "not_ready", f"not ready: {reason}", retry_after=NOT_READY_RETRY_S, status=status)
        except QueueFull as exc:
            return _error(503, "queue_full", exc.message or str(exc), retry_after=exc.retry_after_s, depth=exc.depth)
        except ClientBusy as exc:
            return _error(429, "client_busy", exc.message or str(exc), retry_after=NOT_READY_RETRY_S)
        except MemoryRefused as exc:
            adm = exc.admission
            return _error(409, "insufficient_memory", adm.message, need_bytes=int(adm.need_bytes),
                          available_bytes=int(adm.available_bytes),
                          other_processes_bytes=getattr(adm, "other_processes_bytes", None))
        except RequestError as exc:  # defensive: submit re-validates only raw input, but never 500 on bad input
            return _invalid(exc.errors)

        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_change(j: Job) -> None:  # on the worker thread
            if j.done:
                try:
                    loop.call_soon_threadsafe(done.set)
                except RuntimeError:  # the loop is gone (server stopped): nobody is waiting any more
                    pass

        job.on_change(on_change)
        if job.done:
            done.set()
        while not done.is_set():
            with anyio.move_on_after(DISCONNECT_POLL_S):
                await done.wait()
            if done.is_set() or job.done:  # job.done: the job ended, its listener's wake-up is on its way
                break
            if state.fatal is not None:
                return _error(503, "unhealthy", f"the server is unhealthy and restarting: {state.fatal}")
            if await request.is_disconnected():
                engine.cancel(job)
                log.info("client %s went away; cancelled %s", address, job.id)
                return Response(status_code=499)  # nobody reads it; the access log shows why the job ended
        return await _answer(request, job)

    def _unfinished(job: Job) -> Response:
        if job.state == JobState.CANCELLED:
            if state.fatal is not None:
                return _error(503, "unhealthy", f"the server is unhealthy and restarting: {state.fatal}")
            why = "the server is shutting down" if state.draining else "the job was cancelled"
            return _error(503, "cancelled", f"{why}; nothing was made", retry_after=NOT_READY_RETRY_S)
        error = job.error
        if isinstance(error, QueueFull):  # a replica's (or Ray's) queue was full after all: as at the door
            return _error(503, "queue_full", str(error), retry_after=error.retry_after_s, depth=error.depth)
        if isinstance(error, JobFailed) and error.kind == "oom":
            return _error(507, "out_of_memory", str(error))
        log.error("%s failed: %s", job.id, error)  # the full text (paths included) stays in the log
        return _error(500, "generation_failed", f"generation failed: {error}")

    async def _answer(request: Request, job: Job) -> Response:
        if job.state != JobState.DONE:
            response = _unfinished(job)
            response.headers[REPLICA_HEADER] = replica_name(job)
            return response
        result = job.result
        assert result is not None  # DONE always carries a result
        history_id = history.row_for(job) if history is not None else None
        clamps = [str(c) for c in result.changes if not is_seed_draw(c)]
        headers = {"X-Zimage-Seed": str(result.seeds[0]), "X-Zimage-Seeds": ",".join(map(str, result.seeds)),
                   "X-Zimage-Job": job.id, REPLICA_HEADER: replica_name(job)}
        if clamps:
            headers["X-Zimage-Clamped"] = ";".join(header_text(c) for c in clamps)
        if history_id is not None:
            headers["X-Zimage-History-Id"] = str(history_id)
        if _wants_json(request):
            pngs = await run_in_threadpool(lambda: [_png_bytes(result, i) for i in range(len(result.images))])
            images = _image_entries(result, history_id)
            for entry, png in zip(images, pngs, strict=True):
                entry["png_base64"] = base64.b64encode(png).decode("ascii")
            body = {"images": images, "request": result.request.to_dict(), "clamped": clamps,
                    "changes": [_change_json(c) for c in result.changes],
                    "notes": [str(n) for n in result.notes],
                    "note_codes": [n.to_dict() for n in result.notes], "timings": result.timings,
                    "model": {"id": result.model_id, "label": result.model_label},
                    "peak_working_bytes": result.peak_working_bytes, "job_id": job.id, "history_id": history_id}
            return JSONResponse(body, headers=headers)
        png = await run_in_threadpool(_png_bytes, result, 0)
        return Response(png, media_type="image/png", headers=headers)

    # --- history --------------------------------------------------------------------------------------------
    def _history_or_error() -> History | JSONResponse:
        if settings.kiosk:  # a public kiosk keeps (and shows) nobody what earlier visitors made
            return _error(403, "history_off", "history is not kept in kiosk mode")
        if history is None:
            return _error(404, "no_history", "history is not kept by this server")
        return history

    @app.get("/api/v1/history", tags=["history"], summary="Finished jobs, newest first (paged)",
             responses={k: v for k, v in _HISTORY_RESPONSES.items()})
    async def history_page(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=10**9),
                           outcome: str | None = Query(None, pattern="^(ok|cancelled|oom|error)$")) -> Response:
        store = _history_or_error()
        if isinstance(store, JSONResponse):
            return store
        page = await run_in_threadpool(lambda: store.page(limit=limit, offset=offset, outcome=outcome))
        page["items"] = [_history_item(item, output_dir) for item in page["items"]]
        return JSONResponse(page)

    history_id = PathParam(..., ge=1, le=MAX_HISTORY_ID, description="The id of a history row.")

    @app.get("/api/v1/history/{item_id}", tags=["history"], summary="One finished job",
             responses=_HISTORY_RESPONSES)
    async def history_item(item_id: int = history_id) -> Response:
        store = _history_or_error()
        if isinstance(store, JSONResponse):
            return store
        item = await run_in_threadpool(store.get, item_id)
        if item is None:
            return _error(404, "not_found", f"no history item {item_id}")
        return JSONResponse(_history_item(item, output_dir))

    @app.get("/api/v1/history/{item_id}/images/{index}", tags=["history"], summary="A saved image (PNG)",
             response_class=FileResponse, responses={200: {"content": {"image/png": {"schema": {
                 "type": "string", "format": "binary"}}}}, **_HISTORY_RESPONSES})
    async def history_image(item_id: int = history_id,
                            index: int = PathParam(..., ge=0, le=MAX_IMAGE_INDEX,
                                                   description="Which image of the row (0 = first).")) -> Response:
        store = _history_or_error()
        if isinstance(store, JSONResponse):
            return store
        item = await run_in_threadpool(store.get, item_id)
        paths = item["paths"] if item else []
        if not 0 <= index < len(paths):
            return _error(404, "not_found", f"no image {index} in history item {item_id}")
        path = Path(paths[index]).resolve()
        # serve files only from the output folder, whatever the database says
        if not path.is_relative_to(output_dir) or path.suffix.lower() != ".png" or not path.is_file():
            return _error(404, "not_found", "that image is no longer in the output folder")
        return FileResponse(path, media_type="image/png")

    # --- the UI, or a pointer to the docs -------------------------------------------------------------------
    mount = ui if ui is not None else importlib.util.find_spec("zimage_ui.ui") is not None
    if mount:
        from ..ui import mount_ui

        mount_ui(app, engine, settings, path="/", limits=limits)
    else:
        @app.get("/", include_in_schema=False)
        async def root() -> dict[str, str]:
            return {"name": "zimage-ui", "docs": "/docs", "ready": "/readyz"}

    ui_guarded = mount and _mount_has_auth(app)
    if users and mount and not ui_guarded:
        log.warning("the web UI has no login of its own; protecting it with HTTP Basic auth")

    def protected(path: str) -> bool:
        if path in HEALTH_PATHS:
            return not settings.open_health
        if ui_guarded:  # the UI's own login guards everything that is not ours
            return path.startswith(SERVICE_PREFIXES) or path == "/docs/oauth2-redirect"
        return True

    # Starlette adds each middleware around the ones before: the last added sees a request first.
    # Innermost: wrong methods on our routes are 405 (the UI mounted at "/" would answer them 404).
    app.add_middleware(WrongMethodMiddleware, routes=[r for r in app.routes if isinstance(r, APIRoute)])
    if mount:
        from gradio.route_utils import API_PREFIX
        from gradio.utils import get_upload_folder

        app.add_middleware(GradioDoorsMiddleware, prefix=API_PREFIX, cache_dirs=[get_upload_folder()])
    app.add_middleware(BodyLimitMiddleware)
    throttle = LoginThrottle(settings.login_failures_per_minute) if settings.login_failures_per_minute else None
    app.add_middleware(GuardMiddleware, users=users, origins=origins, protected=protected, throttle=throttle,
                       login_paths=("/login", "/login/") if ui_guarded else ())
    # CORS outside the guard so preflights from listed origins are answered; the guard refuses every other origin.
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Accept"],
                           expose_headers=["X-Zimage-Seed", "X-Zimage-Seeds", "X-Zimage-Clamped",
                                           "X-Zimage-Job", "X-Zimage-History-Id", REPLICA_HEADER, "Retry-After"],
                           allow_credentials=True)
    hosts = allowed_hosts(settings)
    if hosts is not None:  # outermost: a request for a name this server does not answer to goes no further
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
    _document_security(app, bool(users))
    return app


class WrongMethodMiddleware:
    """405 with ``Allow`` for a path of ours asked with a method it does not take. Without it the request falls
    through to the UI mounted at ``/``, which answers 404 as if the route did not exist."""

    def __init__(self, app: Any, *, routes: list[APIRoute]):
        self.app = app
        self.routes = routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            matches = [(route, route.matches(scope)[0]) for route in self.routes]
            if not any(m == Match.FULL for _, m in matches) and any(m == Match.PARTIAL for _, m in matches):
                allow = sorted({method for route, m in matches if m == Match.PARTIAL for method in route.methods})
                response = _error(405, "method_not_allowed", f"{scope['method']} is not allowed here; use "
                                  f"{' or '.join(allow)}")
                response.headers["Allow"] = ", ".join(allow)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _document_security(app: FastAPI, basic: bool) -> None:
    """OpenAPI: the HTTP Basic scheme (required on every operation when the server has users)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["basic"] = {
                "type": "http", "scheme": "basic",
                "description": "The users of --auth / --auth-file; only when the server has some."}
            if basic:
                schema["security"] = [{"basic": []}]
                for path, item in schema.get("paths", {}).items():
                    for operation in item.values():
                        if path in HEALTH_PATHS:
                            operation["security"] = [{}, {"basic": []}]  # open unless --no-open-health
                        responses = operation.setdefault("responses", {})
                        responses.setdefault("401", {"description": "No valid HTTP Basic credentials."})
                        responses.setdefault("429", {"description": "Too many wrong passwords from this address "
                                                                    "(or the classroom rate limit); see "
                                                                    "Retry-After."})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _change_json(change: Change) -> dict[str, Any]:
    """A change as the API reports it: today's English fields (``before``/``after`` with their unit, ``reason``)
    and the typed ones (``code``, ``values``)."""
    unit = change.values.get("unit")
    before, after = ((str(Count(change.before, unit)), str(Count(change.after, unit))) if unit
                     else (_jsonable(change.before), _jsonable(change.after)))
    return {"field": change.field, "before": before, "after": after, "reason": change.reason, "code": change.code,
            "values": change.reason_message.to_dict()["values"]}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)
