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
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from ..limits import RateLimiter  # noqa: F401  (moved to zimage_ui/limits.py, which the page shares)
from ..settings import Settings, SettingsError

log = logging.getLogger(__name__)

REALM = "zimage-ui"
HEALTH_PATHS = ("/healthz", "/readyz", "/metrics")
# Our own routes; everything else belongs to the mounted UI (which has Gradio's login instead).
SERVICE_PREFIXES = ("/api/", "/docs", "/redoc", "/openapi.json")


# --- users ----------------------------------------------------------------------------------------------------
def parse_users(text: str, *, where: str = "auth") -> dict[str, str]:
    """``user:password`` lines (blank lines and ``#`` comments skipped); the password may contain ``:``."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise SettingsError(f"{where}: line {number} is not user:password")
        users[user.strip()] = password
    return users


def load_users(settings: Settings) -> dict[str, str]:
    """The users from ``--auth`` and ``--auth-file`` together; empty = no auth."""
    users: dict[str, str] = {}
    if settings.auth_file is not None:
        path = Path(settings.auth_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"auth_file: cannot read {path}: {exc.strerror or exc}") from None
        users.update(parse_users(text, where=f"auth_file {path}"))
        if not users:
            raise SettingsError(f"auth_file: {path} lists no users")
        if path.stat().st_mode & 0o077:
            log.warning("auth_file %s is readable by other users; chmod 600 it", path)
    if settings.auth:
        users.update(parse_users(settings.auth, where="auth"))
    return users


def check_password(users: Mapping[str, str], user: str, password: str) -> bool:
    """Constant-time check (no timing hint of which part was wrong)."""
    expected = users.get(user)
    ok_user = expected is not None
    # compare against something even for an unknown user so timing does not reveal user names
    ok_password = hmac.compare_digest((expected or "\0").encode(), password.encode())
    return ok_user and ok_password


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


def gradio_auth(settings: Settings) -> Callable[[str, str], bool] | None:
    """What the UI passes as ``auth=`` to ``gr.mount_gradio_app``: the same users as the API, or None."""
    users = load_users(settings)
    if not users:
        return None
    return lambda user, password: check_password(users, user, password)


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
                 protected: Callable[[str], bool]):
        self.app = app
        self.users = dict(users)
        self.origins = set(origins)
        self.protected = protected

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
        if self.users and self.protected(scope.get("path", "")):
            if basic_user(headers.get("authorization"), self.users) is None:
                await _refuse(scope, send, 401, {"error": "unauthorized", "message": "authentication required"},
                              extra=[(b"www-authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode())])
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
