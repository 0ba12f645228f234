"""The trained demo model draws the prompt through every door: CLI, REST and the page in a real browser.

Each door gets "a red circle on a blue background" (Turbo: 8 passes, guidance 0) and the judge
(``models/judge.py``) reads the picture it returns: a red object on a blue background. A prompt that lost its way
to the model (dropped, replaced by a default, cached from another request) would not give that picture. Words
outside the model's world are named to the user on every door. Skipped when the trained weights are not shipped.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from zimage_ui.models import demo
from zimage_ui.models.judge import read_picture

from .helpers import LiveServer, demo_settings

PROMPT = "a red circle on a blue background"
pytestmark = pytest.mark.skipif(not demo.DEMO_WEIGHTS.is_file(),
                                reason=f"the trained demo weights are not shipped ({demo.DEMO_WEIGHTS} is absent)")


def red_on_blue(png: bytes) -> None:
    reading = read_picture(Image.open(io.BytesIO(png)))
    assert (reading.background, reading.colour, reading.count) == ("blue", "red", 1), reading


def test_cli_draws_the_prompt(trained_demo, tmp_path):
    out = tmp_path / "red.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "zimage_ui.cli", "generate", "--model", "demo", "--prompt",
                           PROMPT + " with a dragon", "--seed", "3", "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(out) as im:
        assert im.size == (256, 256)  # the trained model's default size
    red_on_blue(out.read_bytes())
    assert "the demo model does not know: 'dragon'" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the engine loads the shipped weights (the suite's default: none)
        mp.delenv(demo.WEIGHTS_ENV, raising=False)
        server = LiveServer(demo_settings(tmp_path_factory.mktemp("draws"), warmup=False))
    assert server.engine.model_info()["label"] == demo.DEMO_TRAINED_LABEL
    yield server
    assert server.stop() == 0


def test_rest_draws_the_prompt(live):
    with live.client() as http:
        r = http.post("/api/v1/generate", json={"prompt": PROMPT, "seed": 4, "preset": "turbo"},
                      headers={"accept": "application/json"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["request"]["steps"] == 8 and body["request"]["guidance"] == 0.0
        red_on_blue(base64.b64decode(body["images"][0]["png_base64"]))
        assert not any("does not know" in n for n in body["notes"])
        # another prompt, another picture: the words reach the model
        r = http.post("/api/v1/generate", json={"prompt": "a blue circle on a yellow background", "seed": 4})
        reading = read_picture(Image.open(io.BytesIO(r.content)))
        assert (reading.background, reading.colour) == ("yellow", "blue"), reading
        r = http.post("/api/v1/generate", json={"prompt": "a red circle riding a unicorn", "seed": 4, "steps": 2},
                      headers={"accept": "application/json"})
        assert any("the demo model does not know: 'riding', 'unicorn'" in n for n in r.json()["notes"])


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_browser_draws_the_prompt(live, tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--headless", "--no-sandbox", "--disable-gpu",
                                          "--disable-background-networking"])
        try:
            page = browser.new_page(locale="en-US", viewport={"width": 1280, "height": 900})
            page.goto(live.url + "/")
            page.wait_for_function("() => document.querySelector('#generate-btn')?.disabled === false",
                                   timeout=60_000)
            # the banner says what the model knows, and the example prompts are offered
            page.wait_for_selector("#zi-banner:has-text('trained on simple shapes')", timeout=30_000)
            assert page.locator("#zi-examples").is_visible()
            assert page.locator("#zi-examples").get_by_text(PROMPT).count() >= 1
            page.fill("#prompt textarea", PROMPT + " with a dragon")
            page.click("#generate-btn")
            page.wait_for_selector("#zi-notice:has-text(\"the demo model does not know: 'dragon'\")",
                                   timeout=30_000)
            page.wait_for_selector("#gallery img", timeout=120_000)
            src = page.get_attribute("#gallery img", "src")
            png = page.request.get(src if src.startswith("http") else live.url + src).body()
        finally:
            browser.close()
    red_on_blue(png)
