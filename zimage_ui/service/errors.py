"""How the API answers an error: one JSON body for every error, and ONE table from the engine's errors to HTTP.

    >>> import json
    >>> from zimage_ui.engine.jobs import QueueFull
    >>> answer = engine_error_response(QueueFull(4, retry_after_s=12))
    >>> answer.status_code, answer.headers["retry-after"], json.loads(answer.body)["error"]
    (503, '12', 'queue_full')

Which error is which comes from ``engine.jobs.error_kind`` (the metrics and the page map from the same kinds).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..engine.jobs import error_kind
from ..messages import Message
from ..validation import RequestError

NOT_READY_RETRY_S = 5  # Retry-After while loading, for a busy client, after a cancel
# Where a message would name a file on the server: an absolute path of two or more parts (POSIX or Windows).
_ABSOLUTE_PATH = re.compile(r"(?:(?<![\w.:/])/|\b[A-Za-z]:\\)[^\s'\"():;,]+(?:[/\\][^\s'\"():;,]+)+")


class ErrorBody(BaseModel):
    """Every error answer of the API."""

    error: str = Field(..., description="A short code: invalid_request, body_too_large, queue_full, ...")
    message: str = Field(..., description="What is wrong, in one line; names the field when one is to blame.")
    field: str | None = Field(None, description="The request field to blame (422, 413).")
    message_code: str | None = Field(None, description="The message's code in the catalogue (refusal.queue_full, "
                                     "admission.over, ...), with its figures in `message_values`, for a client "
                                     "that says it in another language.")
    message_values: dict[str, Any] | None = Field(None, description="The figures the message is made of.")


def err(description: str) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry whose body is an :class:`ErrorBody`."""
    return {"description": description, "model": ErrorBody}


def without_paths(text: str) -> str:
    """``text`` with absolute file paths replaced by their last part: answers never show the server's folders.

    >>> without_paths("cannot open /home/ops/outputs/2026/x.png: gone")
    'cannot open …/x.png: gone'
    """
    return _ABSOLUTE_PATH.sub(lambda m: "…/" + re.split(r"[/\\]", m.group(0))[-1], text)


def error_response(status: int, code: str, message: Message | str, /, *, retry_after: float | None = None,
                   **extra: Any) -> JSONResponse:
    """The error body (``error``, ``message`` in English without server paths, ``extra`` fields), with Retry-After
    if given; a typed message adds its code and figures (``message_code``, ``message_values``).
    Positional-only: a ``status`` field in ``extra`` (the readiness state of a not-ready answer) is a field."""
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    if isinstance(message, Message):
        typed = message.to_dict()
        extra = {"message_code": typed["code"], "message_values": typed["values"], **extra}
    return JSONResponse({"error": code, "message": without_paths(str(message)), **extra}, status_code=status,
                        headers=headers)


def invalid(errors: list[tuple[str, Message | str]]) -> JSONResponse:
    """422 ``invalid_request`` naming the first culprit in ``field`` and every one in ``errors`` (a typed message
    with its ``code`` and ``values``)."""
    errors = [(f or '""', m) for f, m in errors]  # an empty key is still a field the client sent
    field = errors[0][0] if errors else "body"
    message = "; ".join(f"{f}: {m}" for f, m in errors) or "invalid request"
    return error_response(422, "invalid_request", message, field=field,
                          errors=[{"field": f, "message": str(m)}
                                  | ({"code": m.code, "values": m.to_dict()["values"]} if isinstance(m, Message)
                                     else {})
                                  for f, m in errors])


@dataclass(frozen=True)
class HttpAnswer:
    """How one kind of engine error is answered: status, the body's ``error`` code, and its extra fields
    (``retry_after`` becomes the Retry-After header)."""

    status: int
    code: str
    fields: Callable[[Any], dict[str, Any]] = lambda exc: {}


def _memory_fields(exc: Any) -> dict[str, Any]:
    adm = exc.admission
    return {"need_bytes": int(adm.need_bytes), "available_bytes": int(adm.available_bytes),
            "other_processes_bytes": getattr(adm, "other_processes_bytes", None)}


# The table: engine.jobs.error_kind(exc) → the HTTP answer. RequestError ("invalid") is answered by invalid().
ENGINE_ANSWERS: dict[str, HttpAnswer] = {
    "queue_full": HttpAnswer(503, "queue_full", lambda exc: {"retry_after": exc.retry_after_s, "depth": exc.depth}),
    "client_busy": HttpAnswer(429, "client_busy", lambda exc: {"retry_after": NOT_READY_RETRY_S}),
    "not_ready": HttpAnswer(503, "not_ready", lambda exc: {"retry_after": NOT_READY_RETRY_S}),
    "memory": HttpAnswer(409, "insufficient_memory", _memory_fields),
    "cancelled": HttpAnswer(503, "cancelled", lambda exc: {"retry_after": NOT_READY_RETRY_S}),
    "oom": HttpAnswer(507, "out_of_memory"),
    "failed": HttpAnswer(500, "generation_failed"),
    "other": HttpAnswer(500, "generation_failed"),
}


def engine_error_response(exc: BaseException | None, *, message: Message | str | None = None,
                          **extra: Any) -> JSONResponse:
    """The answer to an engine error (or a ``RequestError``): ``ENGINE_ANSWERS[error_kind(exc)]``; ``message``
    replaces the error's own (typed, when it has one) message, ``extra`` adds fields."""
    if isinstance(exc, RequestError):
        return invalid(exc.errors)
    answer = ENGINE_ANSWERS[error_kind(exc)]
    if message is None:
        message = getattr(exc, "message", None) or str(exc)
    return error_response(answer.status, answer.code, message, **{**answer.fields(exc), **extra})
