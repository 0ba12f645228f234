"""Start-up's heavy half: resolve and load the weights, place them on the device, accelerate. ``boot`` returns a
:class:`Runtime`, the value the engine runs on; the engine then builds its probe, runners and worker around it and
warms up (``engine/warmup.py``).

Nothing here keeps state: the allocator and the VRAM budget stay the engine's (``rebudget`` is its callback).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..presets import PresetBook
from ..settings import Settings

if TYPE_CHECKING:
    from ..memory.planner import PlanResult

log = logging.getLogger(__name__)

DEMO_DEFAULT_SIDE = 256  # the demo model's default size: what it is trained for (models/demo.py, TRAINED_SIDE)


@dataclasses.dataclass
class Runtime:
    """What start-up built, read by the engine (``engine.model``, ``engine.placement``... are views of it)."""

    model: Any  # models.loading.LoadedModel: the Turbo weights (or the demo / synthetic model)
    book: PresetBook  # the presets in force (the demo model: its smaller default size)
    base_model: Any = None  # models.loading.LoadedModel of --base-model, sharing the rest with ``model``
    placement: Any = None  # engine.placement.AppliedPlacement
    acceleration: Any = None  # engine.acceleration.AccelerationReport
    banner: str | None = None  # what the model source wants users told (the demo model says so)
    plan: PlanResult | None = None  # the planner's reasoning when it chose the placement (``auto``)
    load_seconds: float = 0.0
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # load_s, placement_s, ... ready_s


def book_for_model(book: PresetBook, *, is_demo: bool) -> PresetBook:
    """The presets as this model runs them: the demo model defaults to the size it is trained for.

    >>> from zimage_ui.presets import load_presets
    >>> book_for_model(load_presets(), is_demo=True).presets["turbo"].width
    256
    """
    if not is_demo:
        return book
    side = DEMO_DEFAULT_SIDE
    presets = {n: dataclasses.replace(p, width=min(p.width, side), height=min(p.height, side))
               for n, p in book.presets.items()}
    return dataclasses.replace(book, presets=presets)


def choose_placement(settings: Settings, device: Any, book: PresetBook, *, demo: bool,
                     budget: Any = None) -> tuple[str, PlanResult | None]:
    """The placement setting, or (``auto``) the planner's choice for this device and VRAM budget (and its plan).
    ``budget``: the engine's ``memory.allocator.ProcessBudget`` when a VRAM budget is set."""
    from .placement import normalize_placement

    setting = normalize_placement(settings.placement)
    if device.type != "cuda" or demo:
        return "resident", None  # CPU RAM, or the tiny demo model: nothing to plan
    if setting != "auto":
        return setting, None
    import torch

    from ..memory.estimator import WorkShape
    from ..memory.planner import CUDA_CONTEXT_BYTES, plan_for_device

    budget_bytes = settings.vram_budget_bytes
    if budget_bytes is None:  # the whole card: what other processes (an LLM server) already hold counts against us
        free, total = torch.cuda.mem_get_info(device)
        overhead = max(int(total - free), CUDA_CONTEXT_BYTES)
    else:  # the budget holds our CUDA context too (measured before loading) and its growth
        overhead = budget.outside_bytes + budget.headroom_bytes if budget is not None else CUDA_CONTEXT_BYTES
    preset = book.presets[book.default]
    result = plan_for_device(device, budget_bytes=budget_bytes, overhead_bytes=overhead,
                             shape=WorkShape(preset.width, preset.height), margin_bytes=settings.memory_margin_bytes)
    for line in result.lines():
        log.info("plan: %s", line)
    return result.chosen.name, result


def boot(settings: Settings, book: PresetBook, device: Any, *, cache_dir: Path,
         loader: Callable[[Settings, Any], Any] | None = None, allocator: Any = None, budget: Any = None,
         rebudget: Callable[[], Any] | None = None) -> Runtime:
    """Load, place and accelerate the model(s) for ``settings`` on ``device``; the :class:`Runtime`.

    ``loader(settings, device)`` replaces resolution and loading (the benchmark's synthetic model, built on the
    device). ``allocator`` / ``budget``: the engine's allocator control and VRAM budget (None without one); a
    synthetic model placed off the device lifts the cap while it is built, then ``rebudget()`` caps again and
    returns the new budget."""
    from ..models.loading import load_model, pick_dtype
    from ..models.sources import resolve_model
    from . import placement as placing
    from .acceleration import accelerate

    banner = None
    t0 = time.perf_counter()
    if loader is not None:
        name, plan = choose_placement(settings, device, book, demo=False, budget=budget)
        if name != "resident" and budget is not None:
            # the benchmark's synthetic model is built on the device, whatever the placement: lift the cap while
            # it is built, then (below) place it and cap again. Real weights load to CPU RAM.
            allocator.set_cap(None)
        model = loader(settings, device)
    else:
        resolution = resolve_model(settings.model, model_dir=settings.model_dir)
        banner = resolution.banner
        name, plan = choose_placement(settings, device, book, demo=resolution.source.is_demo, budget=budget)
        # A placement that keeps weights off the GPU loads to CPU RAM first, so loading never needs the whole
        # model's VRAM.
        load_device: Any = device if name == "resident" else "cpu"
        dtype = settings.dtype if name == "resident" else pick_dtype(device, settings.dtype)
        model = load_model(resolution.source, device=load_device, dtype=dtype)
    base_model = None
    if settings.base_model:
        base = resolve_model(settings.base_model, model_dir=None).source
        base_model = load_model(base, device=model.device, dtype=model.dtype, share_from=model)
    load_seconds = time.perf_counter() - t0
    stages = {"load_s": model.load_seconds, "to_device_s": model.to_device_seconds}

    t0 = time.perf_counter()
    placement = placing.apply_placement(model.pipe, name, device)
    if base_model is not None:
        placing.apply_placement(base_model.pipe, name, device, components=("transformer",))
    for loaded in (model, base_model):
        if loaded is not None:
            loaded.device = device
    if budget is not None:
        if loader is not None and name != "resident" and rebudget is not None:
            allocator.release()
            budget = rebudget()
        placement.budget_bytes = budget.budget_bytes
        placement.budget_fraction = budget.fraction
    stages["placement_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    preset = book.presets[book.default]
    common = dict(compile=settings.compile, fp8=settings.fp8, cache_dir=cache_dir,
                  compile_allowed=placement.compile_allowed)
    acceleration = accelerate(model.pipe, device, attention=settings.attention, compile_vae=settings.compile_vae,
                              width=preset.width, height=preset.height, **common,
                              vae_sizes={(p.width, p.height) for p in book.presets.values()})
    if base_model is not None:
        accelerate(base_model.pipe, device, choice=acceleration.attention, compile_vae=False, **common)
    stages["accelerate_s"] = time.perf_counter() - t0
    return Runtime(model=model, book=book_for_model(book, is_demo=model.is_demo), base_model=base_model,
                   placement=placement, acceleration=acceleration, banner=banner, plan=plan,
                   load_seconds=load_seconds, stage_seconds=stages)
