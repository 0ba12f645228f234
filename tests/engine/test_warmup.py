"""Warm-up as a pure plan: what runs before ready, for which device and presets (no model needed)."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from zimage_ui.engine.engine import Engine
from zimage_ui.engine.warmup import PURPOSES, WarmupStep, steps_to_run, warmup_plan
from zimage_ui.presets import load_presets
from zimage_ui.settings import Settings
from zimage_ui.sizes import load_sizes


def _dims(plan: list[WarmupStep]) -> list[tuple[int, int, int]]:
    return [(s.request.width, s.request.height, s.request.batch) for s in plan]


def test_cpu_warms_the_default_size_and_half_of_it_in_few_steps():
    book = load_presets()
    preset = book.presets[book.default]
    plan = warmup_plan(book, device_type="cpu", is_demo=True)
    assert _dims(plan) == [(preset.width, preset.height, 1), (preset.width // 2, preset.height // 2, 1)]
    assert all(s.purpose == "kernels" and s.request.steps <= 2 and s.request.preset == book.default for s in plan)


def test_cpu_plan_never_goes_below_the_smallest_side_nor_repeats_a_run():
    book = load_presets()
    small = dataclasses.replace(book, presets={n: dataclasses.replace(p, width=256, height=256)
                                               for n, p in book.presets.items()})
    plan = warmup_plan(small, device_type="cpu", is_demo=True)
    assert _dims(plan) == [(256, 256, 1)]  # half of 256 is below the limit: one run, not two of the same


@pytest.mark.parametrize("max_side", [2048, 1024])
def test_cuda_plan_covers_every_offered_size_and_the_batch_corners(max_side):
    book = load_presets(max_side=max_side)
    preset = book.presets[book.default]
    low, high = book.limits.side
    top = book.limits.batch[1]
    plan = warmup_plan(book, device_type="cuda", is_demo=False)
    assert {s.purpose for s in plan} <= set(PURPOSES)
    assert all(low <= min(s.request.width, s.request.height) and max(s.request.width, s.request.height) <= high
               for s in plan)
    first, last = plan[0], plan[-1]
    assert first.purpose == "kernels" and _dims([first]) == [(preset.width, preset.height, 1)]
    # last: what most first requests are, the default preset at full steps
    assert last.purpose == "kernels" and last.request.steps == preset.steps
    assert last.request.guidance == preset.guidance
    offered = {load_sizes().sizes[c]["1:1"] for c in load_sizes().classes(demo=False, max_side=high)}
    singles = {(w, h) for w, h, b in _dims(plan) if b == 1}
    assert offered <= singles
    squares = sorted(offered | {(preset.width, preset.height)})
    for corner in (squares[0], squares[-1]):
        assert (*corner, top) in _dims(plan)  # the estimator interpolates, never extrapolates
    assert any(s.request.cfg and s.purpose == "graph" for s in plan)  # the masked-attention path


def test_demo_only_sizes_are_warmed_only_for_the_demo_model():
    table = load_sizes()
    if not table.demo_only:
        pytest.skip("no demo-only size class in the table")
    book = load_presets()
    demo_sides = {(w, h) for w, h, _ in _dims(warmup_plan(book, device_type="cuda", is_demo=True))}
    full_sides = {(w, h) for w, h, _ in _dims(warmup_plan(book, device_type="cuda", is_demo=False))}
    assert full_sides < demo_sides


def test_a_saved_calibration_skips_what_only_served_it():
    plan = warmup_plan(load_presets(), device_type="cuda", is_demo=False)
    assert steps_to_run(plan, calibration_loaded=False, compiled=False) == plan
    kept = steps_to_run(plan, calibration_loaded=True, compiled=False)
    assert {s.purpose for s in kept} == {"kernels"} and len(kept) == 2
    compiled = steps_to_run(plan, calibration_loaded=True, compiled=True)
    assert {s.purpose for s in compiled} == {"kernels", "graph"}
    assert [s for s in plan if s in compiled] == compiled  # order kept


def test_warm_up_runs_the_plan_on_the_worker_thread(monkeypatch):
    seen = []
    e = Engine(Settings(model="demo", save_images=False))
    real = e.warmup_plan
    monkeypatch.setattr(e, "warmup_plan", lambda: seen.append(threading.current_thread().name) or real())
    e.start()
    try:
        assert seen == ["zimage-gpu-worker"] and e.ready
        runs = e.warmup_runs
        assert [r["shape"] for r in runs] == [str(_shape(s)) for s in real()]
    finally:
        e.shutdown(0)


def _shape(step: WarmupStep):
    from zimage_ui.memory.estimator import WorkShape

    r = step.request
    return WorkShape(r.width, r.height, r.batch, r.cfg)
