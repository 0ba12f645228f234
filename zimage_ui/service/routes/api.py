"""The REST API: memory, presets, info and generate.

Every request goes through the same validator and the same serial worker as the UI. ``generate`` never blocks the
event loop: it waits for its job on an ``asyncio.Event`` set from the worker thread, and cancels the job when the
client goes away.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ... import __version__
from ...engine.jobs import EngineError, Job, JobResult, JobState, NotReady, error_kind
from ...limits import Client
from ...messages import Count, Message
from ...metadata import encode_png, png_info
from ...validation import Change, RequestError
from ..context import ServiceContext
from ..errors import NOT_READY_RETRY_S, engine_error_response, err, error_response, invalid
from ..security import basic_user

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # a prompt is at most 8000 characters; anything far bigger is not a request
DISCONNECT_POLL_S = 0.2  # how quickly a dropped client's job is cancelled
REPLICA_HEADER = "X-Zimage-Replica"  # on every generate answer: the replica that ran the job ("local": this process)


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


def _generate_openapi(preset_names: list[str]) -> dict[str, Any]:
    schema = GenerateBody.model_json_schema()
    if preset_names:  # the names the validator knows (it takes their labels too, in any case)
        schema["properties"]["preset"] = {"anyOf": [{"type": "string", "enum": preset_names}, {"type": "null"}],
                                          "default": None, "title": "Preset",
                                          "description": schema["properties"]["preset"].get("description")}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_BAD_INPUT: dict[int | str, dict[str, Any]] = {
    413: err("The body is larger than the server takes."),
    422: err("Not a request: `field` names the culprit."),
}
_GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The first image as PNG (its `parameters` chunk carries the seed); with "
                         "`Accept: application/json`, every image base64 with the request, clamps and timings.",
          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}, "application/json": {}}},
    409: err("Predicted not to fit in memory now; the body gives the predicted need."),
    **_BAD_INPUT,
    429: err("Rate limit (classroom setting) reached; see Retry-After."),
    500: err("The generation failed; the message says why (the server log has the rest)."),
    503: err("Queue full, still loading, or shutting down; see Retry-After."),
    507: err("Ran out of memory even with the tiled retry; try a smaller size or batch."),
}


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


def replica_name(job: Job) -> str:
    """The replica that ran ``job`` (``X-Zimage-Replica``): a Ray Serve replica's id, or ``local`` (one engine in
    this process)."""
    return getattr(job, "replica", None) or "local"


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class BodyError(Exception):
    """An answer ready for a body that is not a request (too large, empty, not JSON)."""

    def __init__(self, response: Response):
        self.response = response


async def read_json(request: Request) -> Any:
    """The body as JSON; raises ``BodyError`` with the answer for oversized or unparsable bodies."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyError(error_response(413, "body_too_large", f"body: larger than {MAX_BODY_BYTES} bytes",
                                       field="body"))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyError(error_response(413, "body_too_large", f"body: larger than {MAX_BODY_BYTES} bytes",
                                           field="body"))
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise BodyError(invalid([("body", Message("error.empty_body"))]))
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # ValueError covers JSONDecodeError, bad UTF-8, huge ints
        raise BodyError(invalid([("body", f"not valid JSON: {str(exc)[:120]}")])) from None


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


def router(ctx: ServiceContext, r: APIRouter | None = None) -> APIRouter:
    """These routes, added to ``r`` (the app's own router, from ``create_app``) or a new router."""
    r = r if r is not None else APIRouter()
    engine, settings, state, history = ctx.engine, ctx.settings, ctx.state, ctx.history
    metrics, limits, users = ctx.metrics, ctx.limits, ctx.users

    @r.get("/api/v1/vram", tags=["api"], summary="The memory probe's snapshot (bytes by segment)",
           responses={503: err("No memory reading yet (still loading); see Retry-After.")})
    async def vram() -> JSONResponse:
        try:
            snapshot = await run_in_threadpool(engine.memory_snapshot)
        except NotReady as exc:
            ready, status, reason = state.readiness(engine)
            return engine_error_response(exc, message=f"no memory reading yet: {reason}")
        body = snapshot.to_dict()
        body["replicas"] = await run_in_threadpool(engine.replicas)  # one entry (local), or each Ray Serve replica
        return JSONResponse(body)

    @r.get("/api/v1/presets", tags=["api"], summary="Presets and the limits the validator enforces")
    async def presets() -> dict[str, Any]:
        book = engine.presets().to_dict()
        book["queue"] = {"max_queue": settings.max_queue, "jobs_per_client": settings.jobs_per_client}
        book["kiosk"] = settings.kiosk
        return book

    @r.get("/api/v1/info", tags=["api"], summary="Model, state and queue")
    async def info() -> dict[str, Any]:
        queue = engine.queue_info()
        ready, status, reason = state.readiness(engine)
        return {"version": __version__, "model": engine.model_info(), "status": status, "reason": reason,
                "queue": {"depth": queue.depth, "max_queue": settings.max_queue,
                          "running": queue.running_job is not None}}

    try:
        preset_names = list(engine.presets().presets)
    except Exception:  # an engine without a preset book still gets a schema
        preset_names = []

    @r.post("/api/v1/generate", tags=["api"], summary="Make image(s); PNG by default, JSON on request",
            openapi_extra=_generate_openapi(preset_names), responses=_GENERATE_RESPONSES, response_class=Response)
    async def generate(request: Request) -> Response:
        try:
            raw = await read_json(request)
        except BodyError as exc:
            return exc.response
        if state.draining or state.fatal:
            metrics.count_rejection("stopping")
            return error_response(503, "stopping", "the server is shutting down; try again shortly",
                                  retry_after=NOT_READY_RETRY_S)
        try:
            validated = limits.shape(engine.validate(raw), engine)  # a kiosk's API takes what its page can send
        except RequestError as exc:
            return invalid(exc.errors)
        address = client_address(request)
        client = Client(address, basic_user(request.headers.get("authorization"), users) if users else None)
        if (wait_s := limits.hit(client)) is not None:
            metrics.count_rejection("rate_limited")
            return error_response(429, "rate_limited", f"at most {settings.rate_limit_per_minute} generations a "
                                  f"minute per client; try again in {math.ceil(wait_s)} s", retry_after=wait_s)
        # One HTTP request = one job, unless this is a classroom (rate limit or logins on): then a client's
        # requests and its browser tabs are one owner, and jobs_per_client counts them together.
        owner = limits.owner(client, alone=f"api:{uuid.uuid4().hex}")
        try:
            job = engine.submit(validated, owner=owner)
        except NotReady as exc:
            ready, status, reason = state.readiness(engine)
            return engine_error_response(exc, message=f"not ready: {reason}", status=status)
        except (EngineError, RequestError) as exc:  # RequestError: submit re-validates only raw input; never 500
            return engine_error_response(exc)

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
                return error_response(503, "unhealthy", f"the server is unhealthy and restarting: {state.fatal}")
            if await request.is_disconnected():
                engine.cancel(job)
                log.info("client %s went away; cancelled %s", address, job.id)
                return Response(status_code=499)  # nobody reads it; the access log shows why the job ended
        return await _answer(request, job)

    def _unfinished(job: Job) -> Response:
        if job.state == JobState.CANCELLED:
            if state.fatal is not None:
                return error_response(503, "unhealthy", f"the server is unhealthy and restarting: {state.fatal}")
            why = "the server is shutting down" if state.draining else "the job was cancelled"
            return error_response(503, "cancelled", f"{why}; nothing was made", retry_after=NOT_READY_RETRY_S)
        error = job.error
        # 507: the tiled retry did not fit either; a full queue after all (a replica's, or Ray's): as at the door
        if error_kind(error) in ("oom", "queue_full"):
            return engine_error_response(error)
        log.error("%s failed: %s", job.id, error)  # the full text (paths included) stays in the log
        return engine_error_response(error, message=f"generation failed: {error}")

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

    return r
