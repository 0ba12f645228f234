"""The web UI: a Gradio page over the engine (a thin adapter; it never touches the pipeline).

``build_ui(engine, settings)`` returns the Blocks; ``mount_ui(app, engine, settings)`` serves it from a FastAPI app
with the queue closed to direct API calls, so every job waits in the engine's one queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # gradio and fastapi load only when a page is built, never at import
    import fastapi
    import gradio as gr

    from ..engine.api import EngineAPI


def build_ui(engine: EngineAPI, settings: Any, limits: Any = None) -> gr.Blocks:
    """The page's Blocks for ``engine`` (started or starting) and ``settings``."""
    from .page import build_page

    return build_page(engine, settings, limits)


def mount_ui(app: fastapi.FastAPI, engine: EngineAPI, settings: Any, path: str = "/", limits: Any = None) -> None:
    """Serve the page on ``app`` at ``path``. ``api_open=False``: /gradio_api/run/... can't bypass the queue.

    ``limits`` (a :class:`zimage_ui.limits.DoorLimits`): the service passes its own, so a client's starts and jobs
    count together through the page and the API."""
    from .page import mount_page

    mount_page(app, engine, settings, path=path, limits=limits)


__all__ = ["build_ui", "mount_ui"]
