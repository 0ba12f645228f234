"""The page's words in English and Chinese, kept as data in ``zimage_ui/assets/i18n/<lang>.json``.

Translation happens on the server, per browser session: the status line, the VRAM bar's legend and the clamp
messages are built in Python, so one table serves both the static labels and the live text.

    >>> t("zh", "generate")
    '生成'
    >>> pick_language("auto", "zh-CN,zh;q=0.9,en;q=0.8")
    'zh'
    >>> pick_language("auto", "fr-FR,fr;q=0.9")
    'en'
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..paths import ASSETS_DIR
from ..units import GiB, MiB, gib_text

I18N_DIR = ASSETS_DIR / "i18n"
LANGUAGES = ("en", "zh")
DEFAULT_LANGUAGE = "en"


@functools.lru_cache(maxsize=8)
def strings(lang: str, folder: str | None = None) -> dict[str, str]:
    """The table for ``lang`` (read once)."""
    path = Path(folder or I18N_DIR) / f"{lang}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def t(lang: str, key: str, **values: object) -> str:
    """The text for ``key`` in ``lang`` with ``{names}`` filled in; English, then the key itself, as fallbacks."""
    lang = lang if lang in LANGUAGES else DEFAULT_LANGUAGE
    text = strings(lang).get(key)
    if text is None:
        text = strings(DEFAULT_LANGUAGE).get(key, key)
    return text.format(**values) if values else text


def pick_language(setting: str, accept_language: str | None) -> str:
    """``setting`` ("auto", "en", "zh") wins unless auto; then the browser's first supported language."""
    if setting in LANGUAGES:
        return setting
    for part in (accept_language or "").split(","):
        tag = part.split(";")[0].strip().lower()
        primary = tag.split("-")[0]
        if primary in LANGUAGES:
            return primary
    return DEFAULT_LANGUAGE


def format_bytes(n: int | float, lang: str = "en") -> str:
    """Bytes as the bar's legend shows them: GiB with one decimal (2**30 bytes, the unit nvidia-smi's MiB add up
    to), MiB below 0.95 GiB."""
    n = max(0, int(n))
    if n >= GiB * 0.95:
        return gib_text(n)
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


def format_seconds(seconds: float, lang: str = "en") -> str:
    """"0.8 s", "12 s", "3 min 5 s" (and the Chinese forms)."""
    if seconds < 10:
        text = f"{seconds:.1f}"
    elif seconds < 120:
        text = f"{seconds:.0f}"
    else:
        minutes, rest = divmod(int(round(seconds)), 60)
        return f"{minutes} 分 {rest} 秒" if lang == "zh" else f"{minutes} min {rest} s"
    return t(lang, "seconds", s=text)
