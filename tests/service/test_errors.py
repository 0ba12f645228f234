"""One table from the engine's errors to HTTP answers, and one word per error that every door maps from."""

from __future__ import annotations

import json
import types

import pytest

from zimage_ui.engine.jobs import (
    ERROR_KINDS,
    REJECTION_KINDS,
    ClientBusy,
    JobCancelled,
    JobFailed,
    MemoryRefused,
    NotReady,
    QueueFull,
    error_kind,
)
from zimage_ui.service.errors import ENGINE_ANSWERS, engine_error_response
from zimage_ui.service.metrics import rejection_reason
from zimage_ui.validation import RequestError

ADMISSION = types.SimpleNamespace(state="over", need_bytes=3 * 2**30, available_bytes=2**30, margin_bytes=0,
                                  message="this request is too large", other_processes_bytes=None)
ERRORS = {
    "queue_full": QueueFull(4, retry_after_s=12.2),
    "client_busy": ClientBusy("api:x", 1),
    "not_ready": NotReady("not ready: loading the model"),
    "memory": MemoryRefused(ADMISSION),
    "cancelled": JobCancelled("cancelled"),
    "oom": JobFailed("CUDA out of memory", kind="oom"),
    "failed": JobFailed("boom at /srv/secret/weights.bin"),
}


def test_every_kind_has_an_error_and_an_answer():
    assert sorted(ERRORS) == sorted(ERROR_KINDS) and set(ENGINE_ANSWERS) == {*ERROR_KINDS, "other"}
    assert {kind: error_kind(exc) for kind, exc in ERRORS.items()} == {kind: kind for kind in ERRORS}
    assert error_kind(RuntimeError("x")) == error_kind(None) == "other"


@pytest.mark.parametrize(("kind", "status", "code", "retry_after"), [
    ("queue_full", 503, "queue_full", "13"), ("client_busy", 429, "client_busy", "5"),
    ("not_ready", 503, "not_ready", "5"), ("memory", 409, "insufficient_memory", None),
    ("cancelled", 503, "cancelled", "5"), ("oom", 507, "out_of_memory", None),
    ("failed", 500, "generation_failed", None)])
def test_the_http_table(kind, status, code, retry_after):
    answer = engine_error_response(ERRORS[kind])
    body = json.loads(answer.body)
    assert (answer.status_code, body["error"], answer.headers.get("retry-after")) == (status, code, retry_after)
    assert body["message"] and "/srv/secret" not in body["message"]  # never a server path
    if kind == "queue_full":
        assert body["depth"] == 4
    if kind == "memory":
        assert (body["need_bytes"], body["available_bytes"]) == (3 * 2**30, 2**30)


def test_a_request_error_is_422_naming_its_field():
    answer = engine_error_response(RequestError([("width", "not a number")]))
    body = json.loads(answer.body)
    assert answer.status_code == 422 and body["field"] == "width" and body["error"] == "invalid_request"


def test_message_and_fields_can_be_given():
    answer = engine_error_response(ERRORS["not_ready"], message="not ready: warming up", status="warming")
    assert json.loads(answer.body) == {"error": "not_ready", "message": "not ready: warming up", "status": "warming"}


def test_metrics_map_from_the_same_kinds():
    assert {rejection_reason(ERRORS[k]) for k in REJECTION_KINDS} == set(REJECTION_KINDS)
    assert rejection_reason(ERRORS["oom"]) == "other"


def test_a_typed_refusal_gives_its_code_and_figures():
    body = json.loads(engine_error_response(ERRORS["queue_full"]).body)
    assert body["message_code"] == "refusal.queue_full" and body["message_values"]["depth"] == 4
    assert "message_code" not in json.loads(engine_error_response(ERRORS["failed"]).body)  # plain text: none


def test_generate_before_the_engine_is_ready_is_503_with_its_state(tmp_path):
    from fastapi.testclient import TestClient

    from zimage_ui.engine.engine import Engine
    from zimage_ui.service.app import create_app
    from zimage_ui.settings import Settings

    settings = Settings(model="demo", save_images=False, output_dir=tmp_path)
    app = create_app(settings, Engine(settings), history=None, ui=False)  # never started
    with TestClient(app, base_url="http://127.0.0.1") as http:
        r = http.post("/api/v1/generate", json={"prompt": "x"})
        vram = http.get("/api/v1/vram")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json() == {"error": "not_ready", "message": "not ready: not started", "status": "new"}
    assert vram.status_code == 503 and vram.json()["error"] == "not_ready"
