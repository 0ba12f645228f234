"""The page's words in English and Chinese: the one catalogue, ``zimage_ui/assets/i18n/<lang>.json``, read by
:mod:`zimage_ui.messages` (the API and the command line render the same messages in English).

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

from ..messages import DEFAULT_LANGUAGE, I18N_DIR, LANGUAGES, format_bytes, render, strings, t

__all__ = ["DEFAULT_LANGUAGE", "I18N_DIR", "LANGUAGES", "format_bytes", "format_seconds", "pick_language", "render",
           "strings", "t"]


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
