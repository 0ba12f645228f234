"""An automatic judge for the shapes world: what a picture shows, read from its pixels alone.

It reads the background colour (the border), the objects (pixels far from the background, split into connected
components), their colour (the commonest palette colour inside them), the largest object's shape (its mask,
normalised to its bounding box, matched against each shape's mask) and position (its box centre on a 3x3 grid),
and the number of objects. :func:`score` compares a reading with the scene the caption described.

    >>> from zimage_ui.models.shapes_world import Scene, render
    >>> scene = Scene("red", "star", background="blue", position="in the top left corner")
    >>> r = read_picture(render(scene, 128))
    >>> r.background, r.colour, r.shape, r.cell, r.count
    ('blue', 'red', 'star', (0, 0), 1)

Used by the tests (``tests/models/test_judge.py``) and at the end of ``zimage-ui train-demo``.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zimage_ui.models.shapes_world import COLOURS, SHAPES, Scene, render

OBJECT_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel belongs to an object
MIN_AREA = 0.002  # components smaller than this fraction of the picture are specks, not objects
TEMPLATE_SIDE = 32
_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    """What the judge sees in one picture (``shape``/``cell`` are None when it finds no object)."""

    background: str
    colour: str | None
    shape: str | None
    cell: tuple[int, int] | None
    count: int
    shape_iou: float = 0.0


def _nearest(rgb: np.ndarray, exclude: str | None = None) -> np.ndarray:
    """Index of the nearest palette colour for each row of ``rgb`` (N, 3)."""
    d = ((rgb[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1)
    if exclude is not None:
        d[:, _NAMES.index(exclude)] = np.inf
    return d.argmin(1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 4-connected components of ``mask``, largest first."""
    h, w = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    out: list[np.ndarray] = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        n = len(out) + 1
        labels[y0, x0] = n
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    queue.append((yy, xx))
        out.append(labels == n)
    return sorted(out, key=lambda m: -int(m.sum()))


def _normalised(mask: np.ndarray) -> np.ndarray:
    """``mask`` cropped to its bounding box and resized to TEMPLATE_SIDE², as a boolean array."""
    from PIL import Image

    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    img = Image.fromarray(crop, mode="F").resize((TEMPLATE_SIDE, TEMPLATE_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(img) > 0.5


@functools.lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    """Each shape's normalised mask, from the world's own renderer (a large single object)."""
    out = {}
    for shape in SHAPES:
        img = np.asarray(render(Scene("black", shape, size="large"), 256), dtype=np.float32)
        out[shape] = _normalised(np.linalg.norm(img - np.array(COLOURS["white"]), axis=-1) > OBJECT_DISTANCE)
    return out


def read_picture(picture: Any) -> Reading:
    """Read a ``PIL.Image`` or an (H, W, 3) array (0–255, or 0–1 floats) of the shapes world."""
    a = np.asarray(picture.convert("RGB") if hasattr(picture, "convert") else picture, dtype=np.float32)
    if a.max() <= 1.0:
        a = a * 255.0
    h, w, _ = a.shape
    b = max(2, h // 64)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3),
                             a[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _NAMES[int(_nearest(bg_rgb[None])[0])]
    mask = np.linalg.norm(a - bg_rgb, axis=-1) > OBJECT_DISTANCE
    comps = [c for c in _components(mask) if c.sum() >= MIN_AREA * h * w]
    if not comps:
        return Reading(background, None, None, None, 0)
    largest = comps[0]
    objects = [c for c in comps if c.sum() >= 0.3 * largest.sum()]
    inside = np.logical_or.reduce(objects)
    # the object's colour from its inner pixels (anti-aliased edges blend with the background)
    core = inside.copy()
    core[1:] &= inside[:-1]
    core[:-1] &= inside[1:]
    core[:, 1:] &= inside[:, :-1]
    core[:, :-1] &= inside[:, 1:]
    pixels = a[core if core.any() else inside]
    votes = np.bincount(_nearest(pixels, exclude=background), minlength=len(_NAMES))
    colour = _NAMES[int(votes.argmax())]
    norm = _normalised(largest)
    ious = {s: float((norm & t).sum() / max(1, (norm | t).sum())) for s, t in _templates().items()}
    shape = max(ious, key=ious.__getitem__)
    ys, xs = np.nonzero(largest)
    cx, cy = (xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h
    cell = (min(2, int(cx * 3)), min(2, int(cy * 3)))
    return Reading(background, colour, shape, cell, len(objects), ious[shape])


def score(scene: Scene, reading: Reading) -> dict[str, bool | None]:
    """Which parts of ``scene`` the picture got right; ``position`` is None when the caption names none."""
    return {
        "background": reading.background == scene.background_colour,
        "colour": reading.colour == scene.colour,
        "shape": reading.shape == scene.shape,
        "position": (reading.cell == scene.cell) if scene.position else None,
        "count": reading.count == scene.count,
    }


def summarise(scores: Iterable[dict[str, bool | None]]) -> dict[str, Any]:
    """Accuracy of each part over ``scores`` (parts that were None are left out), plus how many were judged."""
    scores = list(scores)
    out: dict[str, Any] = {"prompts": len(scores)}
    for key in ("background", "colour", "shape", "position", "count"):
        judged = [s[key] for s in scores if s[key] is not None]
        out[key] = (sum(judged) / len(judged)) if judged else None
        out[f"{key}_n"] = len(judged)
    return out


# The targets on the held-out prompts.
TARGETS = {"background": 0.90, "colour": 0.90, "shape": 0.75, "position": 0.80}


def generate_and_judge(pipe: Any, scenes: Sequence[Scene], *, side: int = 256, steps: int = 8,
                       guidance: float = 0.0, seed: int = 0, batch: int = 16) -> tuple[dict[str, Any], list]:
    """Draw each scene's caption with ``pipe`` (a ``ZImagePipeline``) and judge it.

    Image ``i`` uses a generator seeded ``seed + i``, so a prompt's picture does not depend on the batch size.
    Returns the summary and a list of (scene, reading, score, image) tuples.
    """
    import torch

    rows = []
    device = getattr(pipe, "_execution_device", torch.device("cpu"))
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        gens = [torch.Generator(device).manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe([s.caption for s in chunk], height=side, width=side, num_inference_steps=steps,
                      guidance_scale=guidance, generator=gens).images
        for s, img in zip(chunk, images, strict=True):
            reading = read_picture(img)
            rows.append((s, reading, score(s, reading), img))
    return summarise(r[2] for r in rows), rows
