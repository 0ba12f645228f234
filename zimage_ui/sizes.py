"""The size picker's table: aspect ratios × size classes, read from ``zimage_ui/assets/sizes.toml``.

    >>> table = load_sizes()
    >>> table.size("1024", "16:9")
    (1280, 720)
    >>> table.find(1344, 576)
    ('1024', '21:9')
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .paths import ASSETS_DIR

SIZES_FILE = ASSETS_DIR / "sizes.toml"


@dataclass(frozen=True)
class SizeTable:
    """``sizes[class][ratio] = (width, height)``; ``demo_only`` names classes offered only with the demo model."""

    ratios: tuple[str, ...]
    sizes: dict[str, dict[str, tuple[int, int]]]
    demo_only: frozenset[str] = frozenset()

    def classes(self, *, demo: bool, max_side: int | None = None) -> list[str]:
        """Size classes to offer, smallest first: demo-only ones only on the demo model, none above ``max_side``."""
        out = []
        for name in sorted(self.sizes, key=int):
            if name in self.demo_only and not demo:
                continue
            if max_side is not None and max(max(wh) for wh in self.sizes[name].values()) > max_side:
                # a class whose sizes the validator would clamp is confusing; hide it instead
                continue
            out.append(name)
        return out

    def size(self, size_class: str, ratio: str) -> tuple[int, int]:
        return self.sizes[size_class][ratio]

    def find(self, width: int, height: int) -> tuple[str, str] | None:
        """(class, ratio) of an exact table size, else None (a custom size from the Advanced fields)."""
        for name, row in self.sizes.items():
            for ratio, wh in row.items():
                if wh == (width, height):
                    return name, ratio
        return None


@functools.lru_cache(maxsize=4)
def load_sizes(path: str | Path | None = None) -> SizeTable:
    """Read and check the table (every class names every ratio; sides are multiples of 16)."""
    path = Path(path) if path else SIZES_FILE
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    ratios = tuple(data["ratios"])
    sizes: dict[str, dict[str, tuple[int, int]]] = {}
    demo_only = set()
    for name, table in data["classes"].items():
        values = table["sizes"]
        if len(values) != len(ratios):
            raise ValueError(f"{path}: class {name} lists {len(values)} sizes for {len(ratios)} ratios")
        row = {}
        for ratio, text in zip(ratios, values, strict=True):
            width, height = (int(v) for v in text.lower().split("x"))
            if width % 16 or height % 16:
                raise ValueError(f"{path}: {text} in class {name} is not a multiple of 16")
            row[ratio] = (width, height)
        sizes[str(name)] = row
        if table.get("demo_only"):
            demo_only.add(str(name))
    return SizeTable(ratios=ratios, sizes=sizes, demo_only=frozenset(demo_only))
