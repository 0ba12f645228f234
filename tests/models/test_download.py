"""``download_model`` offline: argument checks and failing network calls. No test reaches a real hub.

Both hubs are pointed at http://127.0.0.1:9 (the discard port; nothing listens, so connections are refused at once).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zimage_ui.models.demo import build_demo_pipeline
from zimage_ui.models.download import DownloadError, download_model
from zimage_ui.models.sources import TURBO_REPO, find_in_hf_cache

from ..support import make_hf_snapshot

DEAD_ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture
def dead_hf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", DEAD_ENDPOINT)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")


@pytest.mark.parametrize("source", ["civitai", "", "s3"])
def test_unknown_source(source: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as exc:
        download_model(source, cache_dir=tmp_path)
    assert repr(source) in str(exc.value) and "hf or modelscope" in str(exc.value)


@pytest.mark.parametrize("repo", ["Z-Image-Turbo", "a/b/c", ""])
def test_bad_repo_id(repo: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="Org/Name"):
        download_model("hf", repo, cache_dir=tmp_path)


def test_hf_unreachable_is_one_line_download_error(dead_hf: None, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as exc:
        download_model("hf", cache_dir=tmp_path / "hub", progress=False)
    assert time.monotonic() - t0 < 30
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"Hugging Face download of {TURBO_REPO} into {tmp_path / 'hub'} failed: ")
    assert "Error" in msg  # the underlying exception's type, e.g. LocalEntryNotFoundError after ConnectError
    assert exc.value.__cause__ is not None


def test_hf_unreachable_but_cached_returns_the_snapshot(dead_hf: None, tmp_path: Path) -> None:
    # huggingface_hub falls back to a cached snapshot when the hub cannot be reached; we still check it is complete.
    src = tmp_path / "src"
    build_demo_pipeline().save_pretrained(src)
    cache = tmp_path / "hub"
    snap = make_hf_snapshot(cache, TURBO_REPO, src, rev="c" * 40)

    path = download_model("hf", cache_dir=cache)
    assert path == snap == cache / "models--Tongyi-MAI--Z-Image-Turbo" / "snapshots" / ("c" * 40)
    assert path == find_in_hf_cache(TURBO_REPO, cache)

    # An incomplete cached snapshot is reported, not returned.
    shutil.rmtree(snap / "vae")
    with pytest.raises(DownloadError) as exc:
        download_model("hf", cache_dir=cache)
    msg = str(exc.value)
    assert "incomplete" in msg and "vae/" in msg and "\n" not in msg


def test_modelscope_unreachable_is_one_line_download_error(tmp_path: Path) -> None:
    # modelscope reads its retry settings once, at import: run in a fresh interpreter with one attempt so a
    # refused connection fails in well under a second instead of after 1+2+4 s of back-off.
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "MODELSCOPE_ENDPOINT": DEAD_ENDPOINT,
        "MODELSCOPE_DOMAIN": "127.0.0.1:9",
        "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1",
        "MODELSCOPE_DOWNLOAD_MAX_RETRIES": "0",
        "MODELSCOPE_API_TIMEOUT": "2",
        "MODELSCOPE_CACHE": str(tmp_path / "ms"),
    }
    code = (
        "from zimage_ui.models.download import DownloadError, download_model\n"
        "try:\n"
        "    download_model('ms')\n"
        "except DownloadError as e:\n"
        "    print('DownloadError:', e)\n"
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert time.monotonic() - t0 < 60
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("DownloadError:")]
    assert len(lines) == 1, out.stdout + out.stderr
    assert lines[0].startswith(f"DownloadError: ModelScope download of {TURBO_REPO} into {tmp_path / 'ms'} failed: ")
    assert "127.0.0.1" in lines[0]  # it went to the dead endpoint, nowhere else
