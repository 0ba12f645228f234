"""Settings for every test: nothing phones home (Gradio's analytics) or reaches the Hugging Face hub; tests use
loopback only. Shared helpers live in tests/support.py."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
