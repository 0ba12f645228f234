"""Classroom and kiosk limits hold through every door: the page (gradio_client sessions) and the REST API of one
served app (``create_app``, the page mounted on it, uvicorn on loopback) count one client together.

Each gradio_client ``Client`` is a new browser session with a session id of its own making, as a script would
make them up; the limits must not care.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from ..support import serve_app, wait_until
from .test_client import FAST, SLOW, args, notice_text, statuses


@contextlib.contextmanager
def serve_service(engine: Any, settings: Any) -> Iterator[str]:
    """The whole service app (REST API + page) over ``engine`` on a free loopback port; yields its URL."""
    from zimage_ui.service.app import create_app

    with serve_app(create_app(settings, engine, history=None, ui=True), "healthz") as url:
        yield url


def settings_with(engine: Any, **changes: Any) -> Any:
    return engine.settings.model_copy(update=changes)


@pytest.mark.slow  # 24 s on a loaded 2-core machine
def test_the_rate_limit_counts_a_clients_page_sessions_and_api_calls_together(demo_engine):
    with serve_service(demo_engine, settings_with(demo_engine, rate_limit_per_minute=2)) as url:
        first, second, third = (Client(url, verbose=False) for _ in range(3))
        try:
            assert first.predict(*FAST, api_name="/generate")[0].startswith("1 image")
            assert second.predict(*FAST, api_name="/generate")[0].startswith("1 image")
            # the third start from this machine within the minute: refused, however it comes
            with pytest.raises(AppError, match="At most 2 generations a minute"):
                third.predict(*FAST, api_name="/generate")
            api = httpx.post(url + "api/v1/generate", json={"prompt": "a red circle", "width": 256,
                                                            "height": 256}, timeout=30)
            assert api.status_code == 429 and api.json()["error"] == "rate_limited"
        finally:
            for c in (first, second, third):
                c.close()


@pytest.mark.slow  # 34 s on a loaded 2-core machine
def test_one_login_with_made_up_sessions_has_one_job(demo_engine):
    settings = settings_with(demo_engine, auth="class:correct-horse")
    with serve_service(demo_engine, settings) as url:
        tabs = [Client(url, auth=("class", "correct-horse"), verbose=False) for _ in range(4)]
        try:
            running = tabs[0].submit(*SLOW, api_name="/generate")
            wait_until(lambda: any(s.startswith("Step ") for s in statuses(running)), timeout=60)
            for tab in tabs[1:]:  # new sessions of the same login on the same machine: not a new client
                with pytest.raises(AppError, match="You already have a job"):
                    tab.predict(*FAST, api_name="/generate")
            assert demo_engine.test_seam().depth == 0
            api = httpx.post(url + "api/v1/generate", json={"prompt": "a red circle"},
                             auth=("class", "correct-horse"), timeout=30)
            assert api.status_code == 429 and api.json()["error"] == "client_busy"
            # Cancel in another tab of the same client leaves the first tab's job alone; its own Cancel stops it
            assert tabs[1].predict("en", api_name="/cancel") == "Nothing to cancel."
            assert tabs[0].predict("en", api_name="/cancel") == "Cancelling…"
            assert running.result(timeout=15)[0] == "Cancelled."
        finally:
            for tab in tabs:
                tab.close()
        wait_until(lambda: demo_engine.test_seam().running is None, timeout=10)


def test_a_kiosks_api_takes_only_what_its_page_can_send(demo_engine):
    book = demo_engine.presets()
    quality = book.presets["quality"]
    with serve_service(demo_engine, settings_with(demo_engine, kiosk=True)) as url:
        # the page's own check (gradio_client) says what the kiosk changes
        client = Client(url, verbose=False)
        try:
            notice, steps, guidance, width, height, batch, _seed, _readout = client.predict(
                *args(FAST, preset="quality", steps=30, width=2048, height=2048, batch=4), api_name="/check")
        finally:
            client.close()
        assert (steps, guidance, batch) == (quality.steps, quality.guidance, 1)
        assert (width, height) == (1536, 1536) and "batch 4 → 1 (kiosk" in notice_text(notice)

        # the REST API: the same request is queued as the kiosk page would send it
        seam = demo_engine.test_seam()
        answer: dict[str, Any] = {}
        with seam.hold():
            body = {"prompt": "a fox", "preset": "quality", "steps": 30, "width": 2048, "height": 2048,
                    "batch": 4}
            post = threading.Thread(target=lambda: answer.update(r=httpx.post(
                url + "api/v1/generate", json=body, headers={"Accept": "application/json"}, timeout=30)))
            post.start()
            wait_until(lambda: seam.depth == 1 or "r" in answer, timeout=15)
            assert "r" not in answer, answer["r"].text
            job = seam.waiting()[0]
            r = job.request
            assert (r.steps, r.guidance, r.batch, r.width, r.height) == (quality.steps, quality.guidance, 1,
                                                                       1536, 1536)
            assert any(c.field == "batch" and c.reason.startswith("kiosk") for c in job.changes)
            demo_engine.cancel(job)
        post.join(15)
        assert answer["r"].status_code == 503 and answer["r"].json()["error"] == "cancelled"
        wait_until(lambda: seam.running is None and seam.depth == 0, timeout=10)
