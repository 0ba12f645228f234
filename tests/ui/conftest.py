"""Shared fixtures of the UI tests: a demo-model engine and the page served on loopback, one per test module.

The page is served the way the service serves it (``mount_ui`` on a FastAPI app under uvicorn), on a free port of
127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from zimage_ui.memory.probe import RawMemory

GiB = 2**30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_page(engine: Any, settings: Any) -> Iterator[str]:
    """Serve ``mount_ui(app, engine, settings)`` on loopback; yields the page's URL."""
    import uvicorn
    from fastapi import FastAPI

    from zimage_ui.ui import mount_ui

    app = FastAPI()
    mount_ui(app, engine, settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:  # as Gradio's own tests do: poll the info route before testing
        try:
            if httpx.get(url + "gradio_api/info", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the page did not come up on {url}")
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class SmallMachine:
    """A test-only memory source behind the probe's interface: a machine with ``total`` bytes, ``used`` in use.

    Admission is then decided by the engine's real estimator against these numbers, so a big request is
    honestly 'over' on this pretend machine.
    """

    total: int = 4 * GiB
    used: int = 1 * GiB

    def read(self) -> RawMemory:
        return RawMemory(kind="cpu", name="test machine", total=self.total, allocated=0, reserved=0,
                         device_used=self.used)

    def reset_peak(self) -> None:
        pass


@contextlib.contextmanager
def small_machine(engine: Any, **kwargs: Any) -> Iterator[SmallMachine]:
    """Swap the engine's memory source for a :class:`SmallMachine` for the duration."""
    source = SmallMachine(**kwargs)
    with engine.test_seam().fake_memory(source):
        yield source


@pytest.fixture(scope="module")
def ui_env(tmp_path_factory) -> Iterator[None]:
    """Per-module Gradio temp dir, no analytics (restored afterwards)."""
    saved = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED")}
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory, ui_env):
    """A started engine on the demo model (saves nothing: the page writes the gallery's files itself)."""
    from zimage_ui.engine.engine import Engine
    from zimage_ui.settings import Settings

    settings = Settings(model="demo", save_images=False, output_dir=tmp_path_factory.mktemp("out"), max_queue=4,
                        vram_poll_seconds=0.5)
    engine = Engine(settings)
    engine.start()
    yield engine
    engine.shutdown(0)


@pytest.fixture(scope="module")
def page_url(demo_engine) -> Iterator[str]:
    with serve_page(demo_engine, demo_engine.settings) as url:
        yield url


def wait_until(condition, timeout: float = 30.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)
