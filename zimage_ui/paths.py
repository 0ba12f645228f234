"""Where the package's data lives: ``zimage_ui/assets/`` (presets, sizes, translations, CSS), shipped in the wheel.

Found through ``importlib.resources``, so it is the installed package's own copy — from a checkout, an editable
install or a plain wheel alike. Installs are unpacked folders (never zip imports), so it is a real directory:
gradio serves the CSS from a file path.

    >>> (ASSETS_DIR / "presets.toml").is_file(), (ASSETS_DIR / "i18n" / "en.json").is_file()
    (True, True)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ASSETS_DIR = Path(str(resources.files("zimage_ui").joinpath("assets")))
PRESETS_FILE = ASSETS_DIR / "presets.toml"
