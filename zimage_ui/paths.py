"""Where the project's data lives: ``assets/`` beside the package (the app runs from a checkout or editable install)."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = PROJECT_ROOT / "assets"
PRESETS_FILE = ASSETS_DIR / "presets.toml"
