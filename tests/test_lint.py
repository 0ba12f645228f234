"""CI's lint: ``ruff check`` over the whole checkout (rules in pyproject.toml) finds nothing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    # ruff comes with the [test] extra; `python -m ruff` is that venv's own
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_ruff_check_passes():
    done = ruff(str(ROOT))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_ruff_check_fails_on_a_finding(tmp_path):
    # the same command and config on a file with an unused import: it must say so (the check above can fail)
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    done = ruff("--config", str(ROOT / "pyproject.toml"), str(bad))
    assert done.returncode == 1 and "F401" in done.stdout, done.stdout + done.stderr
