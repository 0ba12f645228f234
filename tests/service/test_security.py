"""Auth, origins (CORS) and the classroom rate limit on a real server."""

from __future__ import annotations

import threading

import httpx
import pytest

from .helpers import Gate, LiveServer, demo_settings

SMALL = {"width": 256, "height": 256, "steps": 2}
TEACHER = ("teacher", "secret")
STUDENT = ("student", "pa:ss")  # a password may contain ':'
ALLOWED = "http://allowed.example:8080"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    users = tmp / "users.txt"
    users.write_text("# classroom\nstudent:pa:ss\n")
    users.chmod(0o600)
    live = LiveServer(demo_settings(tmp, warmup=False, auth="teacher:secret", auth_file=users, cors_origins=ALLOWED,
                                    rate_limit_per_minute=3))
    yield live
    assert live.stop() == 0


@pytest.fixture
def anon(server):
    with server.client() as client:
        yield client


@pytest.fixture
def teacher(server):
    with server.client(auth=TEACHER) as client:
        yield client


@pytest.mark.parametrize("path", ["/api/v1/presets", "/api/v1/history", "/api/v1/vram", "/docs", "/openapi.json"])
def test_api_and_docs_need_auth(anon, path):
    r = anon.get(path)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith('Basic realm="zimage-ui"')


def test_generate_needs_auth(anon):
    assert anon.post("/api/v1/generate", json={"prompt": "x", **SMALL}).status_code == 401


@pytest.mark.parametrize("auth, status", [(TEACHER, 200), (STUDENT, 200), (("teacher", "wrong"), 401),
                                          (("nobody", "secret"), 401), (("teacher", ""), 401)])
def test_users_from_flag_and_file(server, auth, status):
    with server.client(auth=auth) as client:
        assert client.get("/api/v1/presets").status_code == status


def test_malformed_authorization_headers_are_401_not_500(anon):
    for value in ("Basic", "Basic !!!", "Basic " + "dGVhY2hlcg==", "Bearer abc", "Basic w6k6w6k="):
        assert anon.get("/api/v1/presets", headers={"Authorization": value}).status_code == 401


def test_health_and_metrics_stay_open_for_supervisor(anon):
    assert anon.get("/healthz").status_code == 200
    assert anon.get("/readyz").status_code == 200
    assert "zimage_queue_depth" in anon.get("/metrics").text


def test_the_ui_is_not_open_without_a_login(anon):
    # Gradio's own login when the UI sets one up, else our Basic auth in front of it: /config needs one either way
    assert anon.get("/config").status_code == 401


def test_other_origins_are_refused(teacher, server):
    evil = {"Origin": "http://evil.example"}
    assert teacher.post("/api/v1/generate", json={"prompt": "x", **SMALL}, headers=evil).status_code == 403
    assert teacher.get("/api/v1/presets", headers=evil).status_code == 403
    assert teacher.get("/", headers=evil).status_code == 403  # the UI too (Gradio checks only localhost hosts)
    assert teacher.get("/api/v1/presets", headers={"Origin": "null"}).status_code == 403
    # a LAN hostname the server does not answer to is still another origin
    assert teacher.get("/api/v1/presets", headers={"Origin": "http://192.168.1.10:7860"}).status_code == 403


def test_same_origin_and_listed_origins_are_allowed(teacher, server):
    assert teacher.get("/api/v1/presets", headers={"Origin": server.url}).status_code == 200
    r = teacher.get("/api/v1/presets", headers={"Origin": ALLOWED})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    preflight = teacher.options("/api/v1/generate", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ALLOWED
    assert "x-zimage-seed" in preflight.headers.get("access-control-expose-headers", "").lower() or \
        "x-zimage-seed" in r.headers.get("access-control-expose-headers", "").lower()
    refused = teacher.options("/api/v1/generate", headers={"Origin": "http://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert refused.status_code in (400, 403) and "access-control-allow-origin" not in refused.headers


def test_classroom_rate_limit_and_one_job_per_address(server, teacher):
    """rate_limit_per_minute=3: a fourth start within the minute is 429; meanwhile jobs_per_client=1 holds per
    address, so a second concurrent request from the same machine is 429 too (the classroom setting asks)."""
    runner = server.engine.test_seam()
    gate = Gate()
    runner.fault_hook = gate
    first: dict[str, httpx.Response] = {}

    def hold() -> None:
        with server.client(auth=TEACHER) as c:
            first["r"] = c.post("/api/v1/generate", json={"prompt": "held", **SMALL})

    try:
        t = threading.Thread(target=hold, daemon=True)
        t.start()
        assert gate.entered.wait(30)
        busy = teacher.post("/api/v1/generate", json={"prompt": "second", **SMALL})
        assert busy.status_code == 429 and busy.json()["error"] == "client_busy" and busy.headers["retry-after"]
    finally:
        gate.release.set()
        runner.fault_hook = None
    t.join(60)
    assert first["r"].status_code == 200
    assert teacher.post("/api/v1/generate", json={"prompt": "third", **SMALL}).status_code == 200
    limited = teacher.post("/api/v1/generate", json={"prompt": "fourth", **SMALL})
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    # invalid bodies are answered before the limiter and do not use up a student's minute
    assert teacher.post("/api/v1/generate", json={"prompt": ""}).status_code == 422


def test_closed_health_needs_auth_too(tmp_path):
    live = LiveServer(demo_settings(tmp_path, warmup=False, auth="ops:pw", open_health=False), wait=False)
    try:
        with live.client() as anon, live.client(auth=("ops", "pw")) as ops:
            for path in ("/healthz", "/readyz", "/metrics"):
                assert anon.get(path).status_code == 401
            assert ops.get("/healthz").status_code == 200
    finally:
        assert live.stop() == 0
