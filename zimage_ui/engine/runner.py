"""Runs one job on the pipeline: prompt encode (cached), denoise with per-step progress and cancel, VAE decode.

The only module that calls the diffusers pipeline. It runs on the serial worker's thread.
"""

from __future__ import annotations

import collections
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..validation import RunRequest
from .jobs import Job, JobCancelled, JobFailed

log = logging.getLogger(__name__)


@dataclass
class RunOutput:
    images: list[Any]
    seeds: list[int]
    timings: dict[str, float]
    retried_tiled: bool = False


class PromptCache:
    """LRU of prompt embeddings: the same prompt with a new seed skips the text encoder."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = compute()
        with self._lock:
            self.misses += 1
            if self.size > 0:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def to_pil(images: torch.Tensor) -> list[Any]:
    """Decoded images in [0, 1] (N, C, H, W) → PIL: the same pixels as diffusers' ``output_type="pil"`` (float32
    ``(x * 255).round()`` to uint8), but computed on the device, so only uint8 bytes cross to the host."""
    from PIL import Image

    array = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class PipelineRunner:
    """Calls ``pipe`` for a job. ``fault_hook(request, attempt)`` is a test seam called once per denoise step."""

    def __init__(self, pipe: Any, device: torch.device, *, model_key: str, prompt_cache: PromptCache | None = None,
                 on_sample: Callable[[], None] | None = None):
        self.pipe = pipe
        self.device = device
        self.model_key = model_key
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache()
        self.on_sample = on_sample
        self.fault_hook: Callable[[RunRequest, int], None] | None = None
        self.ooms_recovered = 0

    # --- prompt -----------------------------------------------------------------------------------------------
    def _embed(self, text: str) -> list[torch.Tensor]:
        def compute() -> list[torch.Tensor]:
            with torch.no_grad():
                # _encode_prompt rewrites the list it is given (chat template), so hand it a fresh one
                return self.pipe._encode_prompt(prompt=[text], device=self.device)

        return self.prompt_cache.get((self.model_key, text), compute)

    def count_tokens(self, text: str) -> int:
        """Tokens the text encoder would see for ``text`` (chat template included)."""
        templated = self.pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True)
        return len(self.pipe.tokenizer(templated, truncation=False)["input_ids"])

    # --- run --------------------------------------------------------------------------------------------------
    def run(self, job: Job) -> RunOutput:
        """Run ``job``; on CUDA out-of-memory, free memory and retry once with a tiled, one-at-a-time decode."""
        try:
            return self._run_once(job, attempt=1)
        except JobCancelled:
            raise
        except Exception as exc:
            if not is_oom(exc):
                raise
            log.warning("out of memory on %s; retrying with VAE tiling", job.id)
        self.free_memory()
        try:
            output = self._run_once(job, attempt=2)
        except JobCancelled:
            raise
        except Exception as exc:
            if not is_oom(exc):
                raise
            self.free_memory()
            raise JobFailed(f"out of memory at {job.request.width}x{job.request.height} batch {job.request.batch} "
                            "even with a tiled decode; try a smaller size or batch", kind="oom") from None
        self.ooms_recovered += 1
        output.retried_tiled = True
        return output

    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _run_once(self, job: Job, attempt: int) -> RunOutput:
        req = job.request
        pipe = self.pipe
        t0 = time.perf_counter()
        prompt_embeds = self._embed(req.prompt)
        negative_embeds = self._embed(req.negative_prompt) if req.cfg else None
        t_encoded = time.perf_counter()
        step_marks: list[float] = []

        def on_step(p: Any, i: int, t: Any, kwargs: dict) -> dict:
            step_marks.append(time.perf_counter())
            job.mark_step(i + 1, req.steps)
            if self.on_sample is not None:
                self.on_sample()
            if self.fault_hook is not None:
                self.fault_hook(req, attempt)
            if job.cancel_requested:
                p._interrupt = True  # the pipeline's own flag; raising also skips the VAE decode
                raise JobCancelled(job.id)
            return kwargs

        generators = [torch.Generator(self.device.type).manual_seed(s) for s in req.seeds()]
        tiled = attempt > 1
        result = pipe(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
            num_images_per_prompt=req.batch, height=req.height, width=req.width,
            num_inference_steps=req.steps, guidance_scale=req.guidance, generator=generators,
            callback_on_step_end=on_step, output_type="latent" if tiled else "pt",
        ).images
        images = self._decode_tiled(result) if tiled else to_pil(result)
        t_end = time.perf_counter()
        steps_s = (step_marks[-1] - t_encoded) if step_marks else 0.0
        timings = {
            "encode_s": t_encoded - t0,
            "denoise_s": steps_s,
            "decode_s": t_end - (step_marks[-1] if step_marks else t_encoded),
            "total_s": t_end - t0,
            "per_step_s": steps_s / max(len(step_marks), 1),
        }
        return RunOutput(images=images, seeds=req.seeds(), timings=timings)

    def _decode_tiled(self, latents: torch.Tensor) -> list[Any]:
        """Decode one latent at a time with VAE tiling: the fallback after an out-of-memory."""
        pipe = self.pipe
        vae = pipe.vae
        vae.enable_tiling()
        try:
            images = []
            for one in latents.split(1):
                with torch.no_grad():
                    one = one.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
                    decoded = vae.decode(one, return_dict=False)[0]
                images.extend(pipe.image_processor.postprocess(decoded, output_type="pil"))
            return images
        finally:
            vae.disable_tiling()
