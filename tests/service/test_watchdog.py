"""Unrecoverable states end the process non-zero (so supervisor restarts it) after /readyz says why."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from zimage_ui.service.server import EXIT_START_FAILED, EXIT_UNHEALTHY, is_sticky_cuda_error

from .helpers import LiveServer, demo_settings, wait_until

SMALL = {"width": 256, "height": 256, "steps": 2}


def _readyz_until_down(url: str) -> list[dict]:
    """Every /readyz body seen until the server stops answering."""
    seen = []
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
        except httpx.HTTPError:
            return seen
        seen.append({"code": r.status_code, **r.json()})
        time.sleep(0.05)
    raise AssertionError("server never went down")


@pytest.mark.parametrize("message, sticky", [
    ("RuntimeError: CUDA error: an illegal memory access was encountered", True),
    ("CUDA error: device-side assert triggered", True),
    ("CUDA error: unspecified launch failure", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("ValueError: bad shape", False),
])
def test_sticky_cuda_errors_are_recognised(message, sticky):
    assert is_sticky_cuda_error(message) is sticky


def test_hung_step_fails_readiness_and_exits_nonzero(tmp_path):
    live = LiveServer(demo_settings(tmp_path, warmup=False, watchdog_seconds=1.0))
    release = threading.Event()

    def hang(request, attempt):
        release.wait(20)  # a kernel that never returns

    live.engine.test_seam().fault_hook = hang
    answer: dict[str, httpx.Response] = {}

    def waiting_client() -> None:
        with live.client() as c:
            answer["r"] = c.post("/api/v1/generate", json={"prompt": "x", **SMALL})

    t = threading.Thread(target=waiting_client, daemon=True)
    t.start()
    try:
        seen = _readyz_until_down(live.url)
        t.join(30)
        assert any(s["code"] == 503 and s["status"] == "unhealthy" and "no progress" in s["reason"] for s in seen)
        assert answer["r"].status_code == 503 and answer["r"].json()["error"] == "unhealthy"
        wait_until(lambda: live.exit_code is not None, 30, what="exit")
        assert live.exit_code == EXIT_UNHEALTHY
    finally:
        release.set()
        live.stop()


def test_sticky_cuda_error_fails_readiness_and_exits_nonzero(tmp_path):
    live = LiveServer(demo_settings(tmp_path, warmup=False))

    def broken_gpu(request, attempt):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    live.engine.test_seam().fault_hook = broken_gpu
    try:
        with live.client() as c:
            r = c.post("/api/v1/generate", json={"prompt": "x", **SMALL})
        assert r.status_code == 500 and "illegal memory access" in r.json()["message"]
        seen = _readyz_until_down(live.url)
        assert seen and all(s["code"] == 503 and "sticky CUDA error" in s["reason"] for s in seen)
        wait_until(lambda: live.exit_code is not None, 30, what="exit")
        assert live.exit_code == EXIT_UNHEALTHY
    finally:
        live.stop()


def test_model_that_fails_to_load_exits_nonzero(tmp_path, monkeypatch):
    # not a wrong --model (serve() refuses those in one line before starting): the load itself fails, as a
    # broken driver would make it; engine.start() imports load_model when it runs, so it gets this one
    def broken_load(*args, **kwargs):
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr("zimage_ui.models.loading.load_model", broken_load)
    live = LiveServer(demo_settings(tmp_path, warmup=False), wait=False)
    seen = _readyz_until_down(live.url)
    wait_until(lambda: live.exit_code is not None, 30, what="exit")
    assert live.exit_code == EXIT_START_FAILED
    assert any(s["status"] == "unhealthy" and "driver initialization failed" in s["reason"] for s in seen)
