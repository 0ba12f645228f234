"""The Gradio page (minimal first version; grows into the full layout)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from ..validation import GenerationRequest, RequestError


def build_page(engine: Any, settings: Any) -> gr.Blocks:
    """Prompt, Generate, gallery and a status line, wired to ``engine``."""
    from ..engine.jobs import EngineError

    def generate(prompt: str, request: gr.Request) -> Iterator[tuple[Any, str]]:
        try:
            job = engine.submit(GenerationRequest(prompt=prompt), owner=request.session_hash)
        except (RequestError, EngineError) as exc:
            yield gr.skip(), str(exc)
            return
        while not job.done:
            yield gr.skip(), engine.status(job).text
            time.sleep(0.25)
        try:
            result = job.wait(0)
        except EngineError as exc:
            yield gr.skip(), str(exc)
            return
        yield result.images, f"done in {result.timings.get('total_s', 0):.1f} s"

    with gr.Blocks(title="Z-Image") as demo:
        prompt = gr.Textbox(label="Prompt", elem_id="prompt")
        button = gr.Button("Generate", variant="primary", elem_id="generate-btn")
        status = gr.Markdown(elem_id="status")
        gallery = gr.Gallery(elem_id="gallery")
        button.click(generate, [prompt], [gallery, status], concurrency_limit=settings.max_queue + 1)
    return demo


def mount_page(app: Any, engine: Any, settings: Any, path: str = "/") -> None:
    """Mount the page on a FastAPI app."""
    demo = build_page(engine, settings)
    demo.queue(api_open=False, max_size=None)
    gr.mount_gradio_app(app, demo, path=path)
