"""The parameter validator: one pure function every door (CLI, web UI, REST API) calls before the queue.

It turns whatever a door received into the exact request the engine will run, and lists each thing it changed and
why. Values out of range are clamped (that is the product's job); values that are not values at all — text where a
number belongs, NaN, an empty prompt — raise :class:`RequestError` naming the field.

    >>> from zimage_ui.presets import load_presets
    >>> v = validate(GenerationRequest(prompt="a red circle", steps=999, seed=7), load_presets())
    >>> v.request.steps, [str(c) for c in v.changes]
    (16, ['steps 999 → 16 (turbo allows 1–16)'])
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .presets import Preset, PresetBook

MAX_PROMPT_CHARS = 8000  # far above 512 tokens; bounds tokenizer work on garbage input


@dataclass
class GenerationRequest:
    """What a door received. Any field may hold anything (text from a form, JSON, argv); ``None`` = default."""

    prompt: Any = None
    negative_prompt: Any = None
    preset: Any = None
    steps: Any = None
    guidance: Any = None
    width: Any = None
    height: Any = None
    seed: Any = None
    batch: Any = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GenerationRequest:
        """Build from a mapping, refusing names that are not fields (so a typo is not silently ignored)."""
        if not isinstance(data, Mapping):
            raise RequestError([("body", f"expected an object with request fields, got {type(data).__name__}")])
        names = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise RequestError([(unknown[0], f"unknown field (known: {', '.join(sorted(names))})")])
        return cls(**dict(data))


@dataclass(frozen=True)
class RunRequest:
    """The request the engine runs: every value checked, clamped and filled in."""

    prompt: str
    negative_prompt: str
    preset: str
    steps: int
    guidance: float
    width: int
    height: int
    seed: int
    batch: int

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance is on: the transformer runs twice per step."""
        return self.guidance > 0

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def seeds(self) -> list[int]:
        """One seed per image: seed, seed+1, … so image *i* of a batch can be remade alone (as A1111 does)."""
        return [(self.seed + i) % 2**32 for i in range(self.batch)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Change:
    """One thing the validator changed: ``steps 60 → 50 (quality allows 20–50)``."""

    field: str
    before: Any
    after: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.field} {_show(self.before)} → {_show(self.after)} ({self.reason})"

    @property
    def is_seed_draw(self) -> bool:
        """A random seed drawn for a request that gave none (or -1): reported, but not a clamp."""
        return self.field == "seed" and self.before in ("random", -1)


@dataclass(frozen=True)
class Validated:
    request: RunRequest
    changes: tuple[Change, ...] = ()

    @property
    def messages(self) -> list[str]:
        return [str(c) for c in self.changes]


class RequestError(ValueError):
    """A request that can't be run. ``errors`` is a list of (field, message); ``field`` is the first field."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = list(errors)
        self.field = self.errors[0][0] if self.errors else "request"
        super().__init__("; ".join(f"{f}: {m}" for f, m in self.errors) or "invalid request")


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:37] + "…")
    return str(value)


class _Fields:
    """Collects field errors so one answer names every bad field, not only the first."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self.changes: list[Change] = []

    def error(self, name: str, message: str) -> None:
        self.errors.append((name, message))

    def number(self, name: str, value: Any) -> float | int | None:
        """A finite int or float from a number or numeric text; ``None`` stays ``None``; else an error."""
        if value is None:
            return None
        if isinstance(value, bool):
            self.error(name, f"expected a number, got {value!r}")
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            number: float | int = value
        elif isinstance(value, str):
            text = value.strip()
            if text == "":
                return None
            try:
                number = int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    self.error(name, f"{_show(value)!s} is not a number")
                    return None
        else:
            self.error(name, f"expected a number, got {type(value).__name__}")
            return None
        if isinstance(number, float) and not math.isfinite(number):
            self.error(name, f"must be a finite number, got {number}")
            return None
        return number

    def whole(self, name: str, value: Any) -> int | None:
        number = self.number(name, value)
        if number is None or isinstance(number, int):
            return number
        rounded = int(round(number))
        self.changes.append(Change(name, number, rounded, "whole numbers only"))
        return rounded

    def clamp(self, name: str, value: int | float, low: int | float, high: int | float, why: str) -> int | float:
        if value < low or value > high:
            clamped = min(max(value, low), high)
            self.changes.append(Change(name, value, clamped, why))
            return clamped
        return value

    def text(self, name: str, value: Any, *, required: bool) -> str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            self.error(name, f"expected text, got {type(value).__name__}")
            return ""
        cleaned = value.replace("\x00", "").strip()
        try:
            cleaned.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in JSON): no tokenizer, file or header takes it
            self.error(name, f"not valid Unicode text (a lone surrogate, {cleaned[exc.start]!a}, at character "
                             f"{exc.start + 1})")
            return ""
        if required and not cleaned:
            self.error(name, "must not be empty")
        if len(cleaned) > MAX_PROMPT_CHARS:
            self.changes.append(Change(name, f"{len(cleaned)} characters", f"{MAX_PROMPT_CHARS} characters",
                                       "longer text cannot reach the text encoder"))
            cleaned = cleaned[:MAX_PROMPT_CHARS]
        return cleaned


def _pick_preset(book: PresetBook, value: Any, f: _Fields) -> Preset | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return book.presets[book.default]
    if not isinstance(value, str):
        f.error("preset", f"expected a preset name, got {type(value).__name__}")
        return None
    wanted = value.strip().lower()
    for preset in book.presets.values():
        if wanted in (preset.name.lower(), preset.label.lower()):
            return preset
    f.error("preset", f"unknown preset {_show(value)!r} (choose {', '.join(book.presets)})")
    return None


def validate(
    raw: GenerationRequest | Mapping[str, Any],
    book: PresetBook,
    *,
    count_tokens: Callable[[str], int] | None = None,
    rng: random.Random | None = None,
) -> Validated:
    """Check, clamp and fill in ``raw``; return the request to run and what changed. Raises only RequestError.

    ``count_tokens`` measures a prompt as the text encoder sees it (chat template included); prompts over the
    limit are reported as truncated. ``rng`` draws the seed when none is given (tests pass a seeded one).
    """
    if not isinstance(raw, GenerationRequest):
        raw = GenerationRequest.from_mapping(raw)
    lim = book.limits
    f = _Fields()
    preset = _pick_preset(book, raw.preset, f)
    prompt = f.text("prompt", raw.prompt, required=True)
    negative = f.text("negative_prompt", raw.negative_prompt, required=False)
    steps = f.whole("steps", raw.steps)
    guidance = f.number("guidance", raw.guidance)
    width = f.whole("width", raw.width)
    height = f.whole("height", raw.height)
    seed = f.whole("seed", raw.seed)
    batch = f.whole("batch", raw.batch)
    if f.errors or preset is None:
        raise RequestError(f.errors)

    name = preset.name
    steps = int(f.clamp("steps", preset.steps if steps is None else steps, *preset.steps_range,
                        f"{name} allows {preset.steps_range[0]}–{preset.steps_range[1]}"))
    # clamp before float(): a huge JSON integer (10**400) is a number to clamp, not an OverflowError
    guidance = preset.guidance if guidance is None else guidance
    guidance = float(f.clamp("guidance", guidance, *preset.guidance_range,
                             f"{name} allows {preset.guidance_range[0]:g}–{preset.guidance_range[1]:g}"))
    sides = {}
    for side_name, value, default in (("width", width, preset.width), ("height", height, preset.height)):
        value = default if value is None else value
        value = int(f.clamp(side_name, value, *lim.side, f"sides must be {lim.side[0]}–{lim.side[1]} px"))
        snapped = max(lim.side[0], min(lim.side[1], round(value / lim.side_multiple) * lim.side_multiple))
        if snapped != value:
            f.changes.append(Change(side_name, value, snapped, f"sides must be multiples of {lim.side_multiple}"))
        sides[side_name] = snapped
    batch = int(f.clamp("batch", 1 if batch is None else batch, *lim.batch,
                        f"batch must be {lim.batch[0]}–{lim.batch[1]}"))
    if seed is None or seed == -1:
        drawn = (rng or random.SystemRandom()).randint(lim.seed[0], lim.seed[1])
        f.changes.append(Change("seed", "random" if seed is None else -1, drawn, "random seed"))
        seed = drawn
    else:
        seed = int(f.clamp("seed", seed, *lim.seed, f"seeds are {lim.seed[0]}–{lim.seed[1]}"))
    if negative and guidance == 0:
        f.changes.append(Change("negative_prompt", negative, "", "ignored without guidance (guidance is 0)"))
        negative = ""
    if count_tokens is not None:
        for field_name, text in (("prompt", prompt), ("negative_prompt", negative)):
            if text and (tokens := count_tokens(text)) > lim.max_prompt_tokens:
                f.changes.append(Change(field_name, f"{tokens} tokens", f"{lim.max_prompt_tokens} tokens",
                                        "truncated: the text encoder reads no further"))
    request = RunRequest(prompt=prompt, negative_prompt=negative, preset=name, steps=steps, guidance=guidance,
                         width=sides["width"], height=sides["height"], seed=seed, batch=batch)
    return Validated(request=request, changes=tuple(f.changes))
