"""The users who may log in, from ``--auth`` / ``--auth-file``: one list for the REST API (HTTP Basic) and the page
(Gradio's login). A shared module: the service and the UI both read it, neither through the other.

    >>> users = parse_users("teacher:secret\\n# a comment\\nstudent:pa:ss")
    >>> check_password(users, "student", "pa:ss"), check_password(users, "student", "pa")
    (True, False)
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from .settings import Settings, SettingsError

log = logging.getLogger(__name__)


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


def gradio_auth(settings: Settings) -> Callable[[str, str], bool] | None:
    """What the UI passes as ``auth=`` to ``gr.mount_gradio_app``: the same users as the API, or None."""
    users = load_users(settings)
    if not users:
        return None
    return lambda user, password: check_password(users, user, password)
