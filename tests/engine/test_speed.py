"""Issue 13's speed levers on the CPU: the prompt encode without a key/value cache gives the pipeline's numbers, the
finishing thread overlaps a job's PNG with the next job's denoise, the static-shape gate runs the compiled decoder
only for the shapes it was given."""

import threading
import time

import pytest
import torch

from zimage_ui.engine.acceleration import ShapeGate, uncompile
from zimage_ui.engine.jobs import ClientBusy, Job, JobResult, JobState
from zimage_ui.engine.runner import encode_prompt
from zimage_ui.engine.worker import SerialWorker
from zimage_ui.validation import RunRequest

from ..support import demo_engine

REQ = RunRequest("x", "", "turbo", 2, 0.0, 256, 256, 1, 1)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with demo_engine(save_images=True, output_dir=tmp_path_factory.mktemp("out"), max_queue=4) as e:
        yield e


def test_our_prompt_encode_gives_the_pipelines_numbers(engine):
    pipe = engine.model.pipe
    for text in ("a red circle", "a small blue square beside a green triangle on a white field " * 3):
        ours = encode_prompt(pipe, text, engine.model.device)
        with torch.no_grad():
            theirs = pipe._encode_prompt(prompt=[text], device=engine.model.device)
        assert len(ours) == len(theirs) == 1
        assert ours[0].shape == theirs[0].shape and torch.equal(ours[0], theirs[0])


def _result(job):
    return JobResult([], [job.request.seed], job.request, (), [], "t", "t", {}, 0)


def test_finish_runs_beside_the_next_job_and_the_job_is_done_after_it():
    executed, finishing = [], threading.Event()
    release = threading.Event()

    def execute(job):
        executed.append(job.id)
        return _result(job)

    def finish(job, result):
        finishing.set()
        assert release.wait(5)
        result.timings["finished"] = 1.0

    w = SerialWorker(execute, finish=finish)
    w.start()
    try:
        a, b = w.submit(Job(REQ)), w.submit(Job(REQ))
        assert finishing.wait(5)
        end = time.monotonic() + 5
        while len(executed) < 2 and time.monotonic() < end:  # b's GPU part runs while a is being finished
            time.sleep(0.01)
        assert executed == [a.id, b.id]
        assert not a.done and not b.done  # neither counts as done before its finish returned
        release.set()
        assert a.wait(5).timings["finished"] == 1.0 and b.wait(5).timings["finished"] == 1.0
        assert a.finished <= b.finished
    finally:
        release.set()
        w.stop(0)


def test_a_failing_finish_fails_that_job_only_and_a_finishing_job_still_counts_for_its_owner():
    release = threading.Event()

    def finish(job, result):
        assert release.wait(5)
        if job.request.seed == 13:
            raise OSError("disk full")

    w = SerialWorker(_result, finish=finish, jobs_per_client=1)
    w.start()
    try:
        bad = w.submit(Job(RunRequest("x", "", "turbo", 2, 0.0, 256, 256, 13, 1), owner="ann"))
        time.sleep(0.1)  # executed, waiting in its finish
        with pytest.raises(ClientBusy):
            w.submit(Job(REQ, owner="ann"))
        release.set()
        bad.wait_done(5)
        assert bad.state == JobState.FAILED and "disk full" in str(bad.error)
        good = w.submit(Job(REQ, owner="ann"))
        assert good.wait(5).seeds == [1]
    finally:
        release.set()
        w.stop(0)


class _Recorder:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def __call__(self, x):
        self.calls.append(tuple(x.shape))
        if self.fail is not None:
            raise self.fail
        return x * 0 - 1  # tells the compiled path's answer apart from the module's


def test_shape_gate_runs_compiled_only_for_its_shapes_and_falls_back_for_good():
    layer = torch.nn.Identity()
    fake = _Recorder()
    layer._compiled_call_impl = gate = ShapeGate(layer, [(1, 4)], compiled=fake)
    x1, x2 = torch.ones(1, 4), torch.ones(2, 4)
    assert torch.equal(layer(x1), -torch.ones(1, 4)) and torch.equal(layer(x2), x2)
    assert fake.calls == [(1, 4)] and gate.calls == {"compiled": 1, "eager": 1}

    broken = torch.nn.Identity()
    broken_fake = _Recorder(RuntimeError("no"))
    broken._compiled_call_impl = failed = ShapeGate(broken, [(1, 4)], compiled=broken_fake)
    assert torch.equal(broken(x1), x1) and "RuntimeError: no" in failed.failed
    assert torch.equal(broken(x1), x1) and len(broken_fake.calls) == 1  # not tried again

    oom = torch.nn.Identity()
    oom._compiled_call_impl = ShapeGate(oom, [(1, 4)], compiled=_Recorder(RuntimeError("CUDA out of memory.")))
    with pytest.raises(RuntimeError, match="out of memory"):
        oom(x1)  # the decode's own fallback handles it
    assert uncompile(layer) == 1 and torch.equal(layer(x1), x1)


def test_the_gated_decoder_serves_one_image_at_the_presets_size_and_leaves_the_rest_eager(engine):
    """``compile_vae_decoder`` on the demo VAE, with the compiled call stood in by the eager one (the CPU has no
    compiled decode): one image at the preset's size goes through it, another size and a two-image call do not, and
    the pixels are the engine's usual ones."""
    from zimage_ui.engine.acceleration import compile_vae_decoder

    preset = engine.presets().presets["turbo"]
    request = {"prompt": "a green square", "width": preset.width, "height": preset.height, "seed": 4}
    before = engine.generate(request, timeout=60)
    vae = engine.model.pipe.vae
    gate = compile_vae_decoder(vae, [(preset.width, preset.height)])
    seen = []

    def compiled(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return gate.eager(x, *args, **kwargs)

    gate.compiled = compiled
    try:
        after = engine.generate(request, timeout=60)
        assert seen == [(1, 16, preset.height // 8, preset.width // 8)] and gate.calls["eager"] == 0
        engine.generate({**request, "width": preset.width + 64}, timeout=60)
        assert len(seen) == 1 and gate.calls["eager"] == 1
        engine.model.pipe.vae.decoder(torch.zeros(2, 16, preset.height // 8, preset.width // 8))  # a 2-image call
        assert len(seen) == 1 and gate.calls["eager"] == 2
    finally:
        uncompile(vae)
    assert after.images[0].tobytes() == before.images[0].tobytes()
