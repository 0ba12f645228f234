"""Placement names, the CPU path, the VRAM budget helper, idle unload and reload, the worker's call(), the
device-side PIL conversion and the prompt cache's size — on the demo model, no GPU needed."""

import threading

import numpy as np
import pytest
import torch

from zimage_ui.engine import placement as placing
from zimage_ui.engine.engine import Engine
from zimage_ui.engine.jobs import JobResult
from zimage_ui.engine.runner import PromptCache, to_pil
from zimage_ui.engine.worker import SerialWorker
from zimage_ui.models.demo import build_demo_pipeline
from zimage_ui.settings import Settings

from ..support import demo_engine, wait_until

REQ = {"prompt": "a red circle", "width": 256, "height": 256, "seed": 3}


@pytest.mark.parametrize("text, name", [("auto", "auto"), ("resident", "resident"), ("fp8", "fp8-storage"),
                                        ("sequential", "sequential-offload"), ("te_offload", "text-encoder-offload"),
                                        ("Model_Offload", "model-offload")])
def test_placement_names_are_forgiving(text, name):
    assert placing.normalize_placement(text) == name


def test_unknown_placement_names_the_choices():
    with pytest.raises(ValueError, match="placement: unknown 'gpu-please'.*resident"):
        placing.normalize_placement("gpu-please")


def test_the_planners_placements_are_the_names_the_setting_takes():
    from zimage_ui.memory.planner import PLACEMENTS

    assert [placing.normalize_placement(name) for name in PLACEMENTS] == list(PLACEMENTS)
    with pytest.raises(ValueError) as refused:
        placing.normalize_placement("nope")
    assert str(refused.value).endswith("use auto or one of " + ", ".join(PLACEMENTS))  # fastest first


def test_on_the_cpu_every_placement_is_resident():
    pipe = build_demo_pipeline()
    applied = placing.apply_placement(pipe, "sequential-offload", torch.device("cpu"))
    assert applied.name == "resident" and applied.resident == placing.COMPONENTS
    assert "ignored" in applied.notes[0] and applied.compile_allowed
    placing.unload(pipe, applied)
    assert placing.reload(pipe, applied) >= 0.0


def test_to_pil_gives_diffusers_pixels():
    pipe = build_demo_pipeline()
    kw = dict(prompt="a red circle", height=128, width=128, num_inference_steps=2, guidance_scale=0.0)
    pt = pipe(**kw, output_type="pt", generator=torch.Generator("cpu").manual_seed(1)).images
    pil = pipe(**kw, output_type="pil", generator=torch.Generator("cpu").manual_seed(1)).images
    assert np.array_equal(np.asarray(to_pil(pt)[0]), np.asarray(pil[0]))


def test_prompt_cache_is_an_lru_of_the_configured_size():
    cache = PromptCache(2)
    calls = []
    for key in ("a", "b", "a", "c", "b"):
        cache.get((key,), lambda k=key: calls.append(k) or k)
    assert calls == ["a", "b", "c", "b"]  # "a" hit once; "b" was evicted by "c" (a was used more recently)
    assert (cache.hits, cache.misses) == (1, 4)
    assert Engine(Settings(model="demo", prompt_cache_size=3)).model_info()["prompt_cache"]["size"] == 3


def test_worker_call_runs_on_the_worker_thread_before_jobs():
    done = []

    def execute(job):
        return JobResult([], [], job.request, (), [], "m", "m", {}, 0)

    worker = SerialWorker(execute, name="test-worker")
    worker.start()
    try:
        assert worker.call(lambda: threading.current_thread().name).result(5) == "test-worker"
        with pytest.raises(ZeroDivisionError):
            worker.call(lambda: 1 / 0).result(5)
        assert worker.call(lambda: done.append(1) or "ok").result(5) == "ok" and worker.alive
    finally:
        worker.stop(0)


@pytest.fixture(scope="module")
def idle_engine(tmp_path_factory):
    with demo_engine(output_dir=tmp_path_factory.mktemp("out"), idle_unload_minutes=0.005) as e:  # 0.3 s
        yield e


def test_idle_unload_then_reload_on_the_next_request(idle_engine):
    e = idle_engine
    wait_until(lambda: e.model_info()["unloaded"], 10, what="unloaded while idle")
    info = e.model_info()
    assert info["unloads"] >= 1 and info["reloads"] == 0 and info["prompt_cache"]["size"] == 16
    assert e.admit(e.validate(REQ).request).state in ("ok", "tight")  # admission counts the weights as back
    result = e.generate(REQ, timeout=60)
    assert any("reloaded after idle unload" in n for n in result.notes) and "reload_s" in result.timings
    info = e.model_info()
    assert info["reloads"] == 1 and info["last_reload_seconds"] is not None
    assert e.generate(REQ, timeout=60).images  # and it keeps working


def test_metrics_report_unload_and_reload(idle_engine):
    from prometheus_client import generate_latest

    from zimage_ui.service.metrics import ServiceMetrics

    wait_until(lambda: idle_engine.model_info()["reloads"] >= 1 or idle_engine.model_info()["unloaded"], 10)
    if idle_engine.model_info()["reloads"] == 0:
        idle_engine.generate(REQ, timeout=60)
    text = generate_latest(ServiceMetrics(idle_engine).registry).decode()
    assert "zimage_model_reloads_total" in text and "zimage_model_reload_seconds" in text
    assert "zimage_model_unloaded" in text
