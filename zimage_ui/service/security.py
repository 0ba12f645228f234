"""Who may call the service: users for HTTP Basic (API) and Gradio's login (UI), an origin guard, a rate limit.

Safe defaults for a LAN: no user list means no auth (and the server binds 127.0.0.1 unless told otherwise);
requests from other browser origins are refused unless listed in ``cors_origins``; the rate limit is off.

    >>> users = parse_users("teacher:secret\\n# a comment\\nstudent:pa:ss")
    >>> check_password(users, "student", "pa:ss")
    True
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from ..limits import RateLimiter  # noqa: F401  (it lives in zimage_ui/limits.py, which the page shares)
from ..settings import Settings, SettingsError
from ..users import check_password, load_users, parse_users  # noqa: F401  (they live in zimage_ui/users.py, shared with the page)

log = logging.getLogger(__name__)

REALM = "zimage-ui"
HEALTH_PATHS = ("/healthz", "/readyz", "/metrics")
# Our own routes; everything else belongs to the mounted UI (which has Gradio's login instead).
SERVICE_PREFIXES = ("/api/", "/docs", "/redoc", "/openapi.json")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# The largest body any route takes: a Gradio event is a few kB, the API's own limit is lower (app.MAX_BODY_BYTES).
MAX_REQUEST_BODY_BYTES = 128 * 1024


# --- users ----------------------------------------------------------------------------------------------------
def basic_user(header: str | None, users: Mapping[str, str]) -> str | None:
    """The user named by a valid ``Authorization: Basic ...`` header, else None."""
    if not header or not header[:6].lower() == "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user if check_password(users, user, password) else None


# --- origins --------------------------------------------------------------------------------------------------
def allowed_origins(settings: Settings) -> list[str]:
    """``cors_origins`` as a list of ``scheme://host[:port]`` (no trailing slash)."""
    origins = [o.strip().rstrip("/") for o in settings.cors_origins.split(",") if o.strip()]
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise SettingsError(f"cors_origins: {origin!r} is not an origin like https://host:port")
    return origins


def _host_port(host: str, scheme: str) -> tuple[str, int | None]:
    parts = urlsplit(f"{scheme}://{host}")
    try:
        port = parts.port
    except ValueError:
        return host.lower(), None
    return (parts.hostname or "").lower(), port or (443 if scheme in ("https", "wss") else 80)


def same_origin(origin: str, host: str | None, scheme: str) -> bool:
    """Whether a browser ``Origin`` names the server it was sent to (the ``Host`` header)."""
    if not host or origin == "null":
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https"):
        return False
    try:
        origin_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    return ((parts.hostname or "").lower(), origin_port) == _host_port(host, "https" if scheme in (
        "https", "wss") else "http")


# --- hosts ----------------------------------------------------------------------------------------------------
def is_loopback_bind(host: str) -> bool:
    """Whether binding ``host`` serves this machine only.

    >>> is_loopback_bind("127.0.0.1"), is_loopback_bind("::1"), is_loopback_bind("0.0.0.0")
    (True, True, False)
    """
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(settings: Settings) -> list[str] | None:
    """The ``Host`` names the server answers to, for Starlette's TrustedHostMiddleware; None = any.

    Bound to loopback, a page on another site could still reach the server through DNS rebinding (its own name
    resolving to 127.0.0.1): then its requests carry that name as ``Host``, and only loopback names (and
    ``allowed_hosts``) are accepted. Bound to a LAN address the check is on once ``allowed_hosts`` is set.

    >>> allowed_hosts(Settings())
    ['localhost', '127.0.0.1', '[::1]']
    >>> allowed_hosts(Settings(host="0.0.0.0")) is None
    True
    """
    extra = [h.strip().lower().rstrip(".") for h in settings.allowed_hosts.split(",") if h.strip()]
    if "*" in extra or (not extra and not is_loopback_bind(settings.host)):
        return None
    hosts = list(LOOPBACK_HOSTS)
    for host in extra:
        if "/" in host or host.count(":") == 1 or not host.strip("[]"):
            raise SettingsError(f"allowed_hosts: {host!r} is not a host name (no scheme or port)")
        if ":" in host and not host.startswith("["):  # an IPv6 address, as the Host header writes it
            host = f"[{host}]"
        if host not in hosts:
            hosts.append(host)
    return hosts


# --- login throttle -----------------------------------------------------------------------------------------
class LoginThrottle:
    """Refuses logins from an address after ``per_minute`` wrong passwords within a minute, until the oldest of
    them is a minute old. Each wrong password is a WARNING (so the lines are bounded by the throttle itself).

    >>> throttle = LoginThrottle(2)
    >>> throttle.failed("a", now=0.0), throttle.failed("a", now=1.0), throttle.blocked("a", now=2.0)
    (None, 59.0, 58.0)
    >>> throttle.blocked("a", now=60.5) is None
    True
    """

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._failures = RateLimiter(per_minute)

    def blocked(self, address: str, *, now: float | None = None) -> float | None:
        """Seconds until ``address`` may try again, or None."""
        now = time.monotonic() if now is None else now
        with self._failures._lock:
            hits = self._failures._hits.get(address)
            while hits and hits[0] <= now - RateLimiter.WINDOW_S:
                hits.popleft()
            if hits is None or len(hits) < self.per_minute:
                return None
            return max(hits[0] + RateLimiter.WINDOW_S - now, 0.0)

    def failed(self, address: str, *, user: str | None = None, now: float | None = None) -> float | None:
        """Count a wrong password; the seconds ``address`` is now locked out for, or None."""
        self._failures.hit(address, now=now)
        wait = self.blocked(address, now=now)
        if wait is None:
            log.warning("wrong password from %s%s", address, f" for user {user!r}" if user else "")
        else:
            log.warning("%d wrong passwords from %s within a minute: refusing its logins for %.0f s",
                        self.per_minute, address, wait)
        return wait


def basic_attempt(header: str | None) -> str | None:
    """The user name a Basic ``Authorization`` header tries (for the log), '' when unreadable, None if absent."""
    if not header:
        return None
    if not header[:6].lower() == "basic ":
        return ""
    try:
        return base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")[0][:64]
    except (binascii.Error, UnicodeDecodeError):
        return ""


# --- the guard ------------------------------------------------------------------------------------------------
Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class GuardMiddleware:
    """Refuses foreign browser origins and, where ``protected(path)`` says so, requests without valid Basic auth.

    A pure ASGI middleware (not ``BaseHTTPMiddleware``), so streaming responses and disconnect detection pass
    through untouched. The origin check covers the mounted UI too: Gradio checks origins only for a localhost
    ``Host``, so on a LAN hostname this is the check that stands.
    """

    def __init__(self, app: Callable, *, users: Mapping[str, str], origins: Iterable[str],
                 protected: Callable[[str], bool], throttle: LoginThrottle | None = None,
                 login_paths: Iterable[str] = ()):
        self.app = app
        self.users = dict(users)
        self.origins = set(origins)
        self.protected = protected
        self.throttle = throttle
        self.login_paths = set(login_paths)  # the UI's own login form: a 4xx answer there is a wrong password

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins and not same_origin(
                origin, headers.get("host"), scope.get("scheme", "http")):
            await _refuse(scope, send, 403, {"error": "forbidden_origin",
                                             "message": f"requests from {origin} are not allowed (see cors_origins)"})
            return
        path = scope.get("path", "")
        address = scope["client"][0] if scope.get("client") else "unknown"
        authorization = headers.get("authorization")
        ui_login = scope.get("method") == "POST" and path in self.login_paths
        if self.throttle is not None and (authorization or ui_login) and (
                wait := self.throttle.blocked(address)) is not None:
            await _refuse(scope, send, 429, {"error": "too_many_logins",
                                             "message": f"too many wrong passwords; try again in {wait:.0f} s"},
                          extra=[(b"retry-after", str(max(1, round(wait + 0.5))).encode())])
            return
        if self.users and self.protected(path):
            if basic_user(authorization, self.users) is None:
                if self.throttle is not None and authorization:
                    self.throttle.failed(address, user=basic_attempt(authorization))
                await _refuse(scope, send, 401, {"error": "unauthorized", "message": "authentication required"},
                              extra=[(b"www-authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode())])
                return
        if ui_login and self.throttle is not None:
            await self.app(scope, receive, self._watch_login(send, address))
            return
        await self.app(scope, receive, send)

    def _watch_login(self, send: Send, address: str) -> Send:
        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                self.throttle.failed(address)  # type: ignore[union-attr]
            await send(message)

        return watched


class BodyLimitMiddleware:
    """413 for a request body over ``limit`` bytes, on every route (the UI's too), counted as it streams in: a
    ``Content-Length`` may be absent (chunked) or lie. The body is read here and handed on whole, so the limit
    also bounds what one request can make the server hold."""

    def __init__(self, app: Callable, *, limit: int = MAX_REQUEST_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is None and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return
        if declared is not None and (not declared.strip().isdigit() or int(declared) > self.limit):
            await self._too_large(scope, send)
            return
        buffered: list[dict] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break  # the client left; let the app see it
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._too_large(scope, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        await _refuse(scope, send, 413, {"error": "body_too_large", "field": "body",
                                         "message": f"body: larger than {self.limit} bytes"},
                      extra=[(b"connection", b"close")])


IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")


class GradioDoorsMiddleware:
    """What the mounted UI may serve and take, decided before Gradio sees the request.

    * No uploads on any route (the page has no upload control): ``/upload``, ``/process_recording``.
    * No fetching of URLs for a client: ``/proxy=``, and ``/file=`` with a URL.
    * ``/file=`` serves only images Gradio copied into its cache for a session's gallery (content-hashed names
      known only to that session), never the output folder itself: not the history database or its WAL, not
      another visitor's saved PNG, not a half-written file.
    """

    def __init__(self, app: Callable, *, prefix: str, cache_dirs: Iterable[Path]):
        self.app = app
        self.prefix = prefix.rstrip("/") + "/"
        self.cache_dirs = [Path(d).resolve() for d in cache_dirs]

    def refusal(self, path: str) -> tuple[int, dict] | None:
        """(status, body) for a request the UI must not answer, else None."""
        if not path.startswith(self.prefix):
            return None
        route = path[len(self.prefix):]
        if route.rstrip("/") in ("upload", "upload_progress", "process_recording"):
            return 403, {"error": "uploads_off", "message": "uploads are off on this server"}
        if route.startswith("proxy="):
            return 403, {"error": "no_proxy", "message": "this server fetches no URLs for clients"}
        for door in ("file=", "file/"):
            if route.startswith(door):
                return None if self.servable(route[len(door):]) else (
                    404, {"error": "not_found", "message": "no such image"})
        return None

    def servable(self, name: str) -> bool:
        """Whether ``name`` (a path from a ``/file=`` URL) is a gallery image in Gradio's cache."""
        if "://" in name or name.startswith("//") or name.lower().startswith(("http:", "https:", "data:")):
            return False
        try:
            path = Path(name).resolve()
        except (OSError, RuntimeError, ValueError):
            return False
        return path.suffix.lower() in IMAGE_SUFFIXES and any(
            path.is_relative_to(folder) and path != folder for folder in self.cache_dirs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self.refusal(scope.get("path", "")) if scope["type"] == "http" else None
        if refused is not None:
            await _refuse(scope, send, *refused)
            return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, status: int, body: dict,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": payload})
