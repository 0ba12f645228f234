"""Every door of a real server holds what docs/deployment.md promises (issue 9): the UI's file route serves only
gallery images, no body is unbounded, no upload or URL fetch, only loopback Host names when bound to loopback, slow
or wrong-password clients are cut off, odd text is a 422, not a 500.

Two servers on loopback with the demo model: a kiosk (no auth, the UI mounted) and a classroom server (auth).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from zimage_ui.service.security import MAX_REQUEST_BODY_BYTES
from zimage_ui.settings import Settings

from .helpers import LiveServer, demo_settings

SMALL = {"width": 256, "height": 256, "steps": 2}
# the page's /generate endpoint: lang, prompt, negative_prompt, preset, steps, guidance, width, height, seed,
# random_seed, batch
PAGE_ARGS = ("en", "a red circle", "", "turbo", 2, None, 256, 256, 7, False, 1)
USER = ("teacher", "secret")


@pytest.fixture(scope="module")
def kiosk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kiosk")
    live = LiveServer(demo_settings(tmp, warmup=False, kiosk=True, allowed_hosts="kiosk.example",
                                    header_timeout_seconds=1.0))
    yield live
    assert live.stop() == 0


@pytest.fixture(scope="module")
def classroom(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classroom")
    live = LiveServer(demo_settings(tmp, warmup=False, auth="teacher:secret", login_failures_per_minute=5))
    yield live
    assert live.stop() == 0


def from_address(live: LiveServer, address: str, **kwargs) -> httpx.Client:
    """A client whose requests come from another loopback address (its own throttle and rate-limit key)."""
    return httpx.Client(base_url=live.url, timeout=60, transport=httpx.HTTPTransport(local_address=address),
                        **kwargs)


# --- item 1: the kiosk's file route -----------------------------------------------------------------------------
def test_kiosk_keeps_no_history(kiosk):
    with kiosk.client() as http:
        made = http.post("/api/v1/generate", json={"prompt": "a visitor's secret", **SMALL})
        assert made.status_code == 200 and "x-zimage-history-id" not in made.headers
        assert http.get("/api/v1/history").status_code == 403
    out = Path(kiosk.settings.output_dir).resolve()
    assert not list(out.glob("history.sqlite3*")), "a kiosk writes no history database"


def test_the_ui_file_route_serves_only_gallery_images(kiosk, tmp_path):
    out = Path(kiosk.settings.output_dir).resolve()
    with kiosk.client() as http:  # a saved PNG in the output folder, as every visitor's image is
        assert http.post("/api/v1/generate", json={"prompt": "a visitor's secret", **SMALL}).status_code == 200

    # a visitor's gallery image is served: gradio_client fetches it through /gradio_api/file=
    client = Client(kiosk.url, verbose=False)
    try:
        _status, gallery, _seed, _notice = client.predict(*PAGE_ARGS, api_name="/generate")
    finally:
        client.close()
    assert len(gallery) == 1 and Path(gallery[0]["image"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # ... and nothing else: the history files (as an older run or another server would leave them), saved PNGs,
    # files outside the output folder, URLs
    for name in ("history.sqlite3", "history.sqlite3-wal", "history.sqlite3-shm", "x.png.part"):
        (out / name).write_bytes(b"SQLite format 3\x00 every visitor's prompt")
    saved = next(out.rglob("*.png"))
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(saved.read_bytes())
    probes = [out / "history.sqlite3", out / "history.sqlite3-wal", out / "history.sqlite3-shm", out / "x.png.part",
              saved, outside, "outputs/history.sqlite3-wal", f"{kiosk.url}/healthz", "https://example.com/x.png"]
    with kiosk.client() as http:
        for probe in probes:
            for door in ("file=", "file/"):
                r = http.get(f"/gradio_api/{door}{probe}")
                assert r.status_code in (403, 404), (probe, r.status_code)
                assert str(out) not in r.text and b"every visitor" not in r.content
        assert http.get(f"/gradio_api/proxy={kiosk.url}/healthz").status_code == 403


# --- item 3: bodies and uploads ---------------------------------------------------------------------------------
def queue_join(prompt: str) -> dict:
    return {"data": [*PAGE_ARGS[:1], prompt, *PAGE_ARGS[2:]], "fn_index": 0, "session_hash": "abcdefgh12"}


def test_every_route_has_a_body_limit(kiosk):
    big = "x" * (MAX_REQUEST_BODY_BYTES + 1)
    with kiosk.client() as http:
        declared = http.post("/gradio_api/queue/join", json=queue_join(big))
        assert declared.status_code == 413 and declared.json()["error"] == "body_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            payload = json.dumps(queue_join(big)).encode()
            for i in range(0, len(payload), 16384):
                yield payload[i:i + 16384]

        streamed = http.post("/gradio_api/queue/join", content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        assert http.post("/api/v1/generate", content=chunks()).status_code == 413
        # a normal event still goes through
        assert http.post("/gradio_api/queue/join", json=queue_join("a small prompt")).status_code != 413
        assert http.get("/healthz").status_code == 200


def test_no_uploads_on_any_route(kiosk):
    with kiosk.client() as http:
        r = http.post("/gradio_api/upload", files={"files": ("a.png", b"\x89PNG" + b"0" * 1000, "image/png")})
        assert r.status_code == 403 and r.json()["error"] == "uploads_off"
        assert http.post("/gradio_api/upload?upload_id=x", files={"files": ("b.txt", b"hello")}).status_code == 403
        assert http.post("/gradio_api/process_recording", files={"files": ("c.wav", b"RIFF")}).status_code == 403


# --- item 4: DNS rebinding --------------------------------------------------------------------------------------
@pytest.mark.parametrize("host, allowed", [("evil.example", False), ("127.0.0.1.evil.example", False),
                                          ("localhost", True), ("127.0.0.1", True), ("[::1]", True),
                                          ("kiosk.example", True)])
def test_bound_to_loopback_only_loopback_and_listed_host_names_are_answered(kiosk, host, allowed):
    port = kiosk.settings.port
    headers = {"Host": f"{host}:{port}", "Origin": f"http://{host}:{port}"}
    with kiosk.client() as http:
        for path in ("/api/v1/presets", "/", "/gradio_api/info"):
            r = http.get(path, headers=headers)
            assert (r.status_code < 400) if allowed else (r.status_code == 400), (path, r.status_code)


def test_allowed_hosts_setting():
    from zimage_ui.service.security import allowed_hosts
    from zimage_ui.settings import SettingsError

    assert allowed_hosts(Settings(allowed_hosts="kiosk.local, ::2")) == [
        "localhost", "127.0.0.1", "[::1]", "kiosk.local", "[::2]"]
    assert allowed_hosts(Settings(host="0.0.0.0")) is None  # a LAN server answers to its names unless told
    assert allowed_hosts(Settings(host="0.0.0.0", allowed_hosts="ai.school")) == [
        "localhost", "127.0.0.1", "[::1]", "ai.school"]
    assert allowed_hosts(Settings(allowed_hosts="*")) is None
    with pytest.raises(SettingsError, match="allowed_hosts"):
        allowed_hosts(Settings(allowed_hosts="http://x:80"))


# --- item 5: slow clients, floods, wrong passwords --------------------------------------------------------------
def test_connections_that_never_finish_their_headers_are_closed(kiosk):
    """header_timeout_seconds=1: 30 slowloris connections, each trickling a header byte every 0.3 s, are all
    closed within a few seconds, and the server keeps answering."""
    port = kiosk.settings.port
    socks = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    closed: set[int] = set()
    start = time.monotonic()
    try:
        while len(closed) < len(socks) and time.monotonic() - start < 8:
            for i, s in enumerate(socks):
                if i in closed:
                    continue
                try:
                    s.sendall(b"X-a: b\r\n")
                    s.setblocking(False)
                    try:
                        if s.recv(1024) == b"":
                            closed.add(i)
                    except BlockingIOError:
                        pass
                    finally:
                        s.setblocking(True)
                except OSError:
                    closed.add(i)
            time.sleep(0.3)
        elapsed = time.monotonic() - start
    finally:
        for s in socks:
            s.close()
    assert len(closed) == len(socks), f"{len(socks) - len(closed)} slow connections still open after 8 s"
    assert elapsed < 5
    assert httpx.get(f"{kiosk.url}/healthz", timeout=5).status_code == 200


def test_a_flood_of_bad_requests_does_not_flood_the_log(kiosk):
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", kiosk.settings.port), timeout=5) as s:
                s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                s.recv(1024)
        time.sleep(0.2)
    finally:
        logger.removeHandler(handler)
    invalid = [line for line in lines if "Invalid HTTP request" in line]
    assert 1 <= len(invalid) <= 10, len(invalid)


def test_wrong_passwords_are_throttled_per_address_and_logged(classroom, caplog):
    caplog.set_level(logging.WARNING, logger="zimage_ui.service.security")
    with from_address(classroom, "127.0.0.2", auth=("teacher", "wrong")) as guesser, \
            from_address(classroom, "127.0.0.2", auth=USER) as same_machine, \
            from_address(classroom, "127.0.0.3", auth=USER) as other_machine:
        codes = [guesser.get("/api/v1/presets").status_code for _ in range(8)]
        assert codes[:4] == [401] * 4 and codes[5:] == [429] * 3, codes
        refused = same_machine.get("/api/v1/presets")  # the right password waits too: no more guessing
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
        assert other_machine.get("/api/v1/presets").status_code == 200
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("127.0.0.2" in r.getMessage() and "wrong password" in r.getMessage() for r in warnings)
    assert len(warnings) <= 6  # one line per counted failure, then one for the lock-out; not one per request


def test_the_ui_login_form_is_throttled_too(classroom):
    with from_address(classroom, "127.0.0.4") as browser, from_address(classroom, "127.0.0.5") as other:
        codes = [browser.post("/login", data={"username": "teacher", "password": f"guess{i}"}).status_code
                 for i in range(7)]
        assert codes[:5] == [400] * 5 and codes[5:] == [429, 429], codes
        assert browser.post("/login", data={"username": "teacher", "password": "secret"}).status_code == 429
        assert other.post("/login", data={"username": "teacher", "password": "secret"}).status_code == 200


# --- item 6: odd input is a 422 naming the field ----------------------------------------------------------------
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_is_a_422_naming_the_field(classroom, field):
    body = {"prompt": "a cat", "guidance": 1.0, **SMALL, field: "a \ud800 cat"}
    raw = json.dumps(body)  # ASCII JSON: "\ud800" as an escape, as a fuzzer or a broken client sends it
    with classroom.client(auth=USER) as http:
        before = http.get("/api/v1/history").json()["total"]
        r = http.post("/api/v1/generate", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["field"] == field, r.text
        assert "surrogate" in r.json()["message"]
        assert http.get("/api/v1/history").json()["total"] == before  # it never ran


@pytest.mark.parametrize("path, status", [("/api/v1/history/9223372036854775808", 422),
                                          ("/api/v1/history/99999999999999999999999", 422),
                                          ("/api/v1/history/9223372036854775807", 404),
                                          ("/api/v1/history/0", 422), ("/api/v1/history/-1", 422),
                                          ("/api/v1/history/1/images/9223372036854775808", 422),
                                          ("/api/v1/history/9223372036854775808/images/0", 422)])
def test_history_ids_are_bounded(classroom, path, status):
    with classroom.client(auth=USER) as http:
        r = http.get(path)
        assert r.status_code == status, r.text
        assert r.json()["error"] in ("invalid_request", "not_found")


def test_error_answers_name_no_server_paths(classroom, tmp_path):
    runner = classroom.engine.test_seam()
    secret = tmp_path / "srv" / "weights" / "model.safetensors"

    def fail(request, attempt):
        raise RuntimeError(f"cannot read {secret}: disk error")

    runner.fault_hook = fail
    try:
        with classroom.client(auth=USER) as http:
            r = http.post("/api/v1/generate", json={"prompt": "x", **SMALL})
    finally:
        runner.fault_hook = None
    assert r.status_code == 500 and r.json()["error"] == "generation_failed"
    assert str(tmp_path) not in r.text and "model.safetensors" in r.json()["message"]


# --- item 11: the OpenAPI document ------------------------------------------------------------------------------
def test_openapi_documents_auth_errors_and_types(classroom):
    with classroom.client(auth=USER) as http:
        spec = http.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["basic"] == {
        "type": "http", "scheme": "basic", "description": spec["components"]["securitySchemes"]["basic"][
            "description"]}
    assert spec["security"] == [{"basic": []}]
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    generate = spec["paths"]["/api/v1/generate"]["post"]
    assert {"401", "409", "413", "422", "429", "500", "503"} <= set(generate["responses"])
    preset = generate["requestBody"]["content"]["application/json"]["schema"]["properties"]["preset"]
    assert preset["anyOf"][0]["enum"] == ["turbo", "standard", "quality"]
    for path in ("/api/v1/history/{item_id}", "/api/v1/history/{item_id}/images/{index}"):
        assert {"404", "422"} <= set(spec["paths"][path]["get"]["responses"])


@pytest.mark.parametrize("method, path, allow", [("POST", "/api/v1/history", "GET"),
                                                 ("DELETE", "/api/v1/generate", "POST"),
                                                 ("PUT", "/api/v1/presets", "GET"),
                                                 ("POST", "/healthz", "GET")])
def test_wrong_methods_on_our_routes_are_405(classroom, method, path, allow):
    with classroom.client(auth=USER) as http:
        r = http.request(method, path)
    assert r.status_code == 405 and r.headers["allow"] == allow

