"""The README's two commands are shell scripts; their arguments must reach zimage-ui (and never the installer), and
their first run says what it installs while it does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_serve_script_passes_its_arguments_to_zimage_ui_serve():
    # bootstrap.sh is sourced; a sourced script without arguments of its own sees the caller's, and once took
    # "--host" for the name of a pip extra
    done = subprocess.run([str(ROOT / "scripts" / "serve"), "--help"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--max-queue" in done.stdout and "usage: zimage-ui serve" in done.stdout


def _fresh_copy(dest: Path) -> Path:
    """This working tree's files (tracked and new, not ignored: what a clone has) under ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.mark.slow
def test_first_run_says_what_it_installs_and_shows_pips_progress(tmp_path):
    # scripts/serve on a fresh clone was silent for ~95 s while it installed
    clone = _fresh_copy(tmp_path / "clone")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(clone / ".venv")], check=True, timeout=120)
    # the dependencies come from this test's own environment (a .pth file), so the first run installs only
    # zimage-ui itself: the real first-run path and its output, in about a minute instead of a torch download
    site = Path(subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "zz-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PYTHON": base}
    first = subprocess.run(["bash", "-c", "source scripts/bootstrap.sh test"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    said = first.stderr.splitlines()
    assert said[0].startswith("zimage-ui setup: installing zimage-ui with [test]") and "pip's progress" in said[0]
    assert "Successfully installed" in first.stdout and "zimage-ui" in first.stdout  # pip's own lines, not -q
    assert re.match(r"zimage-ui setup: done in \d+ s", said[-1])
    # nothing changed: the second run installs nothing and says nothing
    again = subprocess.run(["bash", "-c", "source scripts/bootstrap.sh test"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == again.stderr == ""
