"""The parameter validator: one pure function every door (CLI, web UI, REST API) calls before the queue.

It turns whatever a door received into the exact request the engine will run, and lists each thing it changed and
why. Values out of range are clamped (that is the product's job); values that are not values at all — text where a
number belongs, NaN, an empty prompt — raise :class:`RequestError` naming the field.

    >>> from zimage_ui.presets import load_presets
    >>> v = validate(GenerationRequest(prompt="a red circle", steps=999, seed=7), load_presets())
    >>> v.request.steps, [str(c) for c in v.changes]
    (16, ['steps 999 → 16 (turbo allows 1–16)'])

Changes and errors are data (a code and its values, see :mod:`zimage_ui.messages`); ``str()`` gives English, and
each door renders them in its own language:

    >>> c = v.changes[0]
    >>> c.code, c.values, render(c.message, "zh")
    ('preset_range', {'preset': 'turbo', 'low': 1, 'high': 16}, '步数 999 → 16（极速允许 1–16）')
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from dataclasses import field as dataclass_field
from typing import Any

from .messages import Count, Message, Word, kind_of, message, render, t
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
            raise RequestError([("body", message("error.not_object", kind=kind_of(data)))])
        names = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise RequestError([(unknown[0], message("error.unknown_field", known=[Word(n) for n in sorted(names)]))])
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
    """One thing the validator changed, as data: ``Change("steps", 60, 50, "preset_range", {"preset": "quality",
    "low": 20, "high": 50})``; ``str()`` says it in English: ``steps 60 → 50 (quality allows 20–50)``.

    ``code`` names the reason (``change.<code>`` in the catalogue); ``values`` are the reason's numbers. A
    ``values["unit"]`` ("characters", "tokens") says what ``before`` and ``after`` count."""

    field: str
    before: Any
    after: Any
    code: str
    values: Mapping[str, Any] = dataclass_field(default_factory=dict)

    @property
    def message(self) -> Message:
        """The whole line, ``field before → after (reason)``, for a door to render in its language."""
        before, after = self.before, self.after
        if unit := self.values.get("unit"):
            before, after = Count(before, unit), Count(after, unit)
        return Message("change", {"field": Word(self.field), "before": before, "after": after,
                                  "reason": self.reason_message})

    @property
    def reason_message(self) -> Message:
        return Message(f"change.{self.code}", self.values)

    @property
    def reason(self) -> str:
        """The reason in English (the API's ``reason`` field)."""
        return str(self.reason_message)

    def __str__(self) -> str:
        return str(self.message)

    @property
    def is_seed_draw(self) -> bool:
        """A random seed drawn for a request that gave none (or -1): reported, but not a clamp."""
        return self.code == "seed_drawn"


@dataclass(frozen=True)
class Validated:
    request: RunRequest
    changes: tuple[Change, ...] = ()

    @property
    def messages(self) -> list[str]:
        return [str(c) for c in self.changes]


class RequestError(ValueError):
    """A request that can't be run. ``errors`` is a list of (field, message), each message a
    :class:`~zimage_ui.messages.Message` (``str()``: English); ``field`` is the first field."""

    def __init__(self, errors: list[tuple[str, Message]]):
        self.errors = list(errors)
        self.field = self.errors[0][0] if self.errors else "request"
        super().__init__(self.render("en") or "invalid request")

    def lines(self) -> list[Message]:
        """One ``field: message`` line per error, to render in a door's language."""
        return [Message("field_error", {"field": Word(f), "message": m}) for f, m in self.errors]

    def render(self, lang: str) -> str:
        return t(lang, "error_separator").join(render(line, lang) for line in self.lines())


def _clip(text: str) -> str:
    """User text quoted back in a message: at most 38 characters."""
    return text[:37] + "…" if len(text) > 40 else text


class _Fields:
    """Collects field errors so one answer names every bad field, not only the first."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self.changes: list[Change] = []

    def error(self, name: str, problem: Message) -> None:
        self.errors.append((name, problem))

    def number(self, name: str, value: Any) -> float | int | None:
        """A finite int or float from a number or numeric text; ``None`` stays ``None``; else an error."""
        if value is None:
            return None
        if isinstance(value, bool):
            self.error(name, message("error.expected_number", kind=kind_of(value)))
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
                    self.error(name, message("error.not_a_number", value=_clip(value)))
                    return None
        else:
            self.error(name, message("error.expected_number", kind=kind_of(value)))
            return None
        if isinstance(number, float) and not math.isfinite(number):
            self.error(name, message("error.not_finite", value=str(number)))
            return None
        return number

    def whole(self, name: str, value: Any) -> int | None:
        number = self.number(name, value)
        if number is None or isinstance(number, int):
            return number
        rounded = int(round(number))
        self.changes.append(Change(name, number, rounded, "whole"))
        return rounded

    def clamp(self, name: str, value: int | float, low: int | float, high: int | float, code: str,
              **values: Any) -> int | float:
        if value < low or value > high:
            clamped = min(max(value, low), high)
            self.changes.append(Change(name, value, clamped, code, {**values, "low": low, "high": high}))
            return clamped
        return value

    def text(self, name: str, value: Any, *, required: bool) -> str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            self.error(name, message("error.expected_text", kind=kind_of(value)))
            return ""
        cleaned = value.replace("\x00", "").strip()
        try:
            cleaned.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in JSON): no tokenizer, file or header takes it
            self.error(name, message("error.lone_surrogate", char=ascii(cleaned[exc.start]), position=exc.start + 1))
            return ""
        if required and not cleaned:
            self.error(name, message("error.empty"))
        if len(cleaned) > MAX_PROMPT_CHARS:
            self.changes.append(Change(name, len(cleaned), MAX_PROMPT_CHARS, "too_long", {"unit": "characters"}))
            cleaned = cleaned[:MAX_PROMPT_CHARS]
        return cleaned


def _pick_preset(book: PresetBook, value: Any, f: _Fields) -> Preset | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return book.presets[book.default]
    if not isinstance(value, str):
        f.error("preset", message("error.expected_preset", kind=kind_of(value)))
        return None
    wanted = value.strip().lower()
    for preset in book.presets.values():
        if wanted in (preset.name.lower(), preset.label.lower()):
            return preset
    f.error("preset", message("error.unknown_preset", value=_clip(value), choices=[Word(n) for n in book.presets]))
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
    steps = int(f.clamp("steps", preset.steps if steps is None else steps, *preset.steps_range, "preset_range",
                        preset=name))
    # clamp before float(): a huge JSON integer (10**400) is a number to clamp, not an OverflowError
    guidance = preset.guidance if guidance is None else guidance
    guidance = float(f.clamp("guidance", guidance, *preset.guidance_range, "preset_range", preset=name))
    sides = {}
    for side_name, value, default in (("width", width, preset.width), ("height", height, preset.height)):
        value = default if value is None else value
        value = int(f.clamp(side_name, value, *lim.side, "side_range"))
        snapped = max(lim.side[0], min(lim.side[1], round(value / lim.side_multiple) * lim.side_multiple))
        if snapped != value:
            f.changes.append(Change(side_name, value, snapped, "side_multiple", {"multiple": lim.side_multiple}))
        sides[side_name] = snapped
    batch = int(f.clamp("batch", 1 if batch is None else batch, *lim.batch, "batch_range"))
    if seed is None or seed == -1:
        drawn = (rng or random.SystemRandom()).randint(lim.seed[0], lim.seed[1])
        f.changes.append(Change("seed", Word("random") if seed is None else -1, drawn, "seed_drawn"))
        seed = drawn
    else:
        seed = int(f.clamp("seed", seed, *lim.seed, "seed_range"))
    if negative and guidance == 0:
        f.changes.append(Change("negative_prompt", negative, "", "negative_ignored"))
        negative = ""
    if count_tokens is not None:
        for field_name, text in (("prompt", prompt), ("negative_prompt", negative)):
            if text and (tokens := count_tokens(text)) > lim.max_prompt_tokens:
                f.changes.append(Change(field_name, tokens, lim.max_prompt_tokens, "truncated", {"unit": "tokens"}))
    request = RunRequest(prompt=prompt, negative_prompt=negative, preset=name, steps=steps, guidance=guidance,
                         width=sides["width"], height=sides["height"], seed=seed, batch=batch)
    return Validated(request=request, changes=tuple(f.changes))
