"""Byte units, one definition for the whole package: GiB = 2**30 bytes, the unit ``nvidia-smi``'s MiB add up to.

    >>> gib_text(int(19.28 * GiB)), gib_text(1.5 * GiB, digits=2)
    ('19.3 GiB', '1.50 GiB')
    >>> gib_bytes(0.5), gib_bytes(None)
    (536870912, None)
    >>> gib(int(1.3 * GiB)), gib(None)
    (1.3, None)
"""

from __future__ import annotations

GiB = 2**30
MiB = 2**20


def gib_text(n: float, digits: int = 1) -> str:
    """Bytes as ``"19.3 GiB"`` (log lines, plans, admission)."""
    return f"{n / GiB:.{digits}f} GiB"


def gib_bytes(gib_value: float | None) -> int | None:
    """A setting in GiB (``vram_budget_gb``, ``memory_margin_gb``) as whole bytes; ``None`` stays ``None``."""
    return None if gib_value is None else int(gib_value * GiB)


def gib(n: float | None) -> float | None:
    """Bytes as GiB rounded to 3 places, for JSON reports; ``None`` stays ``None``."""
    return None if n is None else round(n / GiB, 3)
