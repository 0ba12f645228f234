"""The web UI: a Gradio page over the engine (a thin adapter; it never touches the pipeline).

``build_ui(engine, settings)`` returns the Blocks; ``mount_ui(app, engine, settings)`` serves it from a FastAPI app
with the queue closed to direct API calls, so every job waits in the engine's one queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # gradio and fastapi load only when a page is built, never at import
    import fastapi
    import gradio as gr


def build_ui(engine: Any, settings: Any) -> gr.Blocks:
    """The page's Blocks for ``engine`` (started or starting) and ``settings``."""
    from .page import build_page

    return build_page(engine, settings)


def mount_ui(app: fastapi.FastAPI, engine: Any, settings: Any, path: str = "/") -> None:
    """Serve the page on ``app`` at ``path``. ``api_open=False``: /gradio_api/run/... can't bypass the queue."""
    from .page import mount_page

    mount_page(app, engine, settings, path=path)


__all__ = ["build_ui", "mount_ui"]
