"""What the program says, as data: a :class:`Message` is a code and its values; a door renders it in its language.

Lower layers (validation, memory admission, the engine, the models) return messages, never sentences. The words are
in one catalogue, ``zimage_ui/assets/i18n/<lang>.json`` (the page's own labels live there too), one template per
code and language; :func:`render` fills a template in. The page renders in English or Chinese, the REST API and the
command line in English (``str(message)``), and a log line is English too.

    >>> m = Message("change.preset_range", {"preset": "quality", "low": 20, "high": 50})
    >>> str(m), render(m, "zh")
    ('quality allows 20–50', '高质量允许 20–50')
    >>> render(Message("refusal.client_busy", {"jobs": Count(2, "jobs")}), "zh")
    '你已有 2 个任务在排队或运行；请等待，或先取消'

Values are shown by kind: bytes (a key ending in ``_bytes``) as GiB/MiB, a float without trailing zeros, a
:class:`Word` (a fixed word such as "random" or a field's name) in the page's language, a :class:`Count` with its
noun ("1 image", "3 images"), a list joined, a nested :class:`Message` rendered in the same language, user text as
it came (shortened when long).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .paths import ASSETS_DIR
from .units import GiB, MiB, gib_text

I18N_DIR = ASSETS_DIR / "i18n"
LANGUAGES = ("en", "zh")
DEFAULT_LANGUAGE = "en"


@functools.lru_cache(maxsize=8)
def strings(lang: str) -> dict[str, str]:
    """The catalogue for ``lang`` (read once)."""
    return json.loads((I18N_DIR / f"{lang}.json").read_text(encoding="utf-8"))


def t(lang: str, key: str, **values: object) -> str:
    """The text for ``key`` in ``lang`` with ``{names}`` filled in; English, then the key itself, as fallbacks."""
    lang = lang if lang in LANGUAGES else DEFAULT_LANGUAGE
    text = strings(lang).get(key)
    if text is None:
        text = strings(DEFAULT_LANGUAGE).get(key, key)
    return text.format(**values) if values else text


class Word(str):
    """A fixed word among a message's values ("random", a field's or a preset's name): said in the page's language
    when the catalogue has ``word.<it>``, else as it is (a preset from a config file keeps its own name)."""

    __slots__ = ()


@dataclass(frozen=True)
class Count:
    """A number with its noun: ``count.<noun>_one`` / ``count.<noun>_many`` in the catalogue ("1 image")."""

    n: int
    noun: str

    def __str__(self) -> str:
        return _show("n", self, DEFAULT_LANGUAGE)


@dataclass(frozen=True)
class Message:
    """A code from the catalogue and the values its template needs. ``str()`` gives English (logs, API, CLI)."""

    code: str
    values: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return render(self, DEFAULT_LANGUAGE)

    def __contains__(self, text: str) -> bool:
        """``"too large" in message`` looks in the English text (as it did when messages were strings)."""
        return text in str(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"code", "values", "text"}`` with the English text."""
        return {"code": self.code, "values": {k: jsonable(v) for k, v in self.values.items()}, "text": str(self)}


def message(code: str, **values: Any) -> Message:
    """``Message(code, values)`` written as a call: ``message("error.empty")``."""
    return Message(code, values)


def render(msg: Message | str, lang: str = DEFAULT_LANGUAGE) -> str:
    """``msg`` in ``lang``: its template with each value shown the way :func:`_show` shows it."""
    if not isinstance(msg, Message):
        return str(msg)
    return t(lang, msg.code, **{key: _show(key, value, lang) for key, value in msg.values.items()})


def word(lang: str, key: str) -> str:
    """``word.<key>`` in ``lang``, else ``key`` itself."""
    lang = lang if lang in LANGUAGES else DEFAULT_LANGUAGE
    return strings(lang).get(f"word.{key}") or strings(DEFAULT_LANGUAGE).get(f"word.{key}") or key


def kind_of(value: Any) -> Word:
    """What kind of JSON value ``value`` is, as a word ("text", "number", "list", …) for "expected …, got …"."""
    if isinstance(value, bool):
        return Word("boolean")
    if isinstance(value, int | float):
        return Word("number")
    if isinstance(value, str):
        return Word("text")
    if isinstance(value, list | tuple):
        return Word("list")
    if isinstance(value, Mapping):
        return Word("object")
    if value is None:
        return Word("null")
    return Word(type(value).__name__)


def format_bytes(n: int | float, lang: str = DEFAULT_LANGUAGE) -> str:
    """Bytes as people read them: GiB with one decimal (2**30 bytes, the unit nvidia-smi's MiB add up to), MiB
    below 0.95 GiB."""
    n = max(0, int(n))
    if n >= GiB * 0.95:
        return gib_text(n)
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


def _show(key: str, value: Any, lang: str) -> str:
    if isinstance(value, Message):
        return render(value, lang)
    if isinstance(value, Word) or key in ("field", "preset"):
        return word(lang, str(value))
    if isinstance(value, Count):
        return t(lang, f"count.{value.noun}_{'one' if value.n == 1 else 'many'}", n=value.n)
    if isinstance(value, list | tuple):
        return t(lang, "list_separator").join(_show("item", v, lang) if isinstance(v, Word) else f"'{v}'"
                                              for v in value)
    if key.endswith("_bytes") and isinstance(value, int | float):
        return format_bytes(value, lang)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:37] + "…")
    return str(value)


def jsonable(value: Any) -> Any:
    """A message value for JSON: numbers and text as they are, a Count as its number, a Message as its dict."""
    if isinstance(value, Message):
        return value.to_dict()
    if isinstance(value, Count):
        return value.n
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):  # NaN and infinities are not JSON
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return str(value) if isinstance(value, Word) else value
    return str(value)
