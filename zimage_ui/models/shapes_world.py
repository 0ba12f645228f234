"""The shapes world: the captions and pictures the demo model is trained on, and the split it is judged on.

A scene is one to three flat, anti-aliased shapes of one colour on a plain background. Its caption follows a small
fixed grammar ("a red circle on a blue background", "two yellow squares", "a small green triangle in the top left
corner", "a large purple star"). Everything is a pure function of a seed: the same seed gives the same scenes and
the same pixels on any machine.

    >>> import random
    >>> scene = sample_scene(random.Random(3))
    >>> scene.caption == caption_for(scene)
    True
    >>> render(scene, 64).size
    (64, 64)

World conventions that keep the picture a function of the words: an unnamed background is white, an unnamed
position is the middle, and two or three objects stand in a row across the middle.

The held-out split: every (object colour, shape, background colour) triple whose stable hash falls in one bucket of
:data:`HELD_OUT_BUCKETS` is never trained on; the judge's figures are measured on those triples only.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, replace

# Colour names and the RGB they are drawn in (chosen far apart: the nearest pair is ≥ 80 apart in RGB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (245, 222, 40),
    "green": (40, 165, 60),
    "blue": (35, 75, 220),
    "purple": (130, 45, 180),
    "pink": (245, 135, 195),
    "brown": (115, 70, 35),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# Side of one object's bounding box, as a fraction of the canvas side: (one object, one of two or three).
SIZES: dict[str, tuple[float, float]] = {"small": (0.24, 0.15), "": (0.36, 0.20), "large": (0.50, 0.25)}
# Position phrase -> (column, row) on a 3x3 grid; "" is unnamed (the middle).
POSITIONS: dict[str, tuple[int, int]] = {
    "in the top left corner": (0, 0),
    "at the top": (1, 0),
    "in the top right corner": (2, 0),
    "on the left": (0, 1),
    "in the middle": (1, 1),
    "on the right": (2, 1),
    "in the bottom left corner": (0, 2),
    "at the bottom": (1, 2),
    "in the bottom right corner": (2, 2),
}
DEFAULT_BACKGROUND = "white"
GRID = (0.2, 0.5, 0.8)  # centres of the grid's columns and rows
HELD_OUT_BUCKETS = 8  # 1 in 8 (colour, shape, background) triples is held out

FUNCTION_WORDS = ("a", "an", "on", "in", "at", "the", "of", "with", "background", "corner", "top", "bottom", "left",
                  "right", "middle", "one", "two", "three", "small", "large", "big", "center", "centre")


def world_words() -> frozenset[str]:
    """Every word a shapes-world caption can contain (what the trained demo model knows)."""
    words = set(FUNCTION_WORDS) | set(COLOURS) | set(SHAPES) | set(PLURALS.values())
    for phrase in POSITIONS:
        words.update(phrase.split())
    return frozenset(words)


@dataclass(frozen=True)
class Scene:
    """One picture of the shapes world and its caption."""

    colour: str
    shape: str
    count: int = 1
    size: str = ""  # "", "small" or "large"
    position: str = ""  # a key of POSITIONS, "" for unnamed (the middle); only for count == 1
    background: str = ""  # "" for unnamed (white)
    bg_last: bool = False  # caption word order: position after the background phrase
    jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)  # dx, dy (fraction of canvas), size factor - 1
    caption: str = ""

    @property
    def background_colour(self) -> str:
        return self.background or DEFAULT_BACKGROUND

    @property
    def cell(self) -> tuple[int, int]:
        """The grid cell the object stands in (the middle cell when unnamed or several objects)."""
        return POSITIONS[self.position] if self.position else (1, 1)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def caption_for(scene: Scene) -> str:
    """The caption of ``scene`` in the world's grammar."""
    size = f"{scene.size} " if scene.size else ""
    noun = scene.shape if scene.count == 1 else PLURALS[scene.shape]
    head = f"{size}{scene.colour} {noun}"
    if scene.count == 1:
        head = f"{_article(head)} {head}"
    else:
        head = f"{COUNT_WORDS[scene.count]} {head}"
    bg = f"on {_article(scene.background)} {scene.background} background" if scene.background else ""
    parts = [head]
    if scene.bg_last:
        parts += [bg, scene.position]
    else:
        parts += [scene.position, bg]
    return " ".join(p for p in parts if p)


def triple_is_held_out(colour: str, shape: str, background: str) -> bool:
    """Whether (object colour, shape, background colour) belongs to the held-out split (stable across runs)."""
    digest = hashlib.sha256(f"{colour}|{shape}|{background}".encode()).digest()
    return digest[0] % HELD_OUT_BUCKETS == 0


def is_held_out(scene: Scene) -> bool:
    return triple_is_held_out(scene.colour, scene.shape, scene.background_colour)


def _draw_scene(rng: random.Random) -> Scene:
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    count = rng.choices((1, 2, 3), weights=(6, 2, 2))[0]
    size = rng.choice(list(SIZES))
    position = rng.choice(list(POSITIONS) + [""] * 3) if count == 1 else ""
    background = rng.choice([c for c in COLOURS if c != colour] + [""] * 2)
    if background == "" and colour == DEFAULT_BACKGROUND:
        background = rng.choice([c for c in COLOURS if c != colour])
    jitter = (rng.uniform(-0.025, 0.025), rng.uniform(-0.025, 0.025), rng.uniform(-0.08, 0.08))
    scene = Scene(colour, shape, count, size, position, background, rng.random() < 0.3, jitter)
    return replace(scene, caption=caption_for(scene))


def sample_scene(rng: random.Random, *, held_out: bool = False) -> Scene:
    """A random scene from the training split (or, with ``held_out``, from the held-out split)."""
    while True:
        scene = _draw_scene(rng)
        if is_held_out(scene) == held_out:
            return scene


def training_scene(seed: int, index: int) -> Scene:
    """Training scene number ``index`` of the world seeded ``seed`` (independent of how many are drawn)."""
    return sample_scene(random.Random(f"train:{seed}:{index}"))


def held_out_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` scenes of the held-out split (the judge's prompts); the first 30 are the CI subset."""
    rng = random.Random(f"held-out:{seed}")
    return [sample_scene(rng, held_out=True) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """The outline of ``shape`` filling a ``side``-wide box centred on (cx, cy); None for the circle."""
    h = side / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "cross":
        a = side / 6  # arms one third of the box wide
        return [(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a), (cx + h, cy + a),
                (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h), (cx - a, cy + a), (cx - h, cy + a),
                (cx - h, cy - a), (cx - a, cy - a)]
    if shape == "star":
        import math

        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * 0.42
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((math.cos(ang) * r, math.sin(ang) * r))
        # centre the star's bounding box (its points reach lower than its top) and scale it to fill the box
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        scale = side / max(max(xs) - min(xs), max(ys) - min(ys))
        mx, my = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        return [(cx + (x - mx) * scale, cy + (y - my) * scale) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def object_boxes(scene: Scene) -> list[tuple[float, float, float]]:
    """Each object's (centre x, centre y, side) as fractions of the canvas."""
    dx, dy, ds = scene.jitter
    side = SIZES[scene.size][0 if scene.count == 1 else 1] * (1 + ds)
    if scene.count == 1:
        col, row = scene.cell
        margin = side / 2 + 0.03
        cx = min(max(GRID[col] + dx, margin), 1 - margin)
        cy = min(max(GRID[row] + dy, margin), 1 - margin)
        return [(cx, cy, side)]
    xs = (0.3, 0.7) if scene.count == 2 else (0.2, 0.5, 0.8)
    return [(x + dx, 0.5 + dy, side) for x in xs]


def render(scene: Scene, side: int = 256, supersample: int = 2):
    """``scene`` as an RGB ``PIL.Image`` of ``side`` × ``side``, drawn ``supersample`` times larger and reduced
    (anti-aliased edges)."""
    from PIL import Image, ImageDraw

    big = side * supersample
    img = Image.new("RGB", (big, big), COLOURS[scene.background_colour])
    draw = ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    for cx, cy, s in object_boxes(scene):
        cx, cy, s = cx * big, cy * big, s * big
        poly = shape_polygon(scene.shape, cx, cy, s)
        if poly is None:
            draw.ellipse((cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return img.resize((side, side), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------------------------
# Words
# ---------------------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[^\W\d_]+")


def unknown_words(prompt: str) -> list[str]:
    """Words of ``prompt`` outside the shapes world, in order, each once (case and punctuation ignored)."""
    known = world_words()
    out: list[str] = []
    for word in _WORD_RE.findall((prompt or "").lower()):
        if word not in known and word not in out:
            out.append(word)
    return out


EXAMPLE_PROMPTS = (
    "a red circle on a blue background",
    "two yellow squares on a black background",
    "a green triangle in the top left corner",
    "a large purple star",
    "three white diamonds on a pink background",
    "a small orange cross at the bottom",
)
