"""Suite-wide test setup: nothing phones home (Gradio's analytics) or reaches the Hugging Face hub; tests use
loopback only. Shared helpers live in tests/support.py.

Most tests run the demo model untrained (``ZIMAGE_UI_DEMO_WEIGHTS=untrained``, inherited by the servers and CLIs
they start): its smaller sizes keep the many large-picture tests cheap on a CPU, as before the trained weights were
shipped. Tests of the trained model (the judge, the doors drawing the prompt) take the ``trained_demo`` fixture,
which loads the shipped weights. Set the variable yourself (a weights file, or empty for the shipped one) to run
the whole suite on another model.
"""

from __future__ import annotations

import os

import pytest

from zimage_ui.models import demo

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    os.environ.setdefault(demo.WEIGHTS_ENV, "untrained")


@pytest.fixture
def trained_demo(monkeypatch):
    """``--model demo`` is the shipped trained model here (and in what the test starts); skipped without it."""
    if not demo.DEMO_WEIGHTS.is_file():
        pytest.skip(f"the trained demo weights are not shipped ({demo.DEMO_WEIGHTS} is absent)")
    monkeypatch.delenv(demo.WEIGHTS_ENV, raising=False)
    return demo.DEMO_WEIGHTS
