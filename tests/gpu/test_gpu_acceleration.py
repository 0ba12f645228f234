"""On a CUDA GPU: the attention probe, routed attention under compile, placements that stream weights, the VRAM
budget, idle unload freeing memory, fp8 support. Skipped without CUDA (the figures live in docs/benchmarks.md)."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REQ = {"prompt": "a red circle", "width": 256, "height": 256, "seed": 3}


@pytest.fixture()
def cuda():
    return torch.device("cuda", torch.cuda.current_device())


def test_probe_picks_a_backend_that_takes_masks_for_cfg(cuda):
    from zimage_ui.engine.acceleration import MASKLESS_BACKENDS, probe_attention

    choice = probe_attention(cuda, (1, 1088, 4, 64), repeats=3)
    assert choice.backend in choice.timings_ms and "native" in choice.timings_ms
    assert choice.masked_backend not in MASKLESS_BACKENDS and choice.masked_backend in choice.masked_timings_ms


def test_real_rope_matches_complex_in_bf16(cuda):
    from zimage_ui.engine.acceleration import RoutedAttnProcessor

    x = torch.randn(2, 300, 4, 64, device=cuda, dtype=torch.bfloat16)
    freqs = torch.polar(torch.ones(2, 300, 32, device=cuda), torch.rand(2, 300, 32, device=cuda) * 6.28)
    a = RoutedAttnProcessor(real_rope=False)._rope(x, freqs)
    b = RoutedAttnProcessor(real_rope=True)._rope(x, freqs)
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def test_fp8_support_follows_compute_capability(cuda):
    from zimage_ui.engine.acceleration import fp8_support

    ok, why = fp8_support(cuda)
    if torch.cuda.get_device_capability(cuda) < (8, 9):
        assert not ok and "8.9" in why
    else:
        assert ok or "torchao" in why


def _engine(tmp_path, **kw):
    from zimage_ui.engine.engine import Engine
    from zimage_ui.settings import Settings

    return Engine(Settings(model="demo", device="cuda", output_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                           save_images=False, **kw))


def test_compiled_demo_engine_generates_and_unloads(tmp_path):
    e = _engine(tmp_path)
    e.start()
    try:
        info = e.model_info()
        assert info["device"].startswith("cuda") and info["placement"] == "resident"
        assert info["acceleration"]["compiled"], info["acceleration"]["compile_note"]
        a = e.generate(REQ, timeout=300)
        assert a.images[0].size == (256, 256)
        loaded = torch.cuda.memory_allocated()
        e.on_worker(e.unload).result(60)
        assert e.weights_bytes() == 0 and torch.cuda.memory_allocated() < loaded
        b = e.generate(REQ, timeout=300)
        assert e.model_info()["reloads"] == 1
        diff = np.abs(np.asarray(a.images[0], dtype=np.int16) - np.asarray(b.images[0], dtype=np.int16))
        assert diff.max() <= 2  # same weights back, same seed
    finally:
        e.shutdown(0)


@pytest.mark.parametrize("placement", ["text-encoder-offload", "fp8-storage", "sequential-offload"])
def test_streaming_placements_run_and_keep_weights_off_the_gpu(tmp_path, placement, monkeypatch):
    from zimage_ui.engine import engine as engine_module

    # the demo model always plans "resident"; force the placement to exercise the hooks on a real GPU
    monkeypatch.setattr(engine_module.Engine, "_choose_placement", lambda self, device, book, demo: placement)
    e = _engine(tmp_path)
    e.start()
    try:
        assert e.placement.name == placement and "text_encoder" in e.placement.streamed
        total = e.model.weights_bytes()
        assert e.weights_bytes() < total  # the streamed text encoder is not on the GPU between jobs
        assert e.generate(REQ, timeout=300).images
    finally:
        e.shutdown(0)


def test_vram_budget_caps_the_allocator(cuda):
    from zimage_ui.memory.allocator import make_allocator

    try:
        make_allocator(cuda).set_cap(1 * 2**30)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(2 * 2**30, dtype=torch.uint8, device=cuda)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, cuda)
        torch.cuda.empty_cache()
