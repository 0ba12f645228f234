"""Presets and limits, read from ``zimage_ui/assets/presets.toml`` (or a user's file). One place for these numbers.

    >>> book = load_presets()
    >>> book.presets["turbo"].steps, book.presets["turbo"].guidance
    (8, 0.0)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .paths import PRESETS_FILE


class PresetFileError(ValueError):
    """The presets file is missing, not TOML, or its numbers contradict each other."""


@dataclass(frozen=True)
class Limits:
    steps: tuple[int, int] = (1, 50)
    guidance: tuple[float, float] = (0.0, 7.0)
    side: tuple[int, int] = (256, 2048)
    side_multiple: int = 16
    batch: tuple[int, int] = (1, 4)
    seed: tuple[int, int] = (0, 2**32 - 1)
    max_prompt_tokens: int = 512

    def with_max_side(self, max_side: int | None) -> Limits:
        """These limits with the largest side lowered to ``max_side`` (a setting), never below the smallest."""
        if max_side is None:
            return self
        top = max(self.side[0], min(self.side[1], int(max_side) // self.side_multiple * self.side_multiple))
        return Limits(self.steps, self.guidance, (self.side[0], top), self.side_multiple, self.batch, self.seed,
                      self.max_prompt_tokens)


@dataclass(frozen=True)
class Preset:
    name: str
    label: str
    description: str
    steps: int
    guidance: float
    steps_range: tuple[int, int]
    guidance_range: tuple[float, float]
    width: int
    height: int
    model: str = "turbo"  # "turbo" or "base": which weights this preset is meant for

    @property
    def uses_guidance(self) -> bool:
        """Whether this preset's default runs classifier-free guidance (and so reads a negative prompt)."""
        return self.guidance > 0


@dataclass(frozen=True)
class PresetBook:
    limits: Limits
    presets: dict[str, Preset] = field(default_factory=dict)
    source: str = ""

    @property
    def default(self) -> str:
        return next(iter(self.presets))

    def to_dict(self) -> dict:
        """JSON-able view (the REST API's /api/v1/presets and the UI read this)."""
        lim = self.limits
        return {
            "default": self.default,
            "limits": {"steps": list(lim.steps), "guidance": list(lim.guidance), "side": list(lim.side),
                       "side_multiple": lim.side_multiple, "batch": list(lim.batch), "seed": list(lim.seed),
                       "max_prompt_tokens": lim.max_prompt_tokens},
            "presets": {n: {"label": p.label, "description": p.description, "steps": p.steps,
                            "guidance": p.guidance, "steps_range": list(p.steps_range),
                            "guidance_range": list(p.guidance_range), "width": p.width, "height": p.height,
                            "model": p.model} for n, p in self.presets.items()},
        }


def _pair(table: dict, key: str, kind: type, where: str) -> tuple:
    value = table.get(key)
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise PresetFileError(f"{where}.{key} must be a list of two numbers, got {value!r}")
    low, high = kind(value[0]), kind(value[1])
    if low > high:
        raise PresetFileError(f"{where}.{key}: {low} > {high}")
    return low, high


def _inside(inner: tuple, outer: tuple, where: str) -> None:
    if inner[0] < outer[0] or inner[1] > outer[1]:
        raise PresetFileError(f"{where} {list(inner)} lies outside the limits {list(outer)}")


def load_presets(path: str | Path | None = None, max_side: int | None = None) -> PresetBook:
    """Read presets and limits from ``path`` (default: ``zimage_ui/assets/presets.toml``), checking every number."""
    path = Path(path) if path else PRESETS_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PresetFileError(f"presets file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PresetFileError(f"presets file {path} is not valid TOML: {exc}") from None
    lim_t = data.get("limits", {})
    try:
        limits = Limits(
            steps=_pair(lim_t, "steps", int, "limits"), guidance=_pair(lim_t, "guidance", float, "limits"),
            side=_pair(lim_t, "side", int, "limits"), side_multiple=int(lim_t.get("side_multiple", 16)),
            batch=_pair(lim_t, "batch", int, "limits"), seed=_pair(lim_t, "seed", int, "limits"),
            max_prompt_tokens=int(lim_t.get("max_prompt_tokens", 512)),
        ).with_max_side(max_side)
        presets: dict[str, Preset] = {}
        for name, t in (data.get("presets") or {}).items():
            where = f"presets.{name}"
            p = Preset(
                name=name, label=str(t.get("label", name.title())), description=str(t.get("description", "")),
                steps=int(t["steps"]), guidance=float(t["guidance"]),
                steps_range=_pair(t, "steps_range", int, where),
                guidance_range=_pair(t, "guidance_range", float, where),
                width=int(t.get("width", 1024)), height=int(t.get("height", 1024)), model=str(t.get("model", "turbo")),
            )
            _inside(p.steps_range, limits.steps, f"{where}.steps_range")
            _inside(p.guidance_range, limits.guidance, f"{where}.guidance_range")
            if not p.steps_range[0] <= p.steps <= p.steps_range[1]:
                raise PresetFileError(f"{where}.steps {p.steps} lies outside its steps_range")
            if not p.guidance_range[0] <= p.guidance <= p.guidance_range[1]:
                raise PresetFileError(f"{where}.guidance {p.guidance} lies outside its guidance_range")
            if p.model not in ("turbo", "base"):
                raise PresetFileError(f"{where}.model must be 'turbo' or 'base', got {p.model!r}")
            presets[name] = p
    except KeyError as exc:
        raise PresetFileError(f"{path}: missing key {exc}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, PresetFileError):
            raise
        raise PresetFileError(f"{path}: {exc}") from None
    if not presets:
        raise PresetFileError(f"{path} defines no [presets.*] table")
    return PresetBook(limits=limits, presets=presets, source=str(path))
