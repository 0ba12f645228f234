"""Page handlers without a server: built over an engine that has not started (nothing loads)."""

from __future__ import annotations

import time

import pytest

from zimage_ui.engine.engine import Engine
from zimage_ui.engine.jobs import JobState, JobStatus
from zimage_ui.settings import Settings
from zimage_ui.ui.page import Page, merge_updates


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    settings = Settings(model="demo", save_images=False, kiosk=True, kiosk_idle_seconds=30,
                        output_dir=tmp_path_factory.mktemp("out"))
    p = Page(Engine(settings), settings)
    p.build()
    return p


def status(state, position=0, step=0, total=8, eta=None) -> JobStatus:
    return JobStatus("job-1", state, position, step, total, eta, 0.0)


def test_progress_line_says_queue_position_eta_steps_and_decoding(page):
    assert page.progress_text(status(JobState.QUEUED, position=2, eta=12.4), "en") == \
        "In the queue: position 2, done in about 12 s"
    assert page.progress_text(status(JobState.QUEUED, position=1), "en") == "In the queue: position 1"
    assert page.progress_text(status(JobState.RUNNING, step=0), "en") == "Starting: encoding the prompt…"
    assert page.progress_text(status(JobState.RUNNING, step=3, eta=2.5), "en") == "Step 3/8 · 2.5 s left"
    assert page.progress_text(status(JobState.RUNNING, step=8), "en") == "Decoding the image…"
    assert page.progress_text(status(JobState.RUNNING, step=3, eta=2.5), "zh") == "第 3/8 步 · 剩余 2.5 秒"


def test_before_the_model_is_ready_generate_is_off_and_the_page_says_why(page):
    bar, enabled = page.projection(None, "en")
    assert not enabled and 'id="vram-bar"' in bar
    assert page.idle_status("en").startswith("Not ready yet:")
    assert "Loading the model" in page.title_html("en")


def test_widget_values_become_one_request(page):
    w = page.w
    values = {w.lang: "en", w.prompt: "a cat", w.negative: "", w.preset: "quality", w.steps: 60,
              w.guidance: 7.5, w.width: 1024, w.height: 768, w.seed: 5, w.random_seed: True, w.batch: 2}
    raw = page.raw_request(values)
    assert (raw.prompt, raw.preset, raw.steps, raw.width, raw.height, raw.batch) == ("a cat", "quality", 60, 1024,
                                                                                    768, 2)
    assert raw.seed is None  # the random toggle wins over the seed field
    notice = page.notice(page.engine.validate(raw), "en", applied=True)
    assert notice.startswith("**Adjusted before queueing**") and "- steps 60 → 50 (quality allows 20–50)" in notice
    assert "seed" not in notice  # a drawn random seed is not a clamp


def test_kiosk_clears_the_screen_after_idle_only(page):
    w = page.w
    busy = {w.lang: "en", w.last_active: time.monotonic() - 5, w.gallery_state: [("a.png", "seed 1")]}
    assert page.on_kiosk_tick(busy) == {}
    idle = {**busy, w.last_active: time.monotonic() - 31}
    out = page.on_kiosk_tick(idle)
    assert out[w.gallery] == [] and out[w.gallery_state] == [] and out[w.prompt] == ""
    assert page.on_kiosk_tick({**idle, w.gallery_state: []}) == {}


def test_two_updates_of_one_component_combine():
    out = merge_updates({"btn": {"__type__": "update", "value": "生成"}},
                        {"btn": {"__type__": "update", "interactive": False}, "x": 1})
    assert out == {"btn": {"__type__": "update", "value": "生成", "interactive": False}, "x": 1}
    assert merge_updates({"n": 5}, {"n": {"__type__": "update", "label": "Steps"}})["n"] == {
        "__type__": "update", "value": 5, "label": "Steps"}
