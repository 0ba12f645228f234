"""The engine end to end on the demo model: real ZImagePipeline, real worker thread, real probe."""

import threading

import numpy as np
import pytest

from zimage_ui.engine.engine import Engine, EngineState
from zimage_ui.engine.jobs import JobCancelled, JobState, MemoryRefused, NotReady
from zimage_ui.settings import Settings
from zimage_ui.validation import RequestError

from ..support import demo_engine, small_machine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with demo_engine(save_images=True, output_dir=tmp_path_factory.mktemp("out"), max_queue=4) as e:
        yield e


def test_not_ready_before_start():
    e = Engine(Settings(model="demo"))
    assert e.state == EngineState.NEW
    with pytest.raises(NotReady):
        e.submit({"prompt": "x"})


def test_demo_model_is_ready_and_says_so(engine):
    info = engine.model_info()
    assert engine.ready and info["is_demo"] and "demo" in info["label"]
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert engine.presets().presets["turbo"].width == 256  # the demo model's default: what it is trained for
    assert engine.test_seam().timer.known  # warm-up measured this machine's step time


def test_same_seed_same_pixels_and_files_saved(engine):
    req = {"prompt": "a red circle", "width": 256, "height": 256, "seed": 7}
    a, b = engine.generate(req, timeout=60), engine.generate(req, timeout=60)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert a.images[0].size == (256, 256) and a.seeds == [7]
    c = engine.generate({**req, "seed": 8}, timeout=60)
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    assert len(a.paths) == 1 and a.paths[0].endswith("-7.png")
    assert a.timings["total_s"] > 0 and a.timings["per_step_s"] > 0


def test_prompt_changes_the_image(engine):
    base = {"width": 256, "height": 256, "seed": 3}
    a = engine.generate({**base, "prompt": "a red circle"}, timeout=60)
    b = engine.generate({**base, "prompt": "a blue square"}, timeout=60)
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_batch_gives_consecutive_seeds(engine):
    r = engine.generate({"prompt": "a cat", "width": 256, "height": 256, "seed": 10, "batch": 2}, timeout=60)
    assert r.seeds == [10, 11] and len(r.images) == 2
    single = engine.generate({"prompt": "a cat", "width": 256, "height": 256, "seed": 11}, timeout=60)
    np.testing.assert_allclose(np.asarray(r.images[1], float), np.asarray(single.images[0], float), atol=2)


def test_guidance_runs_cfg_with_a_negative_prompt(engine):
    r = engine.generate({"prompt": "a dog", "negative_prompt": "blurry", "preset": "standard", "steps": 9,
                         "width": 256, "height": 256, "seed": 1}, timeout=60)
    assert r.request.cfg and r.request.negative_prompt == "blurry"


def test_progress_per_step(engine):
    steps = []
    job = engine.submit({"prompt": "x", "width": 256, "height": 256, "seed": 1})
    job.on_change(lambda j: steps.append(j.step))
    job.wait(60)
    assert job.state == JobState.DONE and max(steps) == 8


def test_prompt_cache_skips_the_text_encoder(engine):
    hits = engine.model_info()["prompt_cache"]["hits"]
    for seed in (1, 2):
        engine.generate({"prompt": "a unique prompt for caching", "width": 256, "height": 256, "seed": seed},
                        timeout=60)
    assert engine.model_info()["prompt_cache"]["hits"] == hits + 1


def test_cancel_running_job_stops_at_next_step(engine):
    gate = threading.Event()
    seen = []

    def hook(request, attempt):
        seen.append(request.steps)
        gate.wait(5)

    with engine.test_seam().fault(hook):
        job = engine.submit({"prompt": "x", "width": 256, "height": 256, "seed": 1})
        queued = engine.submit({"prompt": "y", "width": 256, "height": 256, "seed": 2})
        while not seen:
            threading.Event().wait(0.01)
        assert engine.status(queued).position == 1
        engine.cancel(queued)
        assert queued.state == JobState.CANCELLED  # a queued job leaves at once
        engine.cancel(job)
        gate.set()
        with pytest.raises(JobCancelled):
            job.wait(30)
        assert job.step < 8
    assert engine.generate({"prompt": "after", "width": 256, "height": 256, "seed": 1}, timeout=60).images


def test_bad_request_is_refused_before_the_queue(engine):
    with pytest.raises(RequestError) as info:
        engine.submit({"prompt": "x", "width": "abc"})
    assert info.value.field == "width"


def _shape(request):
    from zimage_ui.memory.estimator import WorkShape

    return WorkShape(request.width, request.height, request.batch, request.cfg)


def test_request_predicted_not_to_fit_is_refused(engine):
    huge = engine.validate({"prompt": "x", "width": 2048, "height": 2048, "batch": 4, "seed": 1}).request
    small = engine.validate({"prompt": "x", "width": 256, "height": 256, "seed": 1}).request
    need_huge, need_small = engine.predict_working_bytes(huge), engine.predict_working_bytes(small)
    # even decoding one image at a time, the huge request needs more than this machine has
    need_huge_chunked = engine.estimator.predict_chunked(_shape(huge), 1)
    margin = engine.settings.memory_margin_bytes
    assert need_huge > need_huge_chunked > need_small > 0
    total = engine.weights_bytes() + need_small + margin + (need_huge_chunked - need_small) // 2
    with small_machine(engine, total):
        assert engine.admit(small).state == "ok"
        refused = engine.admit(huge)
        assert refused.state == "over" and refused.need_bytes == need_huge
        with pytest.raises(MemoryRefused, match="too large"):
            engine.submit({"prompt": "x", "width": 2048, "height": 2048, "batch": 4, "seed": 1})
        assert engine.generate({"prompt": "x", "width": 256, "height": 256, "seed": 1}, timeout=60).images


@pytest.mark.slow  # 21 s on a loaded 2-core machine
def test_a_batch_whose_decode_does_not_fit_decodes_fewer_images_at_a_time(engine):
    raw = {"prompt": "a red circle", "width": 512, "height": 512, "batch": 4, "seed": 5}
    request = engine.validate(raw).request
    full, one = engine.predict_working_bytes(request), engine.estimator.predict_chunked(_shape(request), 1)
    assert full > one
    margin = engine.settings.memory_margin_bytes
    total = engine.weights_bytes() + one + margin + (full - one) // 4  # room for one image's decode, not four
    expected = engine.generate(raw, timeout=120)  # the whole batch decoded at once
    with small_machine(engine, total):
        admission = engine.admit(request)
        assert admission.state == "ok" and 1 <= admission.decode_batch < 4, admission
        assert "decodes" in admission.message
        result = engine.generate(raw, timeout=120)
    assert result.seeds == [5, 6, 7, 8] and len(result.images) == 4
    for a, b in zip(result.images, expected.images, strict=True):  # the same pictures, decoded in chunks
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), atol=2)
