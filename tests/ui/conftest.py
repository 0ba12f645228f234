"""Shared fixtures of the UI tests: a demo-model engine and the page served on loopback, one per test module.

The page is served the way the service serves it (``mount_ui`` on a FastAPI app under uvicorn), on a free port of
127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from ..support import demo_engine as started_demo_engine
from ..support import serve_app


@contextlib.contextmanager
def serve_page(engine: Any, settings: Any) -> Iterator[str]:
    """Serve ``mount_ui(app, engine, settings)`` on loopback; yields the page's URL."""
    from fastapi import FastAPI

    from zimage_ui.ui import mount_ui

    app = FastAPI()
    mount_ui(app, engine, settings)
    with serve_app(app, "gradio_api/info") as url:
        yield url


@pytest.fixture(scope="module")
def ui_env(tmp_path_factory) -> Iterator[None]:
    """Per-module Gradio temp dir (restored afterwards; no analytics: tests/conftest.py)."""
    saved = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    yield
    if saved is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = saved


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory, ui_env):
    """A started engine on the demo model (saves nothing: the page writes the gallery's files itself)."""
    with started_demo_engine(output_dir=tmp_path_factory.mktemp("out"), max_queue=4, vram_poll_seconds=0.5) as engine:
        yield engine


@pytest.fixture(scope="module")
def page_url(demo_engine) -> Iterator[str]:
    with serve_page(demo_engine, demo_engine.settings) as url:
        yield url

