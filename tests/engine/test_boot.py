"""Start-up's pure parts (engine/boot.py): which placement, which presets; the whole boot runs in test_engine."""

from __future__ import annotations

import types

import pytest

from zimage_ui.engine.boot import DEMO_DEFAULT_SIDE, Runtime, book_for_model, choose_placement
from zimage_ui.presets import load_presets
from zimage_ui.settings import Settings

CPU, CUDA = types.SimpleNamespace(type="cpu"), types.SimpleNamespace(type="cuda")


@pytest.mark.parametrize(("device", "demo", "setting", "expected"), [
    (CPU, False, "auto", "resident"),  # CPU RAM: nothing to plan
    (CPU, False, "model-offload", "resident"),
    (CUDA, True, "auto", "resident"),  # the tiny demo model
    (CUDA, False, "model", "model-offload"),  # an explicit setting, alias forgiven, no planner
    (CUDA, False, "fp8_storage", "fp8-storage"),
])
def test_placement_without_the_planner(device, demo, setting, expected):
    name, plan = choose_placement(Settings(model="demo", placement=setting), device, load_presets(), demo=demo)
    assert (name, plan) == (expected, None)


def test_an_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="placement: unknown"):
        choose_placement(Settings.model_construct(placement="everywhere"), CUDA, load_presets(), demo=False)


def test_the_demo_model_defaults_to_the_size_it_is_trained_for():
    book = load_presets()
    demo = book_for_model(book, is_demo=True)
    assert book_for_model(book, is_demo=False) is book
    for name, preset in demo.presets.items():
        original = book.presets[name]
        assert (preset.width, preset.height) == (min(original.width, DEMO_DEFAULT_SIDE),
                                                 min(original.height, DEMO_DEFAULT_SIDE))
        assert (preset.steps, preset.guidance) == (original.steps, original.guidance)
    assert demo.limits == book.limits  # only the defaults move; a user may still ask for more


def test_a_runtime_before_and_after_start():
    from zimage_ui.engine.engine import Engine

    engine = Engine(Settings(model="demo", save_images=False))
    info = engine.model_info()
    assert (engine.model, engine.placement, info["load_seconds"], info["stages"]) == (None, None, 0.0, {})
    runtime = Runtime(model=types.SimpleNamespace(is_demo=True), book=load_presets(), load_seconds=1.5)
    engine.test_seam().runtime = runtime
    assert engine.model is runtime.model and engine.presets() is runtime.book
    with pytest.raises(AttributeError):
        engine.model = None  # what start-up built is read, never set from outside
