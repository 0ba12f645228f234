"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from ..context import ServiceContext
from ..errors import NOT_READY_RETRY_S, without_paths


def router(ctx: ServiceContext, r: APIRouter | None = None) -> APIRouter:
    """These routes, added to ``r`` (the app's own router, from ``create_app``) or a new router."""
    r = r if r is not None else APIRouter()
    engine, state, history, metrics = ctx.engine, ctx.state, ctx.history, ctx.metrics

    @r.get("/healthz", tags=["health"], summary="Liveness: 200 while the process lives")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/readyz", tags=["health"], summary="Readiness: 200 once loaded, warm and healthy; 503 with the reason",
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

    @r.get("/metrics", tags=["health"], summary="Prometheus metrics (zimage_ series)",
           response_class=PlainTextResponse,
           responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                            "description": "Prometheus text exposition format"}})
    async def metrics_route() -> Response:
        body, content_type = await run_in_threadpool(metrics.render)
        return Response(body, media_type=content_type)

    return r
