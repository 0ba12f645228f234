"""PNG metadata and crash-safe image files.

Every image carries an A1111-style ``parameters`` text chunk (read by A1111, Forge, ComfyUI and civitai) and a
``zimage`` chunk with the whole request as JSON, the model id and package versions.

    >>> from zimage_ui.validation import RunRequest
    >>> r = RunRequest("a red circle", "", "turbo", 8, 0.0, 256, 256, 7, 1)
    >>> parameters_text(r, seed=7, model="demo")
    'a red circle\\nSteps: 8, CFG scale: 0, Seed: 7, Size: 256x256, Model: demo, Preset: turbo'
"""

from __future__ import annotations

import functools
import json
import struct
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .files import PART_SUFFIX, write_atomic
from .validation import RunRequest

_VERSIONED = ("zimage-ui", "torch", "diffusers", "transformers")


def package_versions() -> dict[str, str]:
    """The versions of the packages that made an image (read once per process: every PNG asks, and each look-up
    scans the installed distributions)."""
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def parameters_text(request: RunRequest, *, seed: int, model: str) -> str:
    """The A1111 ``parameters`` string for one image of ``request`` made with ``seed``."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(
        f"Steps: {request.steps}, CFG scale: {request.guidance:g}, Seed: {seed}, "
        f"Size: {request.width}x{request.height}, Model: {model}, Preset: {request.preset}"
    )
    return "\n".join(lines)


def png_info(request: RunRequest, *, seed: int, model: str,
             extra: dict[str, Any] | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(request, seed=seed, model=model))
    payload = {"request": request.to_dict(), "seed": seed, "model": model, "versions": package_versions()}
    if extra:
        payload.update(extra)
    info.add_itxt("zimage", json.dumps(payload, ensure_ascii=False, sort_keys=True))
    return info


# PNG colour type and channels for the 8-bit modes we write ourselves; anything else goes through PIL's encoder.
_COLOUR_TYPES = {"L": (0, 1), "RGB": (2, 3), "RGBA": (6, 4)}
_SUB_FILTER = 1
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# ISA-L's level 1: on an H200 box's CPU 10.5 ms for a 1024² image against 19.4 ms at level 3 (its best), with the
# same size for noise and 0.4% smaller for a photo-like image here (docs/benchmarks.md, section 6)
PNG_DEFLATE_LEVEL = 1


def encode_png(image: Image.Image, info: PngImagePlugin.PngInfo, level: int = PNG_DEFLATE_LEVEL) -> bytes:
    """The PNG bytes of ``image`` with ``info`` (the REST API answers these without touching disk).

    PIL's encoder spends ~0.25 s on a 1024² image in zlib — a quarter of a whole Turbo generation on an H100
    (docs/benchmarks.md). For 8-bit L/RGB/RGBA images we write the same PNG with every row under the *Sub* filter
    (numpy) and ISA-L's deflate (the ``isal`` package): about 10 ms, and files about PIL level 4's size
    (photo-like images; smooth gradients ~20% larger). The chunks, metadata included, are PIL's own.

    >>> import io
    >>> image = Image.new("RGB", (64, 32), (200, 30, 90))
    >>> info = PngImagePlugin.PngInfo(); info.add_text("parameters", "a red circle")
    >>> back = Image.open(io.BytesIO(encode_png(image, info)))
    >>> back.text["parameters"], back.tobytes() == image.tobytes()
    ('a red circle', True)
    """
    import io

    buf = io.BytesIO()
    if image.mode not in _COLOUR_TYPES:
        image.save(buf, format="PNG", pnginfo=info, compress_level=4)
        return buf.getvalue()
    import numpy as np
    from isal import isal_zlib

    colour_type, channels = _COLOUR_TYPES[image.mode]
    rows = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width * channels)
    filtered = np.empty((image.height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = _SUB_FILTER
    filtered[:, 1:1 + channels] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=filtered[:, 1 + channels:])  # wraps mod 256, as PNG wants
    buf.write(_PNG_SIGNATURE)
    PngImagePlugin.putchunk(buf, b"IHDR", struct.pack(">IIBBBBB", image.width, image.height, 8, colour_type, 0, 0, 0))
    chunks = info.chunks if info is not None else []
    for cid, data, after_idat in chunks:
        if not after_idat:
            PngImagePlugin.putchunk(buf, cid, data)
    PngImagePlugin.putchunk(buf, b"IDAT", isal_zlib.compress(filtered.data, level))
    for cid, data, after_idat in chunks:
        if after_idat:
            PngImagePlugin.putchunk(buf, cid, data)
    PngImagePlugin.putchunk(buf, b"IEND", b"")
    return buf.getvalue()


STALE_PART_S = 60.0  # a PNG is written in well under a second; an older .part was left by a crash


def sweep_partial_files(folder: Path, *, older_than_s: float = STALE_PART_S) -> int:
    """Delete the ``.<name>.png.<random>.part`` files a crash mid-write left under ``folder``; returns how many.

    Files younger than ``older_than_s`` are left alone: another process (``zimage-ui generate``) may be writing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    now = time.time()
    removed = 0
    for part in folder.rglob(f".*.png.*{PART_SUFFIX}"):
        try:
            if part.is_file() and now - part.stat().st_mtime >= older_than_s:
                part.unlink()
                removed += 1
        except OSError:  # gone already, or not ours to delete: leave it
            continue
    return removed


def save_png(image: Image.Image, path: Path, request: RunRequest, *, seed: int, model: str,
             extra: dict[str, Any] | None = None) -> Path:
    """Save one image with its metadata, atomically. Returns the absolute path."""
    return write_atomic(path, encode_png(image, png_info(request, seed=seed, model=model, extra=extra)))


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``parameters`` text and the parsed ``zimage`` JSON of a saved image."""
    with Image.open(path) as im:
        text = dict(im.text)  # type: ignore[attr-defined]
    return {"parameters": text.get("parameters"), "zimage": json.loads(text["zimage"]) if "zimage" in text else None}
