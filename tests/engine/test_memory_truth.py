"""Memory truth through the real engine on the demo model: the allocator's cache goes back when idle, a VRAM budget
counts the CUDA context, an out-of-memory error teaches the estimator, and the decode falls back to fewer images per
call and then to tiles of a size chosen from the memory left. Only CUDA's numbers are fake (``FakeAllocator``,
``FakeCudaSource``): this machine has no GPU. The same paths run for real on one in tests/gpu and ``bench --cohost``.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from zimage_ui.engine.jobs import JobFailed
from zimage_ui.memory.allocator import READY_HEADROOM_BYTES, START_HEADROOM_BYTES, ProcessBudget
from zimage_ui.memory.estimator import (
    CUDA_RUNTIME_RESERVE_BYTES,
    DecodePlan,
    WorkingMemoryEstimator,
    WorkShape,
    decode_fallbacks,
    plan_decode,
)
from zimage_ui.memory.probe import RawMemory
from zimage_ui.units import GiB, MiB

from ..support import demo_engine, wait_until

H200_TOTAL = 140 * GiB


class FakeAllocator:
    """CUDA's caching allocator as the engine sees it, with numbers a test sets."""

    kind = "cuda"

    def __init__(self, outside: list[int]):
        self.outside = list(outside)  # successive readings of the memory outside the allocator
        self.caps: list[int | None] = []
        self.releases: list[float] = []
        self.reserved = 3 * GiB
        self.lock = threading.Lock()

    def release(self) -> int:
        with self.lock:
            self.releases.append(time.monotonic())
            released, self.reserved = self.reserved, 0
        return released

    def reserved_bytes(self) -> int:
        return self.reserved

    def outside_bytes(self) -> int | None:
        return self.outside.pop(0) if len(self.outside) > 1 else self.outside[0]

    def device_total_bytes(self) -> int:
        return H200_TOTAL

    def set_cap(self, cap_bytes: int | None) -> None:
        self.caps.append(cap_bytes)


class FakeCudaSource:
    """An H200 as the probe reads it: ``weights`` allocated, ``cache`` reserved on top, our context, other
    processes."""

    def __init__(self, weights: int, context: int, others: int = 0, cache: int = 0):
        self.weights, self.context, self.others, self.cache = weights, context, others, cache

    def read(self) -> RawMemory:
        reserved = self.weights + self.cache
        used = reserved + self.context + self.others
        nvml = {"device_total_bytes": H200_TOTAL, "device_used_bytes": used,
                "process_used_bytes": reserved + self.context, "context_bytes": self.context,
                "other_processes_bytes": self.others}
        return RawMemory(kind="cuda", name="NVIDIA H200 (fake)", total=H200_TOTAL, allocated=self.weights,
                         reserved=reserved, device_used=used, peak_allocated=self.weights, nvml=nvml)

    def reset_peak(self) -> None:
        pass


SMALL = {"prompt": "a red circle", "width": 256, "height": 256, "seed": 1}


# --- giving the cache back ----------------------------------------------------------------------------------------
def test_cache_goes_back_after_warm_up_and_within_2_s_of_the_queue_going_empty(tmp_path):
    fake = FakeAllocator([int(1.3 * GiB)])
    with demo_engine(fake, output_dir=tmp_path) as engine:
        assert engine.model_info()["last_cache_release"]["why"] == "warm-up" and len(fake.releases) == 1
        result = engine.generate(SMALL, timeout=60)
        finished = time.monotonic()
        assert result.images
        wait_until(lambda: len(fake.releases) == 2, timeout=2.0, interval=0.02)
        assert fake.releases[1] - finished <= 2.0
        assert engine.model_info()["last_cache_release"]["why"] == "queue empty"
        time.sleep(1.5)  # idle: released once, not on every idle tick
        assert len(fake.releases) == 2
        assert engine.model_info()["cache_releases"] == 2


def test_keep_cache_keeps_it(tmp_path):
    fake = FakeAllocator([int(1.3 * GiB)])
    with demo_engine(fake, output_dir=tmp_path, keep_cache=True) as engine:
        engine.generate(SMALL, timeout=60)
        time.sleep(2.0)
        assert fake.releases == [] and engine.model_info()["cache_releases"] == 0


def test_allocator_configuration_leaves_the_users_alone():
    from zimage_ui.memory.allocator import configure

    env: dict[str, str] = {}
    config = configure(env)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and config.expandable
    assert configure(env).source == "zimage-ui default"  # asked again (doctor, a child process): still ours
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:256"}
    config = configure(mine)
    assert mine == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:256"} and not config.expandable
    assert "user" in config.source
    newer = {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}
    assert configure(newer).source == "user (PYTORCH_ALLOC_CONF)" and "PYTORCH_CUDA_ALLOC_CONF" not in newer


# --- the budget counts the CUDA context ---------------------------------------------------------------------------
def test_budget_caps_the_allocator_below_the_budget_by_the_measured_context(tmp_path):
    context_at_start, context_warm = int(0.6 * GiB), int(1.3 * GiB)
    fake = FakeAllocator([context_at_start, context_warm])
    with demo_engine(fake, output_dir=tmp_path, vram_budget_gb=24) as engine:
        budget = 24 * GiB
        # before loading: the context as measured then, and room for the kernels still to load
        assert fake.caps[0] == budget - context_at_start - START_HEADROOM_BYTES
        # after warm-up: measured again (lazily loaded kernels grew it), a smaller headroom
        cap = engine.test_seam().budget
        assert fake.caps[-1] == budget - context_warm - READY_HEADROOM_BYTES == cap.allocator_cap_bytes
        assert cap.fraction == pytest.approx(fake.caps[-1] / H200_TOTAL)
        info = engine.model_info()["budget"]
        assert info["outside_bytes"] == context_warm and info["measured"]
        # admission: what a job may use is the cap less the weights, never the budget less the weights
        weights = engine.weights_bytes()
        engine.test_seam().use_memory(FakeCudaSource(weights, context_warm))
        request = engine.validate(SMALL).request
        admission = engine.admit(request)
        assert admission.available_bytes == fake.caps[-1] - weights - CUDA_RUNTIME_RESERVE_BYTES
        # the whole process, as nvidia-smi counts it, stays within the budget when a job uses all of that
        peak_process = weights + admission.available_bytes + CUDA_RUNTIME_RESERVE_BYTES + context_warm
        assert peak_process + READY_HEADROOM_BYTES == budget


def test_budget_arithmetic():
    b = ProcessBudget(budget_bytes=8 * GiB, outside_bytes=int(1.3 * GiB), headroom_bytes=256 * MiB,
                      device_total_bytes=24 * GiB)
    assert b.allocator_cap_bytes == 8 * GiB - int(1.3 * GiB) - 256 * MiB
    assert b.fraction == pytest.approx(b.allocator_cap_bytes / (24 * GiB))
    tiny = ProcessBudget(budget_bytes=GiB, outside_bytes=2 * GiB, headroom_bytes=0, device_total_bytes=24 * GiB)
    assert tiny.allocator_cap_bytes == 0 and tiny.fraction == 0


def test_other_processes_that_leave_no_room_are_named(tmp_path):
    fake = FakeAllocator([int(1.3 * GiB)])
    with demo_engine(fake, output_dir=tmp_path) as engine:
        weights = engine.weights_bytes()
        others = H200_TOTAL - weights - int(1.3 * GiB) - 64 * MiB  # an LLM server took nearly everything
        engine.test_seam().use_memory(FakeCudaSource(weights, int(1.3 * GiB), others=others))
        admission = engine.admit(engine.validate(SMALL).request)
        assert admission.state == "over"
        assert "other processes use" in admission.message and f"{others / GiB:.1f} GiB" in admission.message
        assert admission.to_dict()["other_processes_bytes"] == others
        from zimage_ui.ui.vram import admission_message

        for lang, words in (("en", "other programs use"), ("zh", "其他程序占用")):  # the page says it, in both
            assert words in admission_message(admission, None, lang)
        engine.test_seam().use_memory(FakeCudaSource(weights, int(1.3 * GiB), others=0))
        assert engine.admit(engine.validate(SMALL).request).state == "ok"


# --- learning from an out-of-memory error, and the decode fallback -----------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with demo_engine(output_dir=tmp_path_factory.mktemp("out")) as e:
        yield e


def oom(gib: float) -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {gib:.2f} GiB. GPU 0 has ...")


def test_decode_oom_is_learned_and_the_rest_decodes_one_image_at_a_time(engine):
    raw = {"prompt": "a red circle", "width": 256, "height": 256, "batch": 2, "seed": 11}
    expected = engine.generate(raw, timeout=60)
    request = engine.validate(raw).request
    shape = WorkShape(256, 256, 2)
    predicted = engine.estimator.predict(shape)
    plans: list[DecodePlan] = []

    def first_decode_fails(req, plan):
        plans.append(plan)
        if len(plans) == 1:
            raise oom(1.0)

    before = dict(engine.model_info()["oom_events"])
    with engine.test_seam().decode_fault(first_decode_fails):
        result = engine.generate(raw, timeout=60)
    assert [p.chunk for p in plans] == [2, 1, 1] and plans[1].tile is None
    assert any("VAE decode" in n and "1 image per decode" in n for n in result.notes), result.notes
    for a, b in zip(result.images, expected.images, strict=True):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), atol=2)
    assert engine.model_info()["oom_events"]["decode"] == before["decode"] + 1
    learned, phase = engine.estimator.learned[shape]
    assert phase == "decode" and learned >= int(1.1 * GiB)  # the failed allocation, at least, plus 10%
    # the same request is predicted right next time: at least what it was seen to need
    assert engine.predict_working_bytes(request) >= GiB > predicted
    # and the lesson survives a restart with the calibration file
    again = WorkingMemoryEstimator.from_json(engine.estimator.to_json())
    assert again.predict(shape) == engine.estimator.predict(shape)


def test_denoise_oom_is_learned_and_retried_once(engine):
    raw = {"prompt": "a blue square", "width": 256, "height": 256, "seed": 2}
    shape = WorkShape(256, 256, 1)
    attempts = []

    def first_attempt_fails(req, attempt):
        attempts.append(attempt)
        if attempt == 1:
            raise oom(0.5)

    with engine.test_seam().fault(first_attempt_fails):
        result = engine.generate(raw, timeout=60)
    assert 1 in attempts and 2 in attempts and result.images
    assert any("denoise" in n for n in result.notes)
    assert engine.estimator.learned[shape][1] == "denoise"
    assert engine.predict_working_bytes(engine.validate(raw).request) >= GiB // 2


@pytest.mark.slow  # 24 s on a loaded 2-core machine
def test_tiles_are_sized_from_the_memory_left_and_a_clear_error_when_nothing_fits(engine):
    raw = {"prompt": "a green triangle", "width": 512, "height": 512, "seed": 3}
    plans: list[DecodePlan] = []

    def untiled_fails(req, plan):
        plans.append(plan)
        if plan.tile is None:
            raise oom(0.25)

    with engine.test_seam().decode_fault(untiled_fails):
        result = engine.generate(raw, timeout=60)
    assert plans[-1].tile is not None and plans[-1].tile < 512
    assert result.images[0].size == (512, 512) and any("tiles" in n for n in result.notes)

    def always_fails(req, plan):
        raise oom(0.1)

    with engine.test_seam().decode_fault(always_fails), pytest.raises(JobFailed, match="smallest tiles") as info:
        engine.generate({**raw, "seed": 4}, timeout=60)
    assert info.value.kind == "oom"
    assert engine.generate({**raw, "seed": 5}, timeout=60).images  # and the engine goes on


def test_decode_plan_size_choice():
    est = WorkingMemoryEstimator.default_for("cuda", int(19.28 * GiB))
    shape = WorkShape(1024, 1024, 4)
    whole = DecodePlan(4)
    # enough for one image's decode, not two: one image per call, no tiles
    one, two = est.decode_need(shape, 1), est.decode_need(shape, 2)
    assert plan_decode(est, shape, (one + two) // 2, whole) == DecodePlan(1, None, one)
    # enough for three: three per call
    assert plan_decode(est, shape, est.decode_need(shape, 3), whole).chunk == 3
    # less than one image: the largest tile that fits
    for tile in (768, 512, 256):
        need = est.decode_need(shape, 1, tile)
        assert plan_decode(est, shape, need, whole) == DecodePlan(1, tile, need)
    # nothing fits: the smallest tile is still worth a try; after it, nothing is left
    assert plan_decode(est, shape, 1, whole).tile == 256
    assert plan_decode(est, shape, 1, DecodePlan(1, 256)) is None
    # a tile as large as the image is no tiling
    assert all(p.tile is None or p.tile < 768 for p in decode_fallbacks(WorkShape(768, 768), DecodePlan(1)))
