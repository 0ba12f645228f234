"""Put a loaded pipeline where the planner said (:mod:`zimage_ui.memory.planner`), cap this process's VRAM, and
release / restore the GPU for idle unload.

Placements (the planner's ``PLACEMENTS``, the one list of their names):

``resident``
    every component on the GPU.
``text-encoder-offload``
    transformer and VAE on the GPU; the text encoder stays in (pinned) CPU RAM and is streamed to the GPU one
    decoder layer at a time while a *new* prompt is encoded (diffusers group offloading on a side stream). With the
    prompt cache, a repeated prompt never touches it.
``fp8-storage``
    as above, and the transformer's weights stored as float8_e4m3fn, upcast layer by layer to bf16 to compute
    (``enable_layerwise_casting``): half the transformer's memory, bf16 arithmetic.
``model-offload``
    ``enable_model_cpu_offload()``: each component moves whole to the GPU when called.
``sequential-offload``
    the transformer *and* the text encoder streamed block by block (group offloading, one block ahead on a side
    stream, pinned memory): the smallest footprint that still keeps the GPU busy. This is diffusers' faster
    equivalent of ``enable_sequential_cpu_offload()`` (which moves every leaf synchronously).

Only ``resident`` and ``text-encoder-offload`` leave the transformer free of hooks, so only they are compiled.
The VRAM budget is the allocator's business: :mod:`zimage_ui.memory.allocator`.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..memory.planner import PLACEMENTS

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "text_encoder", "vae")
COMPILABLE = frozenset({"resident", "text-encoder-offload"})


def normalize_placement(name: str) -> str:
    """``auto`` or one of the planner's :data:`~zimage_ui.memory.planner.PLACEMENTS` (underscores and a missing
    ``-offload`` are forgiven)."""
    text = (name or "auto").strip().lower().replace("_", "-")
    if text == "auto":
        return text
    aliases = {"sequential": "sequential-offload", "model": "model-offload", "fp8": "fp8-storage",
               "te-offload": "text-encoder-offload", "text-encoder": "text-encoder-offload"}
    text = aliases.get(text, text)
    if text not in PLACEMENTS:
        raise ValueError(f"placement: unknown {name!r}; use auto or one of {', '.join(PLACEMENTS)}")
    return text


@dataclass
class AppliedPlacement:
    """What :func:`apply_placement` did: which components live on the GPU between jobs and which are streamed."""

    name: str
    device: str
    resident: tuple[str, ...]  # moved to the GPU; idle unload moves these (and only these) back to the CPU
    streamed: tuple[str, ...] = ()  # hooks bring them to the GPU while they run
    compile_allowed: bool = True
    seconds: float = 0.0
    budget_bytes: int | None = None
    budget_fraction: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stream(module: torch.nn.Module, device: torch.device) -> None:
    from diffusers.hooks import apply_group_offloading

    module.to("cpu")
    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=True, record_stream=True)


def apply_placement(pipe: Any, name: str, device: torch.device,
                    components: tuple[str, ...] = COMPONENTS) -> AppliedPlacement:
    """Move ``pipe``'s components for placement ``name`` on ``device``. The pipeline may start anywhere (CPU or
    GPU); on a CPU device every placement is plain ``resident``. ``components`` narrows the work to some of them
    (a base model's own transformer beside shared text encoder and VAE)."""
    name = normalize_placement(name)
    if name == "auto":
        raise ValueError("apply_placement needs a concrete placement; ask the planner first")
    t0 = time.perf_counter()
    if device.type != "cuda":
        for part in components:
            getattr(pipe, part).to(device)
        return AppliedPlacement("resident", str(device), tuple(components), seconds=time.perf_counter() - t0,
                                notes=[] if name == "resident" else [f"{name} ignored on {device.type}"])
    if name == "model-offload" and set(components) != set(COMPONENTS):
        raise ValueError("placement: model-offload moves whole pipelines; use another placement with --base-model")
    streamed_by = {
        "resident": (),
        "text-encoder-offload": ("text_encoder",),
        "fp8-storage": ("text_encoder",),
        "model-offload": COMPONENTS,
        "sequential-offload": ("text_encoder", "transformer"),
    }[name]
    applied = AppliedPlacement(name, str(device), (), compile_allowed=name in COMPILABLE)
    if name == "model-offload":
        pipe.to("cpu")
        pipe.enable_model_cpu_offload(device=device)
    else:
        if name == "fp8-storage" and "transformer" in components:
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                      compute_dtype=torch.bfloat16)
        for part in components:
            if part in streamed_by:
                _stream(getattr(pipe, part), device)
            else:
                getattr(pipe, part).to(device)
    applied.streamed = tuple(c for c in components if c in streamed_by)
    applied.resident = tuple(c for c in components if c not in streamed_by)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    applied.seconds = time.perf_counter() - t0
    return applied


def unload(pipe: Any, applied: AppliedPlacement) -> None:
    """Idle unload: move the GPU-resident components to CPU RAM and return the allocator's cache to the driver.

    Streamed components already live in CPU RAM between calls. The CUDA context (~0.5 GB) stays: releasing it
    would need a new process.
    """
    for name in applied.resident:
        getattr(pipe, name).to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reload(pipe: Any, applied: AppliedPlacement) -> float:
    """Undo :func:`unload`; returns the seconds it took (synchronised)."""
    t0 = time.perf_counter()
    device = torch.device(applied.device)
    for name in applied.resident:
        getattr(pipe, name).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
