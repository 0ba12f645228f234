"""``zimage-ui download``: the one place that talks to a model hub.

Everything else in the product is offline; this fetches a snapshot into the same cache that
:func:`zimage_ui.models.sources.resolve_model` searches, so ``--model auto`` finds it afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

from zimage_ui.models.sources import (
    TURBO_REPO,
    ModelNotFoundError,
    check_model_folder,
    hf_cache_dir,
    is_repo_id,
    modelscope_cache_dir,
)

SOURCES = {"hf": "hf", "huggingface": "hf", "modelscope": "modelscope", "ms": "modelscope"}
_SOURCE_NAMES = {"hf": "Hugging Face", "modelscope": "ModelScope"}


class DownloadError(Exception):
    """A download that could not start or did not finish; the message is one line naming the source and reason."""


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " ".join(lines)
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _hf_download(repo_id: str, cache_dir: Path, progress: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    # huggingface_hub reads HF_ENDPOINT and HF_HUB_ETAG_TIMEOUT once, at its import (often before ours, through
    # diffusers); read them now so the environment at call time is what counts.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        etag_timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
    except ValueError:
        etag_timeout = 10.0
    silence = not progress and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        return snapshot_download(repo_id, cache_dir=str(cache_dir), endpoint=endpoint, etag_timeout=etag_timeout)
    finally:
        if silence:
            enable_progress_bars()


def _modelscope_download(repo_id: str, cache_dir: Path) -> str:
    # Imported here: modelscope takes ~2 s to import. It reads MODELSCOPE_ENDPOINT when the call builds its client,
    # and shows its own tqdm bars (it has no switch to hide them).
    from modelscope import snapshot_download

    return snapshot_download(repo_id, cache_dir=str(cache_dir))


def download_model(source: str = "hf", repo_id: str = TURBO_REPO, *, cache_dir: Path | None = None,
                   progress: bool = True) -> Path:
    """Download ``repo_id`` from ``source`` ("hf" or "modelscope") into its cache and return the snapshot folder.

    ``cache_dir`` defaults to the cache that ``--model auto`` searches (``HF_HUB_CACHE`` … / ``MODELSCOPE_CACHE``).
    A Hugging Face snapshot already complete in the cache is returned without network if the hub is unreachable.
    ``progress=False`` hides Hugging Face's bars (ModelScope always shows its own). Raises :class:`DownloadError`.
    """
    kind = SOURCES.get(str(source).strip().lower())
    if kind is None:
        raise DownloadError(f"unknown download source {source!r}; use hf or modelscope")
    if not is_repo_id(repo_id):
        raise DownloadError(f"{repo_id!r} is not a repo id of the form Org/Name")
    where = _SOURCE_NAMES[kind]
    if cache_dir is None:
        cache_dir = hf_cache_dir() if kind == "hf" else modelscope_cache_dir()
    cache_dir = Path(cache_dir).expanduser()
    try:
        if kind == "hf":
            folder = _hf_download(repo_id, cache_dir, progress)
        else:
            folder = _modelscope_download(repo_id, cache_dir)
    except Exception as exc:
        raise DownloadError(f"{where} download of {repo_id} into {cache_dir} failed: {_one_line(exc)}") from exc
    path = Path(folder)
    try:
        check_model_folder(path)
    except ModelNotFoundError as exc:
        raise DownloadError(f"{where} download of {repo_id} left an incomplete folder: {exc}") from exc
    return path
