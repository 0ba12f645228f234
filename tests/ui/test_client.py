"""The page's named endpoints through gradio_client, against the page served on the demo model.

Each ``Client`` is one browser session (its own ``session_hash``), so two clients are two tabs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from zimage_ui.metadata import read_metadata

from ..support import wait_until

# lang, prompt, negative_prompt, preset, steps, guidance, width, height, seed, random_seed, batch
FAST = ("en", "a red circle", "", "turbo", None, None, 256, 256, 7, False, 1)
# ~1.3 s per step on two CPU cores: long enough to cancel while it runs
SLOW = ("en", "a slow one", "", "quality", 50, None, 1024, 1024, 3, False, 1)


def args(base: tuple, **changes) -> tuple:
    names = ("lang", "prompt", "negative_prompt", "preset", "steps", "guidance", "width", "height", "seed",
             "random_seed", "batch")
    values = dict(zip(names, base, strict=True))
    values.update(changes)
    return tuple(values[n] for n in names)


def notice_text(value) -> str:
    """The notice arrives as a visibility update (``{"value": ..., "visible": ...}``) or as plain text."""
    return value.get("value") or "" if isinstance(value, dict) else value or ""


@pytest.fixture
def client(page_url):
    c = Client(page_url, verbose=False)
    yield c
    c.close()


def statuses(job) -> list[str]:
    return [out[0] for out in job.outputs() if isinstance(out[0], str)]


def test_generate_streams_progress_then_the_images(client, demo_engine):
    job = client.submit(*FAST, api_name="/generate")
    status, gallery, seed, _notice = job.result(timeout=60)
    assert status.startswith("1 image · 256×256 · 8 steps · seed 7 · ") and "peak working memory" in status
    assert seed == 7 and len(gallery) == 1 and gallery[0]["caption"] == "seed 7"
    meta = read_metadata(Path(gallery[0]["image"]))  # the download carries its parameters, as A1111's do
    assert "Seed: 7" in meta["parameters"] and "Size: 256x256" in meta["parameters"]
    seen = statuses(job)
    assert any(s.startswith("Step ") for s in seen), seen
    assert seen[-1] == status


def test_validator_clamps_before_queueing_and_says_what(client):
    notice, steps, guidance, width, height, batch, seed, readout = client.predict(
        *args(FAST, preset="quality", steps=60, guidance=7.5, width=250), api_name="/check")
    text = notice_text(notice)
    assert "steps 60 → 50 (quality allows 20–50)" in text
    assert "guidance 7.5 → 7 (quality allows 0–7)" in text
    assert "width 250 → 256" in text
    assert (steps, guidance, width, height, batch, seed) == (50, 7.0, 256, 256, 1, 7)


def test_generate_reports_clamps_to_clients_that_skip_the_check(client):
    status, gallery, _seed, notice = client.predict(*args(FAST, steps=30), api_name="/generate")
    assert "steps 30 → 16 (turbo allows 1–16)" in notice_text(notice)
    assert "16 steps" in status and len(gallery) == 1


def test_a_request_that_cannot_run_never_enters_the_queue(client, demo_engine):
    with pytest.raises(Exception, match="prompt: must not be empty"):
        client.predict(*args(FAST, prompt="   "), api_name="/check")


@pytest.mark.slow  # 48 s on a loaded 2-core machine
def test_one_job_per_session_second_tab_queues_and_cancel(page_url, demo_engine):
    tab_a, tab_b = Client(page_url, verbose=False), Client(page_url, verbose=False)
    try:
        running = tab_a.submit(*SLOW, api_name="/generate")
        wait_until(lambda: any(s.startswith("Step ") for s in statuses(running)), timeout=60)

        # the same session again: refused with a clear message, not queued, and as an error: a client that
        # only looks at the result must not take the refusal for a finished run
        with pytest.raises(AppError, match="You already have a job waiting or running"):
            tab_a.predict(*FAST, api_name="/generate")
        assert demo_engine.test_seam().depth == 0

        # another session: no error, a queue position and an ETA
        waiting = tab_b.submit(*FAST, api_name="/generate")
        wait_until(lambda: any(s.startswith("In the queue: position 1") for s in statuses(waiting)), timeout=30)
        assert any("done in about" in s for s in statuses(waiting)), statuses(waiting)

        # Cancel stops a queued job at once ...
        t0 = time.monotonic()
        assert tab_b.predict("en", api_name="/cancel") == "Cancelling…"
        assert waiting.result(timeout=10)[0] == "Cancelled."
        assert time.monotonic() - t0 < 3
        # ... and a running one at its next step
        assert tab_a.predict("en", api_name="/cancel") == "Cancelling…"
        assert running.result(timeout=15)[0] == "Cancelled."
        assert time.monotonic() - t0 < 8
        assert tab_a.predict("en", api_name="/cancel") == "Nothing to cancel."
        wait_until(lambda: demo_engine.test_seam().running is None, timeout=10)
    finally:
        tab_a.close()
        tab_b.close()


def test_the_queue_cannot_be_bypassed(page_url):
    import httpx

    for route in ("gradio_api/run/generate", "gradio_api/api/generate"):
        response = httpx.post(page_url + route, json={"data": list(FAST)}, timeout=10)
        assert response.status_code == 404 and "join the queue" in response.text


@pytest.mark.slow  # 77 s on a loaded 2-core machine
def test_time_left_follows_the_running_jobs_own_steps(client, demo_engine):
    """After a busy period the learnt step time is far too high (here 10x); the status line's time left must
    follow the steps this job measures, not the learnt average."""
    import re

    from zimage_ui.validation import RunRequest

    timer = demo_engine.test_seam().timer
    saved = dict(vars(timer))
    request = RunRequest("x", "", "turbo", 16, 0.0, 768, 768, 1, 1)
    slow = timer.step_seconds(request) * 10
    for _ in range(30):  # the exponential average forgets the real speed
        timer.record(request, step_seconds=slow, overhead_seconds=timer.job_seconds(request, request.steps))
    try:
        job = client.submit(*args(FAST, steps=16, width=768, height=768), api_name="/generate")
        seen: list[tuple[float, str]] = []
        while not job.done():
            outputs = job.outputs()
            for out in outputs[len(seen):]:
                seen.append((time.monotonic(), out[0] if isinstance(out[0], str) else ""))
            time.sleep(0.02)
        status = job.result(timeout=60)[0]
    finally:
        timer.__dict__.update(saved)
    assert status.startswith("1 image")
    steps_end = next(t for t, s in seen if s.startswith(("Decoding", "1 image")))
    ratios = []
    for at, text in seen:
        match = re.match(r"Step (\d+)/16 · ([\d.]+) s left", text)
        if match and int(match[1]) >= 4:
            ratios.append(float(match[2]) / max(steps_end - at, 0.3))
    assert ratios, [s for _, s in seen]
    assert all(1 / 3 < r < 3 for r in ratios), ratios
