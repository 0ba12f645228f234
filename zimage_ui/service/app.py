"""The FastAPI app: REST API, health, readiness, metrics and history over one engine; the web UI mounts on it.

    >>> from zimage_ui.settings import Settings
    >>> from zimage_ui.engine.engine import Engine
    >>> settings = Settings(model="demo", save_images=False)
    >>> app = create_app(settings, Engine(settings), history=None, ui=False)
    >>> sorted(r.path for r in app.routes if r.path.startswith("/api/"))[:2]
    ['/api/v1/generate', '/api/v1/history']

``create_app`` wires the parts: the routers of ``service/routes`` (health, api, history), the error answers of
``service/errors.py`` (one table from the engine's errors to HTTP), the page, and the security middleware.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Match

from .. import __version__
from ..limits import DoorLimits
from ..settings import Settings
from .context import ServiceContext, ServiceState
from .errors import error_response, invalid
from .history import History, HistoryUnavailable
from .metrics import ServiceMetrics
from .routes import api, health
from .routes import history as history_routes
from .routes.api import REPLICA_HEADER
from .security import (
    HEALTH_PATHS,
    SERVICE_PREFIXES,
    BodyLimitMiddleware,
    GradioDoorsMiddleware,
    GuardMiddleware,
    LoginThrottle,
    allowed_hosts,
    allowed_origins,
    load_users,
)

if TYPE_CHECKING:
    from ..engine.api import EngineAPI

log = logging.getLogger(__name__)

__all__ = ["ServiceState", "WrongMethodMiddleware", "create_app"]


def _mount_has_auth(app: FastAPI) -> bool:
    """Whether every Gradio app mounted on ``app`` asks for a login."""
    mounts = [r for r in app.routes if hasattr(r, "app") and hasattr(r.app, "get_blocks")]
    return bool(mounts) and all(getattr(r.app.get_blocks(), "auth", None) or getattr(r.app, "auth_dependency", None)
                                for r in mounts)


def create_app(settings: Settings, engine: EngineAPI, *, state: ServiceState | None = None,
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
        return invalid([(str(e["loc"][-1]) if e.get("loc") else "request", e.get("msg", "invalid"))
                        for e in exc.errors()])

    @app.exception_handler(HistoryUnavailable)
    async def _history_unavailable(request: Request, exc: HistoryUnavailable) -> JSONResponse:
        return error_response(503, "history_unavailable", str(exc))

    ctx = ServiceContext(engine=engine, settings=settings, state=state, metrics=metrics, history=history,
                         limits=limits, users=users, output_dir=output_dir)
    # Added to the app's own router, not include_router(): FastAPI (0.16x) keeps an included router as one lazy
    # entry of app.routes, and the 405 middleware below and the page's mount read the routes flat.
    for module in (health, api, history_routes):
        module.router(ctx, app.router)

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
                response = error_response(405, "method_not_allowed", f"{scope['method']} is not allowed here; use "
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
