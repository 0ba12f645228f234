"""The README's two commands are shell scripts; their arguments must reach zimage-ui (and never the installer)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serve_script_passes_its_arguments_to_zimage_ui_serve():
    # bootstrap.sh is sourced; a sourced script without arguments of its own sees the caller's, and once took
    # "--host" for the name of a pip extra
    done = subprocess.run([str(ROOT / "scripts" / "serve"), "--help"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--max-queue" in done.stdout and "usage: zimage-ui serve" in done.stdout
