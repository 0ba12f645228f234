"""Runs one job on the pipeline: prompt encode (cached), denoise with per-step progress and cancel, VAE decode.

The only module that calls the diffusers pipeline. It runs on the serial worker's thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..messages import Message
from ..validation import RunRequest
from .jobs import Job, JobCancelled, JobFailed

log = logging.getLogger(__name__)


@dataclass
class RunOutput:
    images: list[Any]
    seeds: list[int]
    timings: dict[str, float]
    recovered: list[Message] = field(default_factory=list)  # what each out-of-memory recovery did: the job's notes


class RunMemory:
    """What the runner asks of the engine about memory. The default knows nothing (CPU tests, bare runners)."""

    def reset_peak(self) -> None:
        """Start measuring a new phase's peak."""

    def peak_working(self) -> int:
        """Peak working bytes since the last :meth:`reset_peak`."""
        return 0

    def available(self) -> int | None:
        """Working bytes a decode may use now (cap and live free memory counted); None = unknown."""
        return None

    def out_of_memory(self, request: RunRequest, phase: str, need_at_least: int) -> None:
        """An out-of-memory error in ``phase`` ("denoise" or "decode") that needed at least ``need_at_least``."""

    def free(self) -> None:
        """Give cached memory back before the denoise runs again."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def decode_plan(self, request: RunRequest, available: int | None, after: Any) -> Any:
        """The next, smaller decode plan after ``after`` failed (``memory.estimator.plan_decode``), or None."""
        from ..memory.estimator import WorkShape, decode_fallbacks

        shape = WorkShape(request.width, request.height, request.batch, request.cfg)
        options = decode_fallbacks(shape, after)
        return options[0] if options else None


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


def encode_prompt(pipe: Any, text: str, device: torch.device, max_sequence_length: int = 512) -> list[torch.Tensor]:
    """``ZImagePipeline._encode_prompt`` for one prompt, without the key/value cache the text encoder would fill
    for nothing (36 layers × 512 tokens): the same chat template, padding to ``max_sequence_length``, the
    second-to-last hidden state, the padding dropped. Same numbers as the pipeline's (``tests/engine``)."""
    templated = pipe.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=True)
    inputs = pipe.tokenizer([templated], padding="max_length", max_length=max_sequence_length, truncation=True,
                            return_tensors="pt")
    ids = inputs.input_ids.to(device)
    mask = inputs.attention_mask.to(device).bool()
    with torch.no_grad():
        hidden = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                   use_cache=False).hidden_states[-2]
    return [hidden[0][mask[0]]]


def to_pil(images: torch.Tensor) -> list[Any]:
    """Decoded images in [0, 1] (N, C, H, W) → PIL: the same pixels as diffusers' ``output_type="pil"`` (float32
    ``(x * 255).round()`` to uint8), but computed on the device, so only uint8 bytes cross to the host."""
    from PIL import Image

    array = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class PipelineRunner:
    """Calls ``pipe`` for a job. Test seams: ``fault_hook(request, attempt)`` is called once per denoise step,
    ``decode_fault_hook(request, plan)`` before each VAE call (raise an out-of-memory error there to test the
    fallback)."""

    def __init__(self, pipe: Any, device: torch.device, *, model_key: str, prompt_cache: PromptCache | None = None,
                 on_sample: Callable[[], None] | None = None, memory: RunMemory | None = None):
        self.pipe = pipe
        self.device = device
        self.model_key = model_key
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache()
        self.on_sample = on_sample
        self.fault_hook: Callable[[RunRequest, int], None] | None = None
        self.decode_fault_hook: Callable[[RunRequest, Any], None] | None = None
        self.memory = memory if memory is not None else RunMemory()
        self.ooms_recovered = 0
        self.denoise_peak = 0

    # --- prompt -----------------------------------------------------------------------------------------------
    def _embed(self, text: str) -> list[torch.Tensor]:
        return self.prompt_cache.get((self.model_key, text), lambda: encode_prompt(self.pipe, text, self.device))

    def count_tokens(self, text: str) -> int:
        """Tokens the text encoder would see for ``text`` (chat template included)."""
        templated = self.pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True)
        return len(self.pipe.tokenizer(templated, truncation=False)["input_ids"])

    # --- run --------------------------------------------------------------------------------------------------
    def run(self, job: Job, *, decode_batch: int | None = None) -> RunOutput:
        """Run ``job``: denoise to latents, then decode ``decode_batch`` images per VAE call (all by default).

        Out of memory in the denoise: learn, free the cache and run once more, then fail clearly. Out of memory in
        the decode: learn, then decode what is left with a smaller plan — fewer images per call, then tiles —
        keeping the latents and the images already decoded, until even the smallest tile fails.
        """
        recovered: list[Message] = []
        for attempt in (1, 2):
            denoised, failed = _attempt(self._denoise, job, attempt)
            if failed is None:
                latents, timings = denoised
                break
            # the failed run's tensors went with the error's traceback: the cache can hand them back now
            self.memory.out_of_memory(job.request, "denoise", self.memory.peak_working() + failed)
            self.memory.free()
            if attempt == 2:
                req = job.request
                raise JobFailed(Message("failure.oom_denoise", {"width": req.width, "height": req.height,
                                                                "batch": req.batch}), kind="oom")
            log.warning("out of memory in the denoise of %s; freed the cache, running it again", job.id)
            recovered.append(Message("note.oom_denoise_retry"))
        t_decode = time.perf_counter()
        images = self._decode_all(job, latents, decode_batch, recovered)
        t_end = time.perf_counter()
        timings["decode_s"] = t_end - t_decode + timings.pop("_to_decode_s")
        timings["total_s"] = t_end - timings.pop("_t0")
        self.ooms_recovered += bool(recovered)
        return RunOutput(images=images, seeds=job.request.seeds(), timings=timings, recovered=recovered)

    def _denoise(self, job: Job, attempt: int) -> tuple[torch.Tensor, dict[str, float]]:
        req = job.request
        pipe = self.pipe
        self.memory.reset_peak()
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
                p._interrupt = True  # the pipeline's own flag
                raise JobCancelled(job.id)
            return kwargs

        generators = [torch.Generator(self.device.type).manual_seed(s) for s in req.seeds()]
        latents = pipe(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
            num_images_per_prompt=req.batch, height=req.height, width=req.width,
            num_inference_steps=req.steps, guidance_scale=req.guidance, generator=generators,
            callback_on_step_end=on_step, output_type="latent",
        ).images
        t_latents = time.perf_counter()
        steps_s = (step_marks[-1] - t_encoded) if step_marks else 0.0
        timings = {
            "encode_s": t_encoded - t0,
            "denoise_s": steps_s,
            "per_step_s": steps_s / max(len(step_marks), 1),
            # the scheduler's last step to the latents: counted with the decode, as before
            "_to_decode_s": t_latents - (step_marks[-1] if step_marks else t_encoded),
            "_t0": t0,
        }
        self.denoise_peak = self.memory.peak_working()
        return latents, timings

    def _decode_all(self, job: Job, latents: torch.Tensor, decode_batch: int | None,
                    recovered: list[Message]) -> list[Any]:
        from ..memory.estimator import DecodePlan

        req = job.request
        plan = DecodePlan(min(decode_batch or req.batch, req.batch))
        first = plan
        images: list[Any] = []
        self.memory.reset_peak()
        while len(images) < len(latents):
            decoded, failed = _attempt(self._decode_chunk, req, latents[len(images):len(images) + plan.chunk], plan)
            if failed is None:
                images.extend(decoded)
            else:
                # the half-decoded tensors went with the error's traceback, back into the allocator's cache, where
                # the smaller decode re-uses them at once. No gc.collect() or empty_cache() here: they cost more
                # than the decode (docs/benchmarks.md).
                self.memory.out_of_memory(req, "decode", self.memory.peak_working() + failed)
                nxt = self.memory.decode_plan(req, self.memory.available(), plan)
                if nxt is None:
                    raise JobFailed(Message("failure.oom_decode", {"width": req.width, "height": req.height}),
                                    kind="oom") from None
                log.warning("out of memory decoding %s with %s; going on with %s", job.id, plan.describe(),
                            nxt.describe())
                plan = nxt
                self.memory.reset_peak()
        if plan != first:
            recovered.append(Message("note.oom_decode", {"plan": plan.message}))
        return images

    def _decode_chunk(self, request: RunRequest, latents: torch.Tensor, plan: Any) -> list[Any]:
        if self.decode_fault_hook is not None:
            self.decode_fault_hook(request, plan)
        return self._decode(latents, plan.tile)

    def _decode(self, latents: torch.Tensor, tile: int | None) -> list[Any]:
        """Decode latents as ``ZImagePipeline`` does (same arithmetic, same pixels), optionally tiled."""
        pipe = self.pipe
        vae = pipe.vae
        saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
        if tile is not None:
            vae.use_tiling = True
            vae.tile_sample_min_size = tile
            vae.tile_latent_min_size = max(1, tile // pipe.vae_scale_factor)
        try:
            with torch.no_grad():
                scaled = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
                decoded = vae.decode(scaled, return_dict=False)[0]
                image = pipe.image_processor.postprocess(decoded, output_type="pt")
            return to_pil(image)
        finally:
            vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved


def _attempt(fn: Callable[..., Any], *args: Any) -> tuple[Any, int | None]:
    """``(fn(*args), None)``, or ``(None, bytes the failed allocation asked for)`` when ``fn`` runs out of memory.
    Returning from here drops the error and its traceback, and with them the failed run's tensors."""
    try:
        return fn(*args), None
    except JobCancelled:
        raise
    except Exception as exc:
        if not is_oom(exc):
            raise
        return None, tried_bytes(exc)


def tried_bytes(exc: BaseException) -> int:
    """How much the failed allocation asked for (0 when the message does not say)."""
    from ..memory.allocator import parse_tried_bytes

    return parse_tried_bytes(str(exc))
