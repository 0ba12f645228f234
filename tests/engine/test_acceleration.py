"""Acceleration on the CPU: the routed attention processor computes what diffusers' does, backend choice and its
refusals, fp8 refusal, compile-cache set-up and the compile fall-back, on the demo model."""

import os

import pytest
import torch

from zimage_ui.engine import acceleration as acc
from zimage_ui.models.demo import build_demo_pipeline

LONG = " ".join(["a red circle beside a blue square"] * 8)  # pads to a longer caption than "" → a mask with CFG
CASES = [  # (side, prompt, negative, guidance, batch)
    (256, "a red circle", None, 0.0, 1),
    (320, "a red circle", None, 0.0, 1),
    (256, LONG, "blurry", 3.0, 1),
    (256, "a cat", None, 0.0, 2),
]


def latents(pipe, side, prompt, negative, guidance, batch):
    return pipe(prompt=prompt, negative_prompt=negative, height=side, width=side, num_inference_steps=2,
                guidance_scale=guidance, num_images_per_prompt=batch, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(0)).images


@pytest.fixture(scope="module")
def upstream():
    pipe = build_demo_pipeline()
    return [latents(pipe, *case) for case in CASES]


def test_routed_processor_is_bit_identical_to_diffusers(upstream):
    pipe = build_demo_pipeline()
    blocks = sum(type(m).__name__ == "ZImageTransformerBlock" for m in pipe.transformer.modules())
    assert acc.install_attention(pipe.transformer, acc.AttentionChoice()) == blocks == 4  # 2 layers, 2 refiners
    for expected, case in zip(upstream, CASES, strict=True):
        assert torch.equal(latents(pipe, *case), expected), case


def test_real_valued_rope_matches_the_complex_product(upstream):
    pipe = build_demo_pipeline()
    acc.install_attention(pipe.transformer, acc.AttentionChoice(), real_rope=True)
    for expected, case in zip(upstream, CASES, strict=True):
        torch.testing.assert_close(latents(pipe, *case), expected, rtol=1e-5, atol=1e-5)


def test_masked_calls_use_the_masked_backend(monkeypatch):
    pipe = build_demo_pipeline()
    acc.install_attention(pipe.transformer, acc.AttentionChoice(backend="native", masked_backend="_native_math"))
    seen = []
    processor = next(m.processor for m in pipe.transformer.modules()
                     if type(getattr(m, "processor", None)).__name__ == "RoutedAttnProcessor")
    real = processor._dispatch

    def spy(*args, attn_mask=None, backend=None, **kw):
        seen.append((attn_mask is not None, backend.value))
        return real(*args, attn_mask=attn_mask, backend=backend, **kw)

    for module in pipe.transformer.modules():
        if type(getattr(module, "processor", None)).__name__ == "RoutedAttnProcessor":
            monkeypatch.setattr(module.processor, "_dispatch", spy)
    latents(pipe, *CASES[2])  # CFG with prompts of different lengths
    assert (True, "_native_math") in seen and (False, "native") in seen
    assert all(backend == ("_native_math" if masked else "native") for masked, backend in seen)


def test_cpu_uses_native_without_probing():
    pipe = build_demo_pipeline()
    choice = acc.choose_attention("auto", torch.device("cpu"), pipe.transformer)
    assert (choice.backend, choice.masked_backend, choice.probed) == ("native", "native", False)


def test_a_named_maskless_backend_gets_native_for_masks():
    pipe = build_demo_pipeline()
    choice = acc.choose_attention("_native_flash", torch.device("cpu"), pipe.transformer)
    assert (choice.backend, choice.masked_backend) == ("_native_flash", "native")


def test_unknown_backend_is_refused_with_its_name():
    pipe = build_demo_pipeline()
    with pytest.raises(ValueError, match="attention: backend 'warp-drive'"):
        acc.choose_attention("warp-drive", torch.device("cpu"), pipe.transformer)


def test_probe_times_what_runs_and_records_what_does_not():
    choice = acc.probe_attention(torch.device("cpu"), (1, 96, 2, 32), dtype=torch.float32,
                                 candidates=("native", "_native_math", "_native_flash", "flash_hub"), repeats=2)
    assert choice.probed and choice.backend in choice.timings_ms and choice.masked_backend in choice.masked_timings_ms
    assert "native" in choice.timings_ms and "native" in choice.masked_timings_ms
    assert choice.unavailable["_native_flash+mask"] == "raises on attention masks"
    assert "network" in choice.unavailable["flash_hub"]


def test_the_probe_is_saved_and_reused_until_what_it_depends_on_changes(tmp_path, monkeypatch):
    """A restart skips the probe (its answer is on disk); another shape or another set of runnable backends probes
    again; an unreadable file is probed over, not fatal."""
    calls = []
    real = acc.probe_attention
    monkeypatch.setattr(acc, "probe_attention", lambda *a, **k: calls.append(a) or real(*a, **k))
    kw = dict(candidates=("native", "_native_math"), repeats=2)
    first = acc.cached_probe(torch.device("cpu"), (1, 96, 2, 32), torch.float32, tmp_path, **kw)
    again = acc.cached_probe(torch.device("cpu"), (1, 96, 2, 32), torch.float32, tmp_path, **kw)
    assert len(calls) == 1 and (tmp_path / acc.PROBE_CACHE_FILE).is_file()
    assert (again.backend, again.masked_backend, again.timings_ms, again.shape) == (
        first.backend, first.masked_backend, first.timings_ms, first.shape)
    assert again.probed and "saved probe" in again.reason and "saved probe" not in first.reason
    acc.cached_probe(torch.device("cpu"), (1, 128, 2, 32), torch.float32, tmp_path, **kw)  # another shape
    acc.cached_probe(torch.device("cpu"), (1, 96, 2, 32), torch.float32, tmp_path,
                     candidates=("native",), repeats=2)  # another set of backends
    assert len(calls) == 3
    (tmp_path / acc.PROBE_CACHE_FILE).write_text("{not json")
    acc.cached_probe(torch.device("cpu"), (1, 96, 2, 32), torch.float32, tmp_path, **kw)
    assert len(calls) == 4


def test_attention_shape_follows_the_config():
    pipe = build_demo_pipeline()
    batch, tokens, heads, head_dim = acc.attention_shape(pipe.transformer, 1024, 1024, caption_tokens=96)
    assert (batch, heads, head_dim) == (1, 2, 32) and tokens == 64 * 64 + 96


def test_fp8_is_refused_on_the_cpu_with_a_reason():
    ok, why = acc.fp8_support(torch.device("cpu"))
    assert not ok and "CUDA" in why
    pipe = build_demo_pipeline()
    with pytest.raises(ValueError, match="CUDA"):
        acc.accelerate(pipe, torch.device("cpu"), fp8=True)


def test_fp8_filter_takes_the_blocks_large_linears_only():
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        full = ZImageTransformer2DModel()  # the released config, no memory
    chosen = [name for name, m in full.named_modules() if acc._fp8_filter(m, name)]
    assert chosen and all(n.startswith(("layers.", "noise_refiner.", "context_refiner.")) for n in chosen)
    assert not any("adaLN" in n for n in chosen)  # 256-wide inputs stay bf16
    assert len(chosen) == 34 * 7  # q, k, v, out, and the three FFN projections per block


def test_accelerate_on_the_cpu_installs_routing_and_does_not_compile():
    pipe = build_demo_pipeline()
    report = acc.accelerate(pipe, torch.device("cpu"))
    assert not report.compiled and "CPU" in report.compile_note and report.attention.backend == "native"
    assert report.to_dict()["attention"]["backend"] == "native"


def test_compile_cache_goes_where_it_is_told(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    info = acc.configure_compile_cache(tmp_path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor") == info["inductor_cache_dir"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))
    assert acc.configure_compile_cache(tmp_path / "ours")["inductor_cache_dir"] == str(tmp_path / "theirs")


def test_fall_back_steps_to_native_then_to_eager():
    pipe = build_demo_pipeline()
    report = acc.AccelerationReport(attention=acc.AttentionChoice(backend="_native_cudnn",
                                                                  masked_backend="_native_cudnn"), compiled=True)
    acc.install_attention(pipe.transformer, report.attention, real_rope=True)
    for block in pipe.transformer.layers:
        block.compile()  # lazy: nothing compiles until a call
    assert acc.fall_back(pipe, report, RuntimeError("cudnn won't trace")) and report.attention.backend == "native"
    assert report.compiled
    assert acc.fall_back(pipe, report, RuntimeError("still broken")) and not report.compiled
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in pipe.transformer.layers)
    assert not acc.fall_back(pipe, report, RuntimeError("eager failure is a real failure"))
    latents(pipe, *CASES[0])  # and it still runs


def test_weights_of_wrapper_subclasses_are_counted_by_their_inner_tensors():
    # torchao's fp8 weights are wrapper tensors whose data_ptr() is 0: counting them by pointer kept one of them
    from torch.testing._internal.two_tensor import TwoTensor

    from zimage_ui.memory.probe import weights_on_device

    module = torch.nn.Module()
    module.a = torch.nn.Parameter(TwoTensor(torch.ones(256), torch.ones(256)), requires_grad=False)
    module.b = torch.nn.Parameter(TwoTensor(torch.ones(128), torch.ones(128)), requires_grad=False)
    assert weights_on_device([module], "cpu") == (2 * 256 + 2 * 128) * 4
