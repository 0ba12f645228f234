"""The REST API on a real uvicorn server with the demo model: every route, 422s, overload, disconnect, OOM, history."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import threading

import httpx
import pytest
import torch
from PIL import Image

from zimage_ui.validation import RunRequest

from ..support import small_machine
from .helpers import (
    Gate,
    LiveServer,
    demo_settings,
    held_demo_engine,
    metric,
    statuses_until_ready,
    wait_until,
)

SMALL = {"width": 256, "height": 256, "steps": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = demo_settings(tmp_path_factory.mktemp("api"), max_queue=2, warmup=False)
    engine, release_load = held_demo_engine(settings)
    live = LiveServer(settings, wait=False, engine=engine)
    wait_until(lambda: engine.state.value == "loading", what="engine loading")
    held = httpx.get(f"{live.url}/readyz", timeout=10)
    live.startup = [(held.status_code, held.json()["status"])]
    release_load.set()
    live.startup += statuses_until_ready(live.url, alive=lambda: live.exit_code is None)
    yield live
    assert live.stop() == 0


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


@pytest.fixture
def runner(server):
    runner = server.engine.test_seam()
    yield runner
    if isinstance(runner.fault_hook, Gate):  # a failed test must not leave the next one's job held
        runner.fault_hook.release.set()
    runner.fault_hook = None


def png_parameters(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        return im.text["parameters"]


# --- health, information ------------------------------------------------------------------------------------
def test_not_ready_while_loading_but_alive(server):
    # /healthz answered throughout (checked while polling); /readyz said why it was not ready yet
    codes = [code for code, _ in server.startup]
    assert server.startup[0] == (503, "loading") and codes[-1] == 200, server.startup
    assert {status for code, status in server.startup if code == 503} <= {"new", "loading", "warming"}


def test_health_ready_and_metrics(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    text = http.get("/metrics").text
    for series in ("zimage_queue_depth", 'zimage_jobs_total{outcome="ok"}', 'zimage_jobs_total{outcome="oom"}',
                   'zimage_jobs_total{outcome="rejected"}', "zimage_model_load_seconds", "zimage_oom_recovered_total",
                   'zimage_vram_bytes{segment="weights"}', 'zimage_vram_bytes{segment="free"}', "zimage_ready 1.0"):
        assert series in text, series


def test_vram_is_the_probe_snapshot_in_integers(http):
    body = http.get("/api/v1/vram").json()
    for key in ("total_bytes", "weights_bytes", "working_bytes", "cache_bytes", "other_bytes", "free_bytes"):
        assert isinstance(body[key], int) and body[key] >= 0, key
    assert body["weights_bytes"] > 0 and body["device_name"]
    assert "nvml" in body  # None without a GPU


def test_presets_are_what_the_validator_enforces(http, server):
    body = http.get("/api/v1/presets").json()
    assert body["limits"] == server.engine.presets().to_dict()["limits"]
    assert body["presets"]["turbo"]["steps"] == 8 and body["default"] == "turbo"
    assert body["queue"]["max_queue"] == 2


def test_info_and_docs(http):
    info = http.get("/api/v1/info").json()
    assert info["status"] == "ready" and info["model"]["is_demo"]
    assert http.get("/docs").status_code == 200
    schema = http.get("/openapi.json").json()
    body = schema["paths"]["/api/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "steps", "seed", "batch"} <= set(body["properties"])


def test_ui_is_mounted_behind_our_routes(http):
    # our routes answer first; whatever else is at / belongs to the UI (or a pointer to the docs without it)
    assert http.get("/").status_code == 200
    assert http.get("/readyz").headers["content-type"] == "application/json"


# --- generate -----------------------------------------------------------------------------------------------
def test_generate_png_carries_seed_in_header_and_parameters_chunk(http):
    r = http.post("/api/v1/generate", json={"prompt": "a red circle", "seed": 1234, **SMALL})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-zimage-seed"] == "1234"
    assert "x-zimage-clamped" not in r.headers  # nothing was clamped
    assert "Seed: 1234" in png_parameters(r.content)
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (256, 256)


def test_random_seed_is_reported_and_clamps_listed(http):
    r = http.post("/api/v1/generate", json={"prompt": "a red circle", "steps": 999, "width": 250, "height": 256})
    assert r.status_code == 200
    seed = int(r.headers["x-zimage-seed"])
    assert f"Seed: {seed}" in png_parameters(r.content)
    clamps = r.headers["x-zimage-clamped"].split(";")
    assert any(c.startswith("steps 999 -> 16") for c in clamps)
    assert any(c.startswith("width 250 -> 256") for c in clamps)
    assert not any(c.startswith("seed") for c in clamps)  # drawing a seed is not a clamp


def test_clamp_header_is_safe_for_any_text(http):
    # the negative prompt is echoed in a clamp (ignored without guidance): newlines, ';' and non-Latin-1 text
    r = http.post("/api/v1/generate", json={"prompt": "cat", "negative_prompt": "a;b\r\nX-Evil: 1 猫", **SMALL})
    assert r.status_code == 200
    assert "x-evil" not in r.headers
    assert "%3B" in r.headers["x-zimage-clamped"] and "%E7%8C%AB" in r.headers["x-zimage-clamped"]


def test_generate_json_returns_every_image(http):
    r = http.post("/api/v1/generate", json={"prompt": "a blue square", "seed": 10, "batch": 2, **SMALL},
                  headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert [img["seed"] for img in body["images"]] == [10, 11]
    for img in body["images"]:
        data = base64.b64decode(img["png_base64"])
        assert f"Seed: {img['seed']}" in png_parameters(data)
    assert body["request"]["batch"] == 2 and body["request"]["steps"] == 2
    assert body["timings"]["total_s"] > 0 and body["model"]["id"] == "demo"
    assert body["clamped"] == [] and body["history_id"] is not None


def test_huge_numbers_are_clamped_not_a_500(http):
    body = b'{"prompt": "x", "guidance": 1' + b"0" * 400 + b', "steps": 1' + b"0" * 400 + \
        b', "seed": 1' + b"0" * 400 + b', "width": 256, "height": 256}'
    r = http.post("/api/v1/generate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.headers["x-zimage-seed"] == "4294967295"
    assert {c.split(" ")[0] for c in r.headers["x-zimage-clamped"].split(";")} == {"guidance", "steps", "seed"}


def test_numeric_text_is_accepted_like_the_ui(http):
    r = http.post("/api/v1/generate", json={"prompt": "x", "seed": "5", "steps": "2", "width": "256",
                                            "height": 256})
    assert r.status_code == 200 and r.headers["x-zimage-seed"] == "5"


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "steps": "abc"}, "steps"),
    ({"prompt": "x", "width": [256]}, "width"),
    ({"prompt": "x", "guidance": True}, "guidance"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x", "preset": "ultra"}, "preset"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ([1, 2], "body"),
    ("a string", "body"),
])
def test_garbage_gets_422_naming_the_field(http, body, field):
    r = http.post("/api/v1/generate", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and field in r.json()["message"]
    error = r.json()["errors"][0]  # the message as data too: a code from the catalogue and its figures
    assert error["code"].startswith("error.") and isinstance(error["values"], dict) and error["message"]


def test_changes_carry_codes_beside_the_english(http):
    r = http.post("/api/v1/generate", json={"prompt": "x", "seed": 3, **SMALL, "steps": 999},
                  headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    steps = next(c for c in r.json()["changes"] if c["field"] == "steps")
    assert steps["code"] == "preset_range" and steps["values"]["low"] == 1 and steps["after"] == steps["values"]["high"]
    assert steps["reason"] == f"turbo allows 1–{steps['after']}" and steps["before"] == 999
    assert r.json()["clamped"] == [f"steps 999 → {steps['after']} (turbo allows 1–{steps['after']})"]
    assert isinstance(r.json()["note_codes"], list) and len(r.json()["note_codes"]) == len(r.json()["notes"])


@pytest.mark.parametrize("raw", [b"", b"not json", b'{"prompt": "x"', b"\xff\xfe", b"[" * 10_000,
                                 b'{"prompt": "x", "guidance": NaN}',
                                 b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}"])
def test_unparsable_bodies_get_422(http, raw):
    r = http.post("/api/v1/generate", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["field"] in ("body", "guidance", "seed")


def test_oversized_body_is_refused(http):
    r = http.post("/api/v1/generate", content=b'{"prompt": "' + b"a" * 100_000 + b'"}')
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_query_errors_name_the_parameter(http):
    r = http.get("/api/v1/history", params={"limit": "abc"})
    assert r.status_code == 422 and r.json()["field"] == "limit"


def test_predicted_not_to_fit_is_409_with_the_need(http, server):
    engine = server.engine
    huge = {"prompt": "x", "width": 2048, "height": 2048, "batch": 4, "seed": 1}
    small = {"prompt": "x", "seed": 1, **SMALL}
    from zimage_ui.memory.estimator import WorkShape

    need_huge = engine.predict_working_bytes(engine.validate(huge).request)
    need_small = engine.predict_working_bytes(engine.validate(small).request)
    # too little even to decode one image at a time
    need_chunked = engine.estimator.predict_chunked(WorkShape(2048, 2048, 4), 1)
    total = engine.weights_bytes() + need_small + engine.settings.memory_margin_bytes + (need_chunked - need_small) // 2
    with small_machine(engine, total):
        r = http.post("/api/v1/generate", json=huge)
        assert r.status_code == 409
        body = r.json()
        assert body["error"] == "insufficient_memory" and body["need_bytes"] == need_huge
        assert 0 < body["available_bytes"] < need_huge and "too large" in body["message"]
        assert body["message_code"].startswith("admission.over") and body["message_values"]["need_bytes"] == need_huge
        assert http.get("/api/v1/vram").json()["total_bytes"] == total
        assert http.post("/api/v1/generate", json=small).status_code == 200
    assert metric(http, 'zimage_rejections_total{reason="memory"}') >= 1


# --- overload, disconnect -----------------------------------------------------------------------------------
def test_overload_gets_only_200_and_503_with_retry_after(server, http, runner):
    gate = Gate()
    runner.fault_hook = gate
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        with server.client() as c:
            r = c.post("/api/v1/generate", json={"prompt": f"request {i}", **SMALL})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(10)]
    for t in threads:
        t.start()
    # one runs (held at its first step), max_queue=2 wait, the other 7 are refused at once
    wait_until(lambda: gate.entered.is_set() and len(results) == 7, 60, what="7 refusals")
    assert server.engine.test_seam().depth == 2
    assert http.get("/readyz").status_code == 200  # overloaded is not unready
    gate.release.set()
    for t in threads:
        t.join(120)
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * 3 + [503] * 7
    for r in results:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"] == "queue_full"
    assert http.get("/readyz").status_code == 200
    assert metric(http, 'zimage_rejections_total{reason="queue_full"}') >= 7


def test_client_disconnect_cancels_its_job(server, http, runner):
    gate = Gate()
    runner.fault_hook = gate
    cancelled = metric(http, 'zimage_jobs_total{outcome="cancelled"}')
    outcome: dict[str, object] = {}

    def running_client() -> None:
        with server.client() as c:
            outcome["running"] = c.post("/api/v1/generate", json={"prompt": "held", **SMALL}).status_code

    holder = threading.Thread(target=running_client, daemon=True)
    holder.start()
    assert gate.entered.wait(30)
    held = server.engine.test_seam().running
    # a second client queues behind it, then gives up: its queued job must leave the queue
    with pytest.raises(httpx.ReadTimeout), server.client(timeout=1.5) as c:
        c.post("/api/v1/generate", json={"prompt": "impatient", **SMALL})
    wait_until(lambda: server.engine.test_seam().depth == 0, 10, what="queued job cancelled")
    assert metric(http, 'zimage_jobs_total{outcome="cancelled"}') == cancelled + 1
    gate.release.set()
    holder.join(60)
    assert outcome["running"] == 200 and held.state.value == "done"

    # a client that drops while its own job is running: the job stops at its next step
    gate2 = Gate()
    runner.fault_hook = gate2
    result: dict[str, object] = {}

    def drop() -> None:
        try:
            with server.client(timeout=1.5) as c:
                c.post("/api/v1/generate", json={"prompt": "dropped", **SMALL})
        except httpx.ReadTimeout:
            result["dropped"] = True

    t = threading.Thread(target=drop, daemon=True)
    t.start()
    assert gate2.entered.wait(30)
    job = server.engine.test_seam().running
    t.join(10)
    wait_until(lambda: job.cancel_requested, 10, what="cancel requested")
    gate2.release.set()
    assert job.wait_done(30) and job.state.value == "cancelled" and result["dropped"]
    wait_until(lambda: metric(http, 'zimage_jobs_total{outcome="cancelled"}') == cancelled + 2, 10,
               what="cancel counted")


# --- out of memory ------------------------------------------------------------------------------------------
def test_oom_once_is_recovered_by_the_tiled_retry(http, runner):
    recovered = metric(http, "zimage_oom_recovered_total")
    ooms = metric(http, 'zimage_oom_total{phase="denoise"}')
    attempts: list[int] = []

    def oom_on_first_attempt(request: RunRequest, attempt: int) -> None:
        attempts.append(attempt)
        if attempt == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    runner.fault_hook = oom_on_first_attempt
    r = http.post("/api/v1/generate", json={"prompt": "x", "seed": 3, **SMALL},
                  headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 1 and any("out of memory" in n for n in body["notes"])
    assert 1 in attempts and 2 in attempts
    assert metric(http, "zimage_oom_recovered_total") == recovered + 1
    assert metric(http, 'zimage_oom_total{phase="denoise"}') == ooms + 1  # counted, and learned from


def test_oom_twice_is_a_clear_error_and_the_next_job_succeeds(http, runner):
    ooms = metric(http, 'zimage_jobs_total{outcome="oom"}')

    def always_oom(request: RunRequest, attempt: int) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    runner.fault_hook = always_oom
    r = http.post("/api/v1/generate", json={"prompt": "x", **SMALL})
    assert r.status_code == 507
    assert r.json()["error"] == "out_of_memory" and "smaller size" in r.json()["message"]
    assert metric(http, 'zimage_jobs_total{outcome="oom"}') == ooms + 1
    runner.fault_hook = None
    assert http.post("/api/v1/generate", json={"prompt": "x", **SMALL}).status_code == 200
    assert http.get("/readyz").status_code == 200


# --- history ------------------------------------------------------------------------------------------------
def test_history_pages_and_serves_saved_images(http, server):
    r = http.post("/api/v1/generate", json={"prompt": "history check", "seed": 77, **SMALL})
    history_id = int(r.headers["x-zimage-history-id"])
    page = http.get("/api/v1/history", params={"limit": 1}).json()
    newest = page["items"][0]
    assert newest["id"] == history_id and newest["prompt"] == "history check" and newest["seed"] == 77
    assert newest["outcome"] == "ok" and newest["timings"]["total_s"] > 0 and page["next_offset"] == 1
    assert page["total"] >= 2
    image = http.get(newest["images"][0]["url"])
    assert image.status_code == 200 and image.content == r.content
    assert "Seed: 77" in png_parameters(image.content)
    assert http.get(f"/api/v1/history/{history_id}").json()["prompt"] == "history check"
    second = http.get("/api/v1/history", params={"limit": 1, "offset": 1}).json()["items"][0]
    assert second["id"] < history_id
    failures = http.get("/api/v1/history", params={"outcome": "cancelled"}).json()
    assert all(item["outcome"] == "cancelled" for item in failures["items"])
    assert http.get("/api/v1/history/999999").status_code == 404
    assert http.get(f"/api/v1/history/{history_id}/images/5").status_code == 404


def test_history_never_serves_files_outside_the_output_folder(http, server, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG not yours")
    db = server.service.app.state.history.path
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT * FROM generations ORDER BY id DESC LIMIT 1").fetchone()
        names = [d[0] for d in conn.execute("SELECT * FROM generations LIMIT 0").description]
        values = dict(zip(names, row, strict=True))
        values.pop("id")
        values["paths"] = json.dumps([str(outside)])
        cur = conn.execute(f"INSERT INTO generations ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                           list(values.values()))
        forged = cur.lastrowid
    assert http.get(f"/api/v1/history/{forged}/images/0").status_code == 404


def test_generation_metrics_by_preset(http):
    text = http.get("/metrics").text
    assert 'zimage_generation_seconds_count{preset="turbo"}' in text
    assert 'zimage_step_seconds_bucket{le="+Inf",preset="turbo"}' in text
