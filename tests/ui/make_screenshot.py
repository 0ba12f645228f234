"""Make the README's screenshot: the page on the demo model after it drew an example prompt, in a real browser.

    .venv/bin/python -m tests.ui.make_screenshot docs/screenshot.png

Serves the page exactly as the tests do (loopback, free port), generates one image, and saves a palette PNG small
enough for the README (< 300 KB).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

MAX_BYTES = 300_000
VIEWPORT = {"width": 1280, "height": 900}


def shrink_png(data: bytes, colours: int = 256) -> bytes:
    """A palette PNG of ``data`` (the demo model's noisy pictures defeat plain PNG compression)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=colours, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE).save(
        out, format="PNG", optimize=True)
    return out.getvalue()


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else "docs/screenshot.png")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="zimage-shot-"))
    from playwright.sync_api import sync_playwright

    from zimage_ui.models.shapes_world import EXAMPLE_PROMPTS

    from ..support import demo_engine
    from .conftest import serve_page

    with demo_engine() as engine, serve_page(engine, engine.settings) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--headless", "--no-sandbox", "--disable-gpu",
                                          "--disable-background-networking"])
        page = browser.new_page(viewport=VIEWPORT, locale="en-US")
        page.goto(url)
        page.wait_for_selector("#vram-bar [data-segment=weights]", timeout=30_000)
        page.wait_for_function("() => !document.querySelector('#generate-btn').disabled", timeout=30_000)
        page.fill("#prompt textarea", EXAMPLE_PROMPTS[0])  # the trained demo model draws it
        page.click("#generate-btn")
        page.wait_for_selector("#gallery img", timeout=60_000)
        page.wait_for_timeout(1500)  # the bar's next tick and the image's fade-in
        page.evaluate("window.scrollTo(0, 0)")
        data = page.screenshot(full_page=True)
        browser.close()
    for colours in (256, 128, 64):
        small = shrink_png(data, colours)
        if len(small) < MAX_BYTES:
            break
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(small)
    print(f"{target}: {len(small) // 1024} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
