"""The page in a real browser: Debian's chromium driven by Playwright, against the page served on the demo model."""

from __future__ import annotations

import os
import re

import pytest

from zimage_ui.units import GiB

from ..support import small_machine, wait_until
from .conftest import serve_page

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,  # a real Chromium: 8-33 s a test on a loaded 2-core machine
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SEGMENTS_JS = """() => Array.from(document.querySelector('#vram-bar').children)
    .filter(e => e.dataset.segment).map(e => [e.dataset.segment, e.dataset.bytes])"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser, page_url):
    """Open the page in a fresh context (a fresh session); records requests that leave loopback."""
    contexts = []

    def opener(url: str = page_url, locale: str = "en-US"):
        context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.external = []
        page.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
                else page.external.append(r.url))
        page.goto(url)
        page.wait_for_selector("#vram-bar [data-segment=weights]", timeout=30_000)
        page.wait_for_function("() => !document.querySelector('#generate-btn').disabled", timeout=30_000)
        return page

    yield opener
    for context in contexts:
        context.close()


def set_number(page, selector: str, value: str) -> None:
    """Type ``value`` into a number box and leave it. A box inside an accordion that has just opened can still be
    mounting, and the component then puts its own value back over what was typed: type again until it stays."""
    for _ in range(20):
        page.fill(selector, value)
        page.press(selector, "Tab")
        page.wait_for_timeout(100)
        if page.input_value(selector) == value:
            return
    raise AssertionError(f"{selector} would not keep {value!r}")


def bar_state(page) -> str:
    return page.get_attribute("#vram-bar", "data-state")


def test_page_shows_the_bar_with_measured_segments_and_works_offline(open_page, demo_engine):
    page = open_page()
    found = dict(page.evaluate(SEGMENTS_JS))
    assert {"weights", "working", "free"} <= set(found) <= {"weights", "working", "cache", "other", "free"}
    assert all(re.fullmatch(r"\d+", v) for v in found.values())
    total = int(page.get_attribute("#vram-bar", "data-total-bytes"))
    assert sum(int(v) for v in found.values()) == total > 0
    assert int(found["weights"]) == demo_engine.weights_bytes()  # the model's own bytes, not a guess
    assert bar_state(page) == "ok"
    legend = page.inner_text(".zb-legend")
    assert "Model weights" in legend and "Free" in legend and re.search(r"\d+\.\d GiB", legend)
    assert "CPU · RAM" in page.inner_text(".zb-head")
    assert "Demo model" in page.inner_text("#zi-banner") and "zimage-ui download" in page.inner_text("#zi-banner")
    assert page.external == []  # no CDN fonts, scripts or images


def test_generate_in_the_browser_with_a_clamp_shown_before_queueing(open_page):
    page = open_page()
    page.fill("#prompt textarea", "a lighthouse on a cliff at dusk")
    page.click("#advanced button")  # open the accordion
    set_number(page, "#steps input", "30")
    page.wait_for_selector("#zi-notice:has-text('steps 30 → 16 (turbo allows 1–16)')", timeout=10_000)
    page.click("#generate-btn")
    page.wait_for_selector("#zi-notice:has-text('Adjusted before queueing')", timeout=10_000)
    assert page.input_value("#steps input") == "16"
    page.wait_for_selector("#gallery img", timeout=60_000)
    status = page.inner_text("#status")
    assert re.search(r"1 image · 256×256 · 16 steps · seed \d+ · [\d.]+ s · peak working memory", status), status


def test_oversized_request_turns_the_bar_red_and_disables_generate(open_page, demo_engine):
    # 2 GiB in all, 1 GiB in use: the demo estimator's 1536² × 4 can't fit, not even decoding one image at a time
    with small_machine(demo_engine, total=2 * GiB, used=1 * GiB):
        page = open_page()
        page.click("#size-class label:has-text('1536')")
        page.click("#advanced button")
        set_number(page, "#batch input[type=number]", "4")
        page.wait_for_selector("#vram-bar[data-state=over]", timeout=10_000)
        page.wait_for_function("() => document.querySelector('#generate-btn').disabled", timeout=10_000)
        message = page.inner_text(".zb-msg")
        assert "Won't fit" in message and "Largest size that fits:" in message and "× 4" in message
        need = int(page.get_attribute("#vram-bar", "data-need-bytes"))
        assert need == demo_engine.predict_working_bytes(demo_engine.validate(
            {"prompt": "x", "width": 1536, "height": 1536, "batch": 4}).request)
        # the timer keeps it red; back to one small image and it fits again
        page.wait_for_timeout(1200)
        assert bar_state(page) == "over"
        page.click("#size-class label:has-text('512')")
        set_number(page, "#batch input[type=number]", "1")
        page.wait_for_selector("#vram-bar[data-state=ok]", timeout=10_000)
        page.wait_for_function("() => !document.querySelector('#generate-btn').disabled", timeout=10_000)


def test_language_follows_the_browser_and_switches(open_page):
    page = open_page(locale="zh-CN")
    page.wait_for_selector("#generate-btn:has-text('生成')", timeout=10_000)
    assert "模型权重" in page.inner_text(".zb-legend")
    assert "演示模型" in page.inner_text("#zi-model") and "demo" not in page.inner_text("#zi-model")
    page.click("#zi-lang label:has-text('English')")
    page.wait_for_selector("#generate-btn:has-text('Generate')", timeout=10_000)
    page.wait_for_selector("#zi-model:has-text('demo model')", timeout=10_000)
    page.wait_for_selector(".zb-legend:has-text('Model weights')", timeout=10_000)


def test_closing_the_tab_cancels_its_job_within_two_seconds(open_page, demo_engine):
    import time

    page = open_page()
    page.fill("#prompt textarea", "a long one")
    page.click("#preset label:has-text('Quality')")
    page.click("#size-class label:has-text('512')")  # 50 steps at 512²: short steps, so the cancel lands quickly
    page.click("#generate-btn")
    page.wait_for_selector("#status:has-text('Step')", timeout=60_000)
    job = demo_engine.test_seam().running
    assert job is not None and job.request.steps == 50
    closed = time.monotonic()
    page.close()
    wait_until(lambda: job.done, timeout=20)
    took = time.monotonic() - closed
    assert job.state.value == "cancelled" and job.step < 50
    assert took < 2.0, f"the job ended {took:.1f} s after the tab closed"


def test_a_closed_tab_whose_unload_never_arrives_still_loses_its_queued_job(open_page, demo_engine):
    """Gradio's unload comes through the tab's heartbeat stream, which a browser holding six connections to the
    server (several tabs) or a buffering proxy may never open. The job's own event stream must be enough."""
    import time

    page = open_page()
    page.route("**/heartbeat/**", lambda route: route.abort())  # from now on no unload for this tab
    page.reload()
    page.wait_for_function("() => !document.querySelector('#generate-btn')?.disabled", timeout=30_000)
    seam = demo_engine.test_seam()
    with seam.hold():  # the GPU busy: the job waits in the queue
        page.fill("#prompt textarea", "a queued one")
        page.click("#generate-btn")
        page.wait_for_selector("#status:has-text('In the queue')", timeout=30_000)
        job = seam.waiting()[0]
        closed = time.monotonic()
        page.close()
        wait_until(lambda: job.done, timeout=10)
        took = time.monotonic() - closed
    assert job.state.value == "cancelled" and job.started is None
    assert took < 2.0, f"the job ended {took:.1f} s after the tab closed"


def test_kiosk_hides_advanced_controls_and_links_out(browser, demo_engine, open_page):
    kiosk_settings = demo_engine.settings.model_copy(update={"kiosk": True})
    with serve_page(demo_engine, kiosk_settings) as url:
        page = open_page(url)
        assert page.locator("#advanced").count() == 0 or not page.locator("#advanced").is_visible()
        assert page.locator(".zi-kiosk").count() == 1
        assert page.locator("footer a").count() == 0
        page.fill("#prompt textarea", "kiosk")
        page.click("#generate-btn")
        page.wait_for_selector("#gallery img", timeout=60_000)


def test_a_tab_opened_while_the_model_loads_comes_alive_when_it_is_ready(browser, ui_env, tmp_path):
    """The service starts the engine in the background; a kiosk's browser opens the page before it is ready."""
    from zimage_ui.engine.engine import Engine
    from zimage_ui.settings import Settings

    settings = Settings(model="demo", save_images=False, output_dir=tmp_path, vram_poll_seconds=0.5)
    engine = Engine(settings)
    try:
        with serve_page(engine, settings) as url:
            context = browser.new_context(locale="en-US")
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("#status:has-text('Not ready yet')", timeout=30_000)
            assert page.locator("#generate-btn").is_disabled()
            engine.start_in_background()
            page.wait_for_function("() => !document.querySelector('#generate-btn').disabled", timeout=60_000)
            page.wait_for_selector("#status:has-text('Ready.')", timeout=10_000)
            assert "Demo model" in page.inner_text("#zi-banner")
            assert "demo model" in page.inner_text("#zi-model")
            assert page.inner_text("#size-readout").strip() == "256 × 256 px"  # the demo model's default size
            # ... which is none of the size classes: none is shown chosen (the page was drawn before the model
            # was known, with the default preset's 1024 chosen)
            page.wait_for_function("() => !document.querySelector('#size-class input:checked')", timeout=10_000)
            assert set(dict(page.evaluate(SEGMENTS_JS))) >= {"weights", "working", "free"}
            context.close()
    finally:
        engine.shutdown(0)


def test_the_chinese_page_says_clamps_admission_and_validation_in_chinese(open_page, demo_engine):
    """Clamps, the memory verdict and validation errors come from the lower layers as codes and figures; on the
    Chinese page none of their English words may show, and their Chinese must."""
    from ..test_messages import english_in

    page = open_page(locale="zh-CN")
    page.wait_for_selector("#generate-btn:has-text('生成')", timeout=10_000)
    page.fill("#prompt textarea", "a red circle on a blue background")
    page.click("#advanced button")
    set_number(page, "#steps input", "30")  # turbo allows 1–16: a clamp, shown before queueing
    page.wait_for_selector("#zi-notice:has-text('步数 30 → 16（极速允许 1–16）')", timeout=10_000)
    notice = page.inner_text("#zi-notice")
    assert "点击“生成”时将自动调整" in notice and not english_in(notice), notice
    page.click("#generate-btn")
    page.wait_for_selector("#zi-notice:has-text('排队前已自动调整')", timeout=10_000)
    notice = page.inner_text("#zi-notice")
    assert "步数 30 → 16" in notice and not english_in(notice), notice
    page.wait_for_selector("#gallery img", timeout=60_000)
    status = page.inner_text("#status")
    assert "1 张图片" in status and not english_in(status), status

    # a validation error: an empty prompt is refused before the queue, with the field and the reason in Chinese
    page.fill("#prompt textarea", "")
    page.click("#generate-btn")
    page.wait_for_selector("#status:has-text('请修正')", timeout=10_000)
    error = page.inner_text("#status")
    assert "提示词：不能为空" in error and not english_in(error), error

    # the memory verdict: 2 GiB in all, 1 GiB in use, 1536² × 4 won't fit (the estimator's own figures)
    with small_machine(demo_engine, total=2 * GiB, used=1 * GiB):
        page.click("#size-class label:has-text('1536')")
        set_number(page, "#batch input[type=number]", "4")
        page.wait_for_selector("#vram-bar[data-state=over]", timeout=10_000)
        verdict = page.inner_text(".zb-msg")
        assert "放不下" in verdict and not english_in(verdict), verdict
