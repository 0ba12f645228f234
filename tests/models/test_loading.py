"""Loading real tiny ``ZImagePipeline``s from folders the tests write, on CPU (the GPU is the one thing mocked)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_ui.models.demo import DEMO_MODEL_LABEL, TRANSFORMER_CONFIG, build_demo_pipeline
from zimage_ui.models.loading import DtypeError, LoadedModel, load_model, pick_device, pick_dtype
from zimage_ui.models.sources import (
    BASE_REPO,
    DEMO_SOURCE,
    TURBO_REPO,
    ModelNotFoundError,
    ModelSource,
    resolve_model,
)

from ..support import make_hf_snapshot

PROMPT = "a red cat under a blue sky"
# Weights read from safetensors are not 64-byte aligned like freshly allocated ones, so CPU BLAS takes other code
# paths and float32 pixels differ in the last bits (~1e-6 measured); any real weight difference is ~1e-1.
ATOL = 1e-4


def generate(pipe) -> np.ndarray:
    return pipe(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
                generator=torch.Generator("cpu").manual_seed(7), output_type="np").images


@pytest.fixture(scope="module")
def demo_pipe():
    return build_demo_pipeline()


@pytest.fixture(scope="module")
def reference(demo_pipe) -> np.ndarray:
    return generate(demo_pipe)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory, demo_pipe) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "Z-Image-Turbo"
    demo_pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_transformer():
    """A transformer with different weights (another demo seed), to tell real loading from a lucky match."""
    return build_demo_pipeline(seed=1).transformer


def folder_source(path: Path) -> ModelSource:
    return ModelSource(kind="folder", spec=str(path), path=path, repo_id=None)


def assert_same_pixels(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)


# --- device / dtype ----------------------------------------------------------------------------------------------


def test_pick_device_cpu_and_auto() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device().type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_pick_device_cuda_without_gpu(name: str) -> None:
    with pytest.raises(ValueError, match="no CUDA GPU") as exc:
        pick_device(name)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["tpu", "gpu0", "cuda:x"])
def test_pick_device_unknown(name: str) -> None:
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        pick_device(name)


def test_pick_device_with_two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine has no GPU: pretend PyTorch sees two (the only mocking in this file).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA GPU"):
        pick_device("cuda:2")


def test_pick_dtype_auto() -> None:
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda", 0), "auto") == torch.bfloat16


@pytest.mark.parametrize("name, dtype", [
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("float32", torch.float32), ("fp32", torch.float32),
    ("torch.bfloat16", torch.bfloat16), (torch.float32, torch.float32),
])
def test_pick_dtype_names(name, dtype) -> None:
    assert pick_dtype(torch.device("cuda", 0), name) == dtype


@pytest.mark.parametrize("name", ["float16", "fp16", "half", "FP16", torch.float16])
def test_float16_refused(name) -> None:
    for dev in (torch.device("cpu"), torch.device("cuda", 0)):
        with pytest.raises(DtypeError) as exc:
            pick_dtype(dev, name)
        msg = str(exc.value)
        assert "black/NaN" in msg and "#14" in msg and "bfloat16" in msg and "\n" not in msg


def test_float16_refused_by_load_model(demo_dir: Path) -> None:
    with pytest.raises(DtypeError):
        load_model(folder_source(demo_dir), device="cpu", dtype="fp16")
    with pytest.raises(DtypeError):
        load_model(DEMO_SOURCE, device="cpu", dtype=torch.float16)


def test_unknown_dtype() -> None:
    with pytest.raises(DtypeError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "int8")
    assert issubclass(DtypeError, ValueError)


def test_bf16_on_cpu_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert "bfloat16 on CPU" in caplog.text


# --- demo --------------------------------------------------------------------------------------------------------


def test_load_demo(reference: np.ndarray, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # without the trained weights file, --model demo is the untrained builder (test_demo_weights.py: with it)
    monkeypatch.setattr("zimage_ui.models.demo.DEMO_WEIGHTS", tmp_path / "absent.safetensors")
    lm = load_model(DEMO_SOURCE, device="cpu", dtype="bf16")  # the demo ignores bf16 on CPU: always float32 there
    assert isinstance(lm, LoadedModel)
    assert type(lm.pipe).__name__ == "ZImagePipeline"
    assert (lm.device, lm.dtype) == (torch.device("cpu"), torch.float32)
    assert lm.pipe.transformer.dtype == torch.float32
    assert (lm.model_id, lm.label, lm.is_demo, lm.is_base) == ("demo", DEMO_MODEL_LABEL, True, False)
    assert lm.load_seconds > 0 and lm.to_device_seconds >= 0
    expected = sum(
        t.numel() * t.element_size()
        for m in (lm.pipe.transformer, lm.pipe.text_encoder, lm.pipe.vae)
        for t in (*m.parameters(), *m.buffers())
    )
    assert lm.weights_bytes() == expected > 1_000_000
    assert_same_pixels(generate(lm.pipe), reference)


# --- folders and caches ------------------------------------------------------------------------------------------


def test_load_folder_gives_the_saved_weights(demo_dir: Path, reference: np.ndarray, demo_pipe,
                                             other_transformer) -> None:
    source = resolve_model(str(demo_dir), env={"HOME": str(demo_dir)}).source
    lm = load_model(source, device="cpu")
    assert (lm.device, lm.dtype) == (torch.device("cpu"), torch.float32)
    assert (lm.source.kind, lm.model_id, lm.is_base) == ("folder", TURBO_REPO, False)
    assert lm.pipe._progress_bar_config.get("disable") is True
    assert lm.weights_bytes() == LoadedModel(demo_pipe, DEMO_SOURCE, lm.device, lm.dtype, 0, 0).weights_bytes()
    image = generate(lm.pipe)
    assert_same_pixels(image, reference)
    # Control: the same pipeline with other transformer weights is far off, so the match above means something.
    other = type(demo_pipe)(**{**demo_pipe.components, "transformer": other_transformer})
    assert np.abs(generate(other) - reference).max() > 100 * ATOL


def test_load_folder_in_bf16(demo_dir: Path) -> None:
    lm = load_model(folder_source(demo_dir), device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    assert {p.dtype for p in lm.pipe.transformer.parameters()} == {torch.bfloat16}
    assert lm.pipe.text_encoder.dtype == torch.bfloat16


def test_load_from_hf_cache(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            reference: np.ndarray) -> None:
    snap = make_hf_snapshot(tmp_path / "hub", TURBO_REPO, demo_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    lm = load_model(resolve_model("hf:" + TURBO_REPO).source)
    assert lm.source.path == snap and lm.label == "Tongyi-MAI/Z-Image-Turbo (Hugging Face cache)"
    if lm.device.type == "cpu":
        assert_same_pixels(generate(lm.pipe), reference)


def test_load_from_modelscope_cache(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    reference: np.ndarray) -> None:
    folder = tmp_path / "ms" / "models" / "Tongyi-MAI--Z-Image" / "snapshots" / "master"
    shutil.copytree(demo_dir, folder)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    res = resolve_model("auto")
    assert res.banner is None
    lm = load_model(res.source, device="cpu")
    assert (lm.source.kind, lm.model_id, lm.is_base) == ("modelscope", BASE_REPO, True)
    assert lm.label == "Tongyi-MAI/Z-Image (ModelScope cache)"
    assert_same_pixels(generate(lm.pipe), reference)


def test_incomplete_folder_is_one_line_error(demo_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_dir, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(ModelNotFoundError) as exc:
        load_model(folder_source(broken), device="cpu")
    msg = str(exc.value)
    assert str(broken) in msg and "transformer/" in msg and "\n" not in msg


def test_corrupt_weights_are_one_line_error(demo_dir: Path, tmp_path: Path) -> None:
    # Passes the folder check (every file is there) but the transformer file is garbage: from_pretrained's
    # exception must come back as one line naming the folder, not a traceback.
    broken = tmp_path / "corrupt"
    shutil.copytree(demo_dir, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00not a safetensors file" * 8)
    with pytest.raises(ModelNotFoundError) as exc:
        load_model(folder_source(broken), device="cpu")
    msg = str(exc.value)
    assert msg.startswith(f"{broken}: ") and "\n" not in msg and len(msg) < 400
    assert exc.value.__cause__ is not None


def test_source_without_path() -> None:
    with pytest.raises(ModelNotFoundError):
        load_model(ModelSource("folder", "x", None, None), device="cpu")


# --- share_from --------------------------------------------------------------------------------------------------


def test_share_from_reuses_text_encoder_and_vae(demo_dir: Path, tmp_path: Path, demo_pipe,
                                                other_transformer) -> None:
    turbo = load_model(folder_source(demo_dir), device="cpu")
    # A base-model folder holding only what share_from loads: its own transformer (other weights) and scheduler.
    base_dir = tmp_path / "Z-Image"
    other_transformer.save_pretrained(base_dir / "transformer")
    shutil.copytree(demo_dir / "scheduler", base_dir / "scheduler")
    base_src = ModelSource("folder", str(base_dir), base_dir, BASE_REPO)

    base = load_model(base_src, share_from=turbo)
    assert base.is_base and not turbo.is_base
    assert base.pipe.text_encoder is turbo.pipe.text_encoder
    assert base.pipe.vae is turbo.pipe.vae
    assert base.pipe.tokenizer is turbo.pipe.tokenizer
    assert base.pipe.transformer is not turbo.pipe.transformer
    assert base.pipe.scheduler is not turbo.pipe.scheduler
    assert (base.device, base.dtype) == (turbo.device, turbo.dtype)
    assert base.pipe._progress_bar_config.get("disable") is True
    # Its transformer is the folder's: same pixels as an in-memory pipeline with that transformer.
    expected = generate(type(demo_pipe)(**{**demo_pipe.components, "transformer": other_transformer}))
    assert_same_pixels(generate(base.pipe), expected)
    assert np.abs(generate(turbo.pipe) - expected).max() > 100 * ATOL
    # The whole folder (with its own text encoder) works too, and still shares.
    again = load_model(folder_source(demo_dir), share_from=turbo)
    assert again.pipe.text_encoder is turbo.pipe.text_encoder


def test_share_from_demo() -> None:
    first = load_model(DEMO_SOURCE, device="cpu")
    second = load_model(DEMO_SOURCE, share_from=first)
    assert second.pipe.text_encoder is first.pipe.text_encoder
    assert second.pipe.vae is first.pipe.vae
    assert second.pipe.transformer is not first.pipe.transformer
    assert second.weights_bytes() == first.weights_bytes()  # shared parts are counted in both


def test_share_from_must_match_device_and_dtype(demo_dir: Path) -> None:
    turbo = load_model(DEMO_SOURCE, device="cpu")
    with pytest.raises(ValueError, match="cannot share"):
        load_model(folder_source(demo_dir), dtype="bf16", share_from=turbo)


def test_share_from_incompatible_transformer(tmp_path: Path, demo_dir: Path) -> None:
    from diffusers import ZImageTransformer2DModel

    turbo = load_model(DEMO_SOURCE, device="cpu")
    odd = tmp_path / "odd"
    ZImageTransformer2DModel(**{**TRANSFORMER_CONFIG, "cap_feat_dim": 32}).save_pretrained(odd / "transformer")
    shutil.copytree(demo_dir / "scheduler", odd / "scheduler")
    with pytest.raises(ModelNotFoundError, match="does not fit") as exc:
        load_model(folder_source(odd), share_from=turbo)
    assert "\n" not in str(exc.value)


def test_share_from_folder_needs_transformer(tmp_path: Path) -> None:
    turbo = load_model(DEMO_SOURCE, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="transformer/"):
        load_model(folder_source(tmp_path / "empty"), share_from=turbo)


# --- import hygiene ----------------------------------------------------------------------------------------------


def test_importing_does_not_pull_heavy_libraries() -> None:
    code = (
        "import sys, zimage_ui.models.sources, zimage_ui.models.loading, zimage_ui.models.download\n"
        "print(sorted(m for m in ('diffusers', 'transformers', 'huggingface_hub', 'modelscope') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(root)}).stdout.strip()
    assert out == "[]"
