"""Turn a :class:`~zimage_ui.models.sources.ModelSource` into a ready ``ZImagePipeline`` on a device.

Everything here is offline: every ``from_pretrained`` gets ``local_files_only=True`` (rather than setting
``HF_HUB_OFFLINE``, which would change global state for the whole process).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zimage_ui.models.sources import ModelNotFoundError, ModelSource, check_model_folder

log = logging.getLogger(__name__)

FLOAT16_MESSAGE = (
    "float16 gives black/NaN images with Z-Image (Tongyi-MAI/Z-Image #14, #15); "
    "use bfloat16 on CUDA or float32 on CPU"
)
_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
_FLOAT16_NAMES = ("float16", "fp16", "half")
_WEIGHT_COMPONENTS = ("transformer", "text_encoder", "vae")


class DtypeError(ValueError):
    """A dtype that Z-Image cannot use (float16) or that we do not know."""


def pick_device(requested: str | torch.device = "auto") -> torch.device:
    """``auto`` → the current CUDA device if PyTorch sees one, else CPU; ``cpu``; ``cuda``/``cuda:N`` (needs CUDA)."""
    text = str(requested).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m:
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {text!r} asked for, but PyTorch {torch.__version__} sees no CUDA GPU; use cpu or auto"
            )
        index = torch.cuda.current_device() if m.group(1) is None else int(m.group(1))
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {text!r} asked for, but PyTorch sees only {count} CUDA GPU(s)")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {str(requested)!r}; use auto, cpu, cuda or cuda:N")


def _parse_dtype(requested: str | torch.dtype) -> torch.dtype | None:
    """The dtype named by ``requested`` (None for ``auto``); raises :class:`DtypeError` for float16 and unknowns."""
    if isinstance(requested, torch.dtype):
        if requested == torch.float16:
            raise DtypeError(FLOAT16_MESSAGE)
        if requested not in (torch.bfloat16, torch.float32):
            raise DtypeError(f"unsupported dtype {requested}; use bfloat16 or float32")
        return requested
    text = str(requested).strip().lower().removeprefix("torch.")
    if text == "auto":
        return None
    if text in _FLOAT16_NAMES:
        raise DtypeError(FLOAT16_MESSAGE)
    if text not in _DTYPE_NAMES:
        raise DtypeError(f"unknown dtype {str(requested)!r}; use auto, bfloat16 (bf16) or float32 (fp32)")
    return _DTYPE_NAMES[text]


def pick_dtype(device: torch.device, requested: str | torch.dtype = "auto") -> torch.dtype:
    """``auto`` → bfloat16 on CUDA, float32 on CPU; accepts bfloat16/bf16 and float32/fp32; refuses float16."""
    dtype = _parse_dtype(requested)
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and dtype == torch.bfloat16:
        # Allowed because it was asked for, but PyTorch's CPU convolutions (the VAE) ran ~100x slower in bf16 than
        # in fp32 when we measured (torch 2.13, AMD EPYC).
        log.warning("bfloat16 on CPU: the VAE's convolutions run about 100x slower than in float32")
    return dtype


@dataclass
class LoadedModel:
    """A pipeline on its device, with where it came from and how long loading took."""

    pipe: Any  # diffusers ZImagePipeline
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    load_seconds: float  # from_pretrained / build
    to_device_seconds: float  # .to(device)

    @property
    def model_id(self) -> str:
        """See :attr:`ModelSource.model_id`."""
        return self.source.model_id

    @property
    def label(self) -> str:
        """See :attr:`ModelSource.label` (for the demo model: trained or not, as loaded)."""
        if self.source.is_demo:
            from zimage_ui.models.demo import demo_label, is_trained

            return demo_label(is_trained(self.pipe))
        return self.source.label

    @property
    def is_demo(self) -> bool:
        """See :attr:`ModelSource.is_demo`."""
        return self.source.is_demo

    @property
    def is_base(self) -> bool:
        """See :attr:`ModelSource.is_base`."""
        return self.source.is_base

    def weights_bytes(self) -> int:
        """Bytes of all parameters and buffers of the transformer, text encoder and VAE.

        Components shared with another LoadedModel (``share_from``) are counted in both.
        """
        total = 0
        for name in _WEIGHT_COMPONENTS:
            module = getattr(self.pipe, name, None)
            if module is None:
                continue
            # parameters()/buffers() already skip tensors shared inside one module (tied weights).
            for t in (*module.parameters(), *module.buffers()):
                total += t.numel() * t.element_size()
        return total


def _short_reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _sync(device: torch.device) -> None:
    # .to() on CUDA is asynchronous; synchronise so to_device_seconds measures the copy, not its launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resolve_share(share_from: LoadedModel, device: torch.device | str, dtype: torch.dtype | str,
                   ) -> tuple[torch.device, torch.dtype]:
    # Shared modules already live on share_from's device in its dtype; the new transformer must match them.
    dev = share_from.device if str(device) == "auto" else pick_device(device)
    dt = share_from.dtype if str(dtype) == "auto" else pick_dtype(dev, dtype)
    if dev != share_from.device or dt != share_from.dtype:
        raise ValueError(
            f"share_from model is on {share_from.device} in {share_from.dtype}; "
            f"cannot share its components with a model on {dev} in {dt}"
        )
    return dev, dt


def _check_shareable(transformer: Any, share_from: LoadedModel, where: str) -> None:
    te_hidden = share_from.pipe.text_encoder.config.hidden_size
    latent = share_from.pipe.vae.config.latent_channels
    cfg = transformer.config
    if cfg.cap_feat_dim != te_hidden or cfg.in_channels != latent:
        raise ModelNotFoundError(
            f"{where}: its transformer (cap_feat_dim {cfg.cap_feat_dim}, in_channels {cfg.in_channels}) does not fit "
            f"the text encoder/VAE of {share_from.label} (hidden {te_hidden}, latent channels {latent})"
        )


def _load_scheduler(path: Path) -> Any:
    import diffusers

    # Use the scheduler class the folder names (Z-Image ships FlowMatchEulerDiscreteScheduler).
    name = "FlowMatchEulerDiscreteScheduler"
    try:
        name = json.loads((path / "scheduler" / "scheduler_config.json").read_text()).get("_class_name", name)
    except (OSError, ValueError, AttributeError):
        pass
    cls = getattr(diffusers, name, diffusers.FlowMatchEulerDiscreteScheduler)
    return cls.from_pretrained(str(path), subfolder="scheduler", local_files_only=True)


def load_model(source: ModelSource, *, device: torch.device | str = "auto", dtype: torch.dtype | str = "auto",
               share_from: LoadedModel | None = None) -> LoadedModel:
    """Load ``source`` onto ``device`` in ``dtype``, offline.

    With ``share_from``, only the transformer (and scheduler) are loaded from ``source``; the text encoder,
    tokenizer and VAE are the very objects of ``share_from`` (base Z-Image and Turbo have the same ones), so
    running the base model beside Turbo costs only its transformer's memory.

    Raises :class:`ModelNotFoundError` (one line) for a folder that is incomplete or fails to load, ``ValueError``
    for an unusable device and :class:`DtypeError` for float16.
    """
    if share_from is not None:
        dev, dt = _resolve_share(share_from, device, dtype)
    elif source.is_demo and pick_device(device).type == "cpu":
        # The demo model is float32 on CPU whatever was asked (it exists to be fast there); float16 is still refused.
        _parse_dtype(dtype)
        dev, dt = torch.device("cpu"), torch.float32
    else:
        dev = pick_device(device)
        dt = pick_dtype(dev, dtype)

    if source.is_demo:
        return _load_demo(source, dev, dt, share_from)
    if source.path is None:
        raise ModelNotFoundError(f"{source.spec}: model source has no folder")
    path = Path(source.path)
    if share_from is not None:
        return _load_transformer_only(source, path, dev, dt, share_from)

    check_model_folder(path)
    from diffusers import ZImagePipeline

    t0 = time.perf_counter()
    try:
        # low_cpu_mem_usage=True (accelerate's meta-device init) loads the tiny demo folder bit-identically to False
        # and avoids a second full-size copy of the 6B transformer in host memory.
        pipe = ZImagePipeline.from_pretrained(str(path), dtype=dt, local_files_only=True, low_cpu_mem_usage=True)
    except Exception as exc:
        raise ModelNotFoundError(f"{path}: {_short_reason(exc)}") from exc
    load_seconds = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    pipe.to(dev)
    _sync(dev)
    return LoadedModel(pipe, source, dev, dt, load_seconds, time.perf_counter() - t0)


def _load_demo(source: ModelSource, dev: torch.device, dt: torch.dtype,
               share_from: LoadedModel | None) -> LoadedModel:
    from zimage_ui.models.demo import load_demo_pipeline

    t0 = time.perf_counter()
    pipe = load_demo_pipeline()  # the trained weights when shipped, else the untrained builder
    if share_from is not None:
        from diffusers import ZImagePipeline

        _check_shareable(pipe.transformer, share_from, source.label)
        shared = share_from.pipe
        pipe = ZImagePipeline(scheduler=pipe.scheduler, vae=shared.vae, text_encoder=shared.text_encoder,
                              tokenizer=shared.tokenizer, transformer=pipe.transformer)
        pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    # torch's own Module.to, not diffusers' override: that one warns on every dtype cast about modules to keep in
    # float32, even when (as here) there are none, and the warning lands on every CLI user's terminal.
    for name in ("transformer",) if share_from is not None else _WEIGHT_COMPONENTS:
        torch.nn.Module.to(getattr(pipe, name), dev, dt)
    _sync(dev)
    return LoadedModel(pipe, source, dev, dt, load_seconds, time.perf_counter() - t0)


def _load_transformer_only(source: ModelSource, path: Path, dev: torch.device, dt: torch.dtype,
                           share_from: LoadedModel) -> LoadedModel:
    # Only what is loaded from this folder must be there: a user may fetch just transformer/ and scheduler/.
    check_model_folder(path, parts=("scheduler", "transformer"))
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    t0 = time.perf_counter()
    try:
        transformer = ZImageTransformer2DModel.from_pretrained(
            str(path), subfolder="transformer", dtype=dt, local_files_only=True, low_cpu_mem_usage=True
        )
        scheduler = _load_scheduler(path)
    except Exception as exc:
        raise ModelNotFoundError(f"{path}: {_short_reason(exc)}") from exc
    _check_shareable(transformer, share_from, str(path))
    shared = share_from.pipe
    pipe = ZImagePipeline(scheduler=scheduler, vae=shared.vae, text_encoder=shared.text_encoder,
                          tokenizer=shared.tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    transformer.to(dev)
    _sync(dev)
    return LoadedModel(pipe, source, dev, dt, load_seconds, time.perf_counter() - t0)
