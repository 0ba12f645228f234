"""What warm-up runs before the engine says ready: a pure plan (``warmup_plan``), run by ``Engine`` on its worker.

    >>> from zimage_ui.presets import load_presets
    >>> plan = warmup_plan(load_presets(), device_type="cpu", is_demo=True)
    >>> [(s.request.width, s.request.height, s.purpose) for s in plan]
    [(1024, 1024, 'kernels'), (512, 512, 'kernels')]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from ..validation import RunRequest

if TYPE_CHECKING:
    from ..presets import PresetBook
    from ..sizes import SizeTable

# Long enough (> 32 tokens after the chat template) that prompt and negative prompt pad to different lengths, so
# the CFG warm-up run takes the transformer's masked attention path.
LONG_PROMPT = " ".join(["a bright red circle beside a small blue square on a white field"] * 4)
PURPOSES = ("kernels", "graph", "calibration")


class WarmupStep(NamedTuple):
    """One warm-up run and why: ``kernels`` (always run), ``graph`` (a compiled graph of its own: skipped when a
    saved calibration is loaded and nothing is compiled) or ``calibration`` (a peak for the memory estimator only:
    skipped when a saved calibration is loaded)."""

    request: RunRequest
    purpose: str


def warmup_plan(book: PresetBook, *, device_type: str, is_demo: bool,
                sizes: SizeTable | None = None) -> list[WarmupStep]:
    """The warm-up runs for ``book`` (the presets in force) on a ``device_type`` device.

    CUDA: the default size; one short run per size class the presets offer (1:1); the smallest and largest class at
    batch 2 and at the largest batch (the corners of what users can ask for, so the estimator interpolates instead
    of extrapolating); the default size with CFG (masked attention); then one full default-preset run. Elsewhere
    (the demo model on a CPU): the default size and half of it, two steps each, well under 2 s.
    ``sizes``: the size table (default: ``sizes.load_sizes()``)."""
    preset = book.presets[book.default]
    low, high = book.limits.side

    def req(width: int, height: int, batch: int = 1, guidance: float = 0.0, steps: int = 1,
            prompt: str = "warm up", negative: str = "") -> RunRequest:
        return RunRequest(prompt=prompt, negative_prompt=negative, preset=preset.name, steps=steps,
                          guidance=guidance, width=width, height=height, seed=0, batch=batch)

    default = (preset.width, preset.height)
    if device_type != "cuda":
        half = (max(low, preset.width // 2 // 16 * 16), max(low, preset.height // 2 // 16 * 16))
        return [WarmupStep(req(w, h, steps=min(2, preset.steps)), "kernels") for w, h in dict.fromkeys([default, half])]
    if sizes is None:
        from ..sizes import load_sizes

        sizes = load_sizes()
    sides = set()
    for name in sizes.classes(demo=is_demo, max_side=high):
        w, h = sizes.sizes[name].get("1:1", next(iter(sizes.sizes[name].values())))
        if low <= min(w, h) and max(w, h) <= high:
            sides.add((w, h))
    ordered = sorted(sides | {default})
    small, large = ordered[0], ordered[-1]
    top = book.limits.batch[1]
    plan = [WarmupStep(req(*default), "kernels")]
    plan += [WarmupStep(req(w, h), "calibration") for w, h in ordered if (w, h) != default]
    plan += [WarmupStep(req(*small, batch=2), "graph"), WarmupStep(req(*small, batch=top), "calibration"),
             WarmupStep(req(*large, batch=2), "calibration"), WarmupStep(req(*large, batch=top), "calibration"),
             WarmupStep(req(*default, guidance=1.0, prompt=LONG_PROMPT), "graph")]
    # last, exactly what most first requests are: the default preset at full steps
    plan.append(WarmupStep(req(*default, steps=preset.steps, guidance=preset.guidance, prompt=LONG_PROMPT), "kernels"))
    return plan


def steps_to_run(plan: list[WarmupStep], *, calibration_loaded: bool, compiled: bool) -> list[WarmupStep]:
    """The plan less what a saved calibration makes needless: its calibration runs, and its graph runs unless
    something is compiled (a graph still needs its own run to compile).

    >>> from zimage_ui.presets import load_presets
    >>> plan = warmup_plan(load_presets(), device_type="cuda", is_demo=False)
    >>> sorted({s.purpose for s in steps_to_run(plan, calibration_loaded=True, compiled=False)})
    ['kernels']
    """
    if not calibration_loaded:
        return list(plan)
    return [step for step in plan if step.purpose == "kernels" or (step.purpose == "graph" and compiled)]
