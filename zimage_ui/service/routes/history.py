"""The history of finished jobs: pages, one item, its saved images (never outside the output folder)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..context import ServiceContext
from ..errors import err, error_response
from ..history import History

MAX_HISTORY_ID = 2**63 - 1  # SQLite's largest integer
MAX_IMAGE_INDEX = 10_000

HISTORY_RESPONSES: dict[int | str, dict[str, Any]] = {
    403: err("Kiosk mode keeps no history to show."),
    404: err("No such item, or this server keeps no history."),
    422: err("A parameter out of range: `field` names it."),
}


def history_item_body(item: dict[str, Any], output_dir: Path) -> dict[str, Any]:
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


def router(ctx: ServiceContext, r: APIRouter | None = None) -> APIRouter:
    """These routes, added to ``r`` (the app's own router, from ``create_app``) or a new router."""
    r = r if r is not None else APIRouter()
    settings, history, output_dir = ctx.settings, ctx.history, ctx.output_dir

    def _history_or_error() -> History | JSONResponse:
        if settings.kiosk:  # a public kiosk keeps (and shows) nobody what earlier visitors made
            return error_response(403, "history_off", "history is not kept in kiosk mode")
        if history is None:
            return error_response(404, "no_history", "history is not kept by this server")
        return history

    @r.get("/api/v1/history", tags=["history"], summary="Finished jobs, newest first (paged)",
           responses={k: v for k, v in HISTORY_RESPONSES.items()})
    async def history_page(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=10**9),
                           outcome: str | None = Query(None, pattern="^(ok|cancelled|oom|error)$")) -> Response:
        store = _history_or_error()
        if isinstance(store, JSONResponse):
            return store
        page = await run_in_threadpool(lambda: store.page(limit=limit, offset=offset, outcome=outcome))
        page["items"] = [history_item_body(item, output_dir) for item in page["items"]]
        return JSONResponse(page)

    history_id = PathParam(..., ge=1, le=MAX_HISTORY_ID, description="The id of a history row.")

    @r.get("/api/v1/history/{item_id}", tags=["history"], summary="One finished job",
           responses=HISTORY_RESPONSES)
    async def history_item(item_id: int = history_id) -> Response:
        store = _history_or_error()
        if isinstance(store, JSONResponse):
            return store
        item = await run_in_threadpool(store.get, item_id)
        if item is None:
            return error_response(404, "not_found", f"no history item {item_id}")
        return JSONResponse(history_item_body(item, output_dir))

    @r.get("/api/v1/history/{item_id}/images/{index}", tags=["history"], summary="A saved image (PNG)",
           response_class=FileResponse, responses={200: {"content": {"image/png": {"schema": {
               "type": "string", "format": "binary"}}}}, **HISTORY_RESPONSES})
    async def history_image(item_id: int = history_id,
                            index: int = PathParam(..., ge=0, le=MAX_IMAGE_INDEX,
                                                   description="Which image of the row (0 = first).")) -> Response:
        store = _history_or_error()
        if isinstance(store, JSONResponse):
            return store
        item = await run_in_threadpool(store.get, item_id)
        paths = item["paths"] if item else []
        if not 0 <= index < len(paths):
            return error_response(404, "not_found", f"no image {index} in history item {item_id}")
        path = Path(paths[index]).resolve()
        # serve files only from the output folder, whatever the database says
        if not path.is_relative_to(output_dir) or path.suffix.lower() != ".png" or not path.is_file():
            return error_response(404, "not_found", "that image is no longer in the output folder")
        return FileResponse(path, media_type="image/png")

    return r
