"""The full-size Z-Image-Turbo architecture with random weights, for ``zimage-ui bench --synthetic``.

Compute and memory depend on shapes, not on weight values, so a pipeline built here runs at the speed and in the
memory of the released model — anyone can learn what their GPU will do before downloading 33 GB. Its images are
noise. It is built straight on the target device (no 20 GB host copy), in the target dtype.

    >>> from zimage_ui.models.synthetic import FULL_TRANSFORMER_CONFIG, parameter_count
    >>> FULL_TRANSFORMER_CONFIG["dim"], FULL_TRANSFORMER_CONFIG["n_layers"]
    (3840, 30)

Weights are rescaled so activations stay finite through 30 blocks: every matrix gets standard deviation 0.02
(the baseline script ``../shared/bench/vanilla_diffusers.py`` does the same), and the layers diffusers
zero-initialises (the final projection, adaLN) get N(0, 0.02) instead of staying zero — otherwise the transformer
would predict zero velocity, the final latents would equal the starting noise whatever the precision, and an fp8
vs bf16 comparison of final latents would be meaningless.

Tests build the same thing at the demo model's sizes (``configs=DEMO_CONFIGS``) on the CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zimage_ui.models.loading import LoadedModel, pick_device, pick_dtype
from zimage_ui.models.sources import ModelSource

SYNTHETIC_MODEL_ID = "synthetic:Z-Image-Turbo"
SYNTHETIC_LABEL = "Z-Image-Turbo architecture, random weights (synthetic benchmark)"

# The released Tongyi-MAI/Z-Image-Turbo configs (../shared/reference/zimage.md), as diffusers/transformers kwargs.
FULL_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)
FULL_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
FULL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)
SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)


@dataclass(frozen=True)
class SyntheticConfigs:
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]


FULL_CONFIGS = SyntheticConfigs(FULL_TRANSFORMER_CONFIG, FULL_TEXT_ENCODER_CONFIG, FULL_VAE_CONFIG)


def demo_configs() -> SyntheticConfigs:
    """The untrained demo model's sizes (zimage_ui/models/demo.py): the same builder, small enough for a CPU test."""
    from zimage_ui.models import demo

    te = dict(demo.UNTRAINED_TEXT_ENCODER_CONFIG, vocab_size=len(demo.build_demo_tokenizer()))
    return SyntheticConfigs(dict(demo.UNTRAINED_TRANSFORMER_CONFIG), te, dict(demo.UNTRAINED_VAE_CONFIG))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@torch.no_grad()
def _rescale(module: torch.nn.Module, std: float = 0.02) -> None:
    for p in module.parameters():
        if p.dim() < 2:
            continue
        current = float(p.float().std())
        if current == 0.0 or current != current:  # zero-initialised (or empty): give it weights
            p.normal_(0.0, std)
        else:
            p.mul_(std / current)


def build_synthetic_pipeline(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16, *,
                             configs: SyntheticConfigs = FULL_CONFIGS, seed: int = 0):
    """A ``ZImagePipeline`` of ``configs`` with random weights, built directly on ``device`` in ``dtype``.

    The tokenizer is the demo model's word-level tokenizer with a Qwen-style chat template (the hub tokenizer is
    not needed: one word = one token, which is all the benchmark's prompt needs).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zimage_ui.models.demo import build_demo_tokenizer

    device = torch.device(device)
    fork = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork), _default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        text_encoder = Qwen3Model(Qwen3Config(**configs.text_encoder)).eval()
        transformer = ZImageTransformer2DModel(**configs.transformer).eval()
        vae = AutoencoderKL(**configs.vae).eval()
        for module in (text_encoder, transformer, vae):
            _rescale(module)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                          text_encoder=text_encoder, tokenizer=build_demo_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_count(pipe: Any) -> dict[str, int]:
    """Parameters per component (the released model: transformer 6.155B, text encoder 4.022B, VAE 84M)."""
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("transformer", "text_encoder", "vae")}


def load_synthetic(device: torch.device | str = "auto", dtype: torch.dtype | str = "auto", *,
                   configs: SyntheticConfigs = FULL_CONFIGS, seed: int = 0):
    """A :class:`~zimage_ui.models.loading.LoadedModel` for the engine (``Engine(settings, loader=...)``).

    ``load_seconds`` is the time to build the random model on the device (there is nothing to read from disk);
    ``to_device_seconds`` is 0 because it is built there.
    """
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    t0 = time.perf_counter()
    pipe = build_synthetic_pipeline(dev, dt, configs=configs, seed=seed)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    source = ModelSource(kind="synthetic", spec="synthetic", path=None, repo_id=SYNTHETIC_MODEL_ID)
    return SyntheticLoadedModel(pipe, source, dev, dt, time.perf_counter() - t0, 0.0)


class SyntheticLoadedModel(LoadedModel):
    """A LoadedModel whose label says what it is."""

    @property
    def label(self) -> str:
        return SYNTHETIC_LABEL


def save_synthetic(pipe: Any, folder: str | Path) -> Path:
    """Write ``pipe`` as a diffusers folder (model_index.json + safetensors), so a benchmark can measure the real
    loading path (``--model FOLDER``) on weights that sit in the page cache."""
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
