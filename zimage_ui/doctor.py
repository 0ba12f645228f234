"""``zimage-ui doctor``: what this machine has, where the model is, and what to do next. Loads no weights."""

from __future__ import annotations

import platform
from typing import Any

from .metadata import package_versions
from .settings import Settings
from .units import gib_text


def _gpu_section(settings: Settings) -> dict[str, Any]:
    import torch

    from .memory import nvml
    from .memory.planner import FP8_MIN_CAPABILITY, fp8_capable

    if not torch.cuda.is_available():
        return {"cuda": "not available — the demo model and CPU inference only (float32)",
                "torch build": torch.__version__}
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    stats = nvml.gpu_stats(index)
    return {
        "gpu": props.name, "compute capability": f"{props.major}.{props.minor}",
        "memory": f"{gib_text(total)} total, {gib_text(free)} free",
        "driver": getattr(stats, "driver_version", None) or "unknown (NVML not available)",
        "cuda (torch)": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported(),
        f"fp8 (compute ≥ {'.'.join(map(str, FP8_MIN_CAPABILITY))})": fp8_capable((props.major, props.minor)),
    }


def _model_section(settings: Settings) -> dict[str, Any]:
    from .models.sources import ModelNotFoundError, resolve_model

    try:
        resolution = resolve_model(settings.model, model_dir=settings.model_dir)
    except ModelNotFoundError as exc:
        return {"model": settings.model, "found": False, "problem": str(exc),
                "next": "zimage-ui download  (or --model PATH to a diffusers folder)"}
    source = resolution.source
    rows: dict[str, Any] = {"model": settings.model, "resolved": source.label,
                            "path": str(source.path) if source.path else "(built in memory)"}
    if resolution.banner:
        rows["note"] = resolution.banner
    rows["next"] = ("zimage-ui download, then zimage-ui serve" if source.is_demo
                    else f"zimage-ui serve  →  http://{settings.host}:{settings.port}")
    return rows


def _plan_section(settings: Settings) -> dict[str, Any]:
    import torch

    from .memory.planner import plan_for_device

    if not torch.cuda.is_available():
        return {"placement": "resident in CPU RAM (no GPU)"}
    result = plan_for_device(torch.device("cuda", torch.cuda.current_device()), budget_bytes=settings.vram_budget_bytes,
                             margin_bytes=settings.memory_margin_bytes)
    head, *options = result.lines()
    return {"chosen": result.chosen.name, "why": result.chosen.description, "budget": head,
            **{f"option {i + 1}": line for i, line in enumerate(options)}}


def _speed_section(settings: Settings) -> dict[str, Any]:
    import torch

    from .engine.acceleration import default_cache_dir, fp8_support

    cache = settings.cache_dir or default_cache_dir()
    calibrations = sorted(p.name for p in (cache / "estimator").glob("*.json"))  # empty when the folder is missing
    from .memory.allocator import configure

    if not settings.compile:
        compile_row = "off"
    elif not torch.cuda.is_available() or settings.device == "cpu":
        compile_row = "off (compile is for CUDA only; this machine runs on the CPU)"
    else:
        compile_row = "on (transformer blocks; first start ~1 min longer)"
    rows: dict[str, Any] = {
        "allocator": configure().describe() + ("; cache kept between jobs (--keep-cache)" if settings.keep_cache
                                               else "; cache given back when the queue is empty"),
        "compile": compile_row,
        "attention": settings.attention + (" (probed at start-up)" if settings.attention == "auto" else ""),
        "placement": settings.placement,
        "cache dir": str(cache),
        "compiled kernels cached": (cache / "inductor").is_dir(),
        "estimator calibrations": ", ".join(calibrations) or "none yet (made during the first warm-up)",
    }
    if torch.cuda.is_available():
        ok, why = fp8_support(torch.device("cuda", torch.cuda.current_device()))
        rows["fp8 mode"] = ("available" if ok else f"not available: {why}") + (" — on" if settings.fp8 else "")
    else:
        rows["fp8 mode"] = "not available: no CUDA GPU"
    return rows


def report(settings: Settings) -> dict[str, dict[str, Any]]:
    """Sections of facts for the doctor command (printed as text or JSON)."""
    return {
        "system": {"python": platform.python_version(), "platform": platform.platform(),
                   **package_versions()},
        "gpu": _gpu_section(settings),
        "model": _model_section(settings),
        "memory plan (1024², Turbo)": _plan_section(settings),
        "speed": _speed_section(settings),
    }
