"""What ``--model SPEC`` means: find a Z-Image folder on disk, never touching the network.

Spec grammar (see :func:`resolve_model`):

* ``demo`` — the tiny in-memory demo model;
* ``auto`` — ``ZIMAGE_UI_MODEL_DIR``, then the Hugging Face cache, then the ModelScope cache, else demo + banner;
* a filesystem path — a local diffusers-layout folder;
* ``hf:Org/Name`` or a bare ``Org/Name`` — a snapshot in the Hugging Face cache;
* ``modelscope:Org/Name`` or ``ms:Org/Name`` — a snapshot in the ModelScope cache.

Every failure is a one-line :class:`ModelNotFoundError` that names where we looked and what to do.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from zimage_ui.models.demo import DEMO_MODEL_ID, demo_description, demo_label

log = logging.getLogger(__name__)

TURBO_REPO = "Tongyi-MAI/Z-Image-Turbo"
BASE_REPO = "Tongyi-MAI/Z-Image"
KNOWN_REPOS = (TURBO_REPO, BASE_REPO)  # Turbo first; base Z-Image has the same architecture
REQUIRED_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae")
PIPELINE_CLASS = "ZImagePipeline"

# Parts holding weights need a config and at least one weight file; the others only a config.
_WEIGHT_PARTS = ("text_encoder", "transformer", "vae")
_CONFIG_FILES = {
    "scheduler": ("scheduler_config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json"),
    "text_encoder": ("config.json",),
    "transformer": ("config.json",),
    "vae": ("config.json",),
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_REPO_DIR_RE = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")


class ModelNotFoundError(Exception):
    """A model spec that names nothing loadable; the message is one line naming the place and the fix."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from. ``path`` is a diffusers-layout folder (None for the demo model)."""

    kind: str  # "demo" | "folder" | "hf" | "modelscope"
    spec: str  # what the user wrote
    path: Path | None
    repo_id: str | None

    @property
    def is_demo(self) -> bool:
        """True for the built-in tiny demo model."""
        return self.kind == "demo"

    @property
    def is_base(self) -> bool:
        """True for the base ``Tongyi-MAI/Z-Image`` (28–50 steps, CFG), False for Turbo, demo and unknown models."""
        if self.is_demo:
            return False
        if self.repo_id is not None:
            return self.repo_id.lower() == BASE_REPO.lower()
        return self.path is not None and _looks_like_base_name(self.path.name)

    @property
    def model_id(self) -> str:
        """``demo``, the repo id, or the folder name."""
        if self.is_demo:
            return DEMO_MODEL_ID
        if self.repo_id is not None:
            return self.repo_id
        assert self.path is not None
        return self.path.name

    @property
    def label(self) -> str:
        """Human text for the UI and logs."""
        if self.is_demo:
            return demo_label()
        if self.kind == "hf":
            return f"{self.repo_id} (Hugging Face cache)"
        if self.kind == "modelscope":
            return f"{self.repo_id} (ModelScope cache)"
        return str(self.path)


@dataclass(frozen=True)
class Resolution:
    """The outcome of :func:`resolve_model`; ``banner`` is set only when ``auto`` fell back to the demo model."""

    source: ModelSource
    banner: str | None = None


DEMO_SOURCE = ModelSource(kind="demo", spec="demo", path=None, repo_id=None)


# ---------------------------------------------------------------------------------------------------------------
# Folder checks
# ---------------------------------------------------------------------------------------------------------------


def is_repo_id(text: str) -> bool:
    """True for text of the form ``Org/Name`` (one slash, hub-safe characters)."""
    return _REPO_ID_RE.match(text or "") is not None


def _looks_like_base_name(name: str) -> bool:
    # "Z-Image", "z_image", "ZImage", optionally "-base": base. Anything with "turbo" is not.
    n = name.lower().replace("_", "-")
    return "turbo" not in n and re.fullmatch(r"z-?image(-base)?", n) is not None


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in _WEIGHT_SUFFIXES and p.is_file() for p in folder.iterdir())


def _missing_shards(folder: Path) -> list[str]:
    """Shards named by ``*.index.json`` files that are not on disk (a download that stopped half way)."""
    missing: list[str] = []
    for index in folder.glob("*.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            missing.append(f"{index.name} (not valid JSON)")
            continue
        missing += sorted({s for s in weight_map.values() if not (folder / s).is_file()})
    return missing


def _problems(path: Path, parts: Iterable[str]) -> list[str]:
    """What is missing or broken in ``path``, as short phrases; empty when the folder looks loadable."""
    if not path.exists():
        return ["folder does not exist"]
    if not path.is_dir():
        return ["not a folder"]
    problems: list[str] = []
    for part in parts:
        target = path / part
        if part == "model_index.json":
            if not target.is_file():
                problems.append("model_index.json")
                continue
            try:
                index = json.loads(target.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                problems.append("model_index.json (not valid JSON)")
                continue
            cls = index.get("_class_name") if isinstance(index, dict) else None
            if not isinstance(index, dict):
                problems.append("model_index.json (not a JSON object)")
            elif cls is not None and cls != PIPELINE_CLASS:
                problems.append(f"model_index.json (names {cls}, not {PIPELINE_CLASS})")
            continue
        if not target.is_dir():
            problems.append(f"{part}/")
            continue
        configs = _CONFIG_FILES.get(part, ())
        if configs and not any((target / c).is_file() for c in configs):
            problems.append(f"{part}/{configs[0]}")
        if part in _WEIGHT_PARTS:
            if not _has_weights(target):
                problems.append(f"{part}/ (no *.safetensors or *.bin weight file)")
            else:
                problems += [f"{part}/{shard}" for shard in _missing_shards(target)]
    return problems


def check_model_folder(path: Path, parts: Iterable[str] = REQUIRED_PARTS) -> None:
    """Raise :class:`ModelNotFoundError` (one line: the folder, what is missing, the fix) unless ``path`` is complete.

    ``parts`` narrows the check, e.g. to ``("scheduler", "transformer")`` when the other parts come from a model
    that is already loaded.
    """
    problems = _problems(Path(path), parts)
    if problems:
        raise ModelNotFoundError(
            f"{path}: missing or broken: {', '.join(problems)}; "
            "re-run `zimage-ui download` or point --model at a complete Z-Image diffusers folder"
        )


# ---------------------------------------------------------------------------------------------------------------
# Cache locations
# ---------------------------------------------------------------------------------------------------------------


def _expand(value: str, env: Mapping[str, str]) -> Path:
    # Expand "~" with the given env's HOME so an injected env is honoured end to end.
    if value.startswith("~"):
        home = env.get("HOME") or str(Path.home())
        value = home + value[1:]
    return Path(value)


def hf_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``.

    huggingface_hub computes the same in ``huggingface_hub.constants`` but only once, at its import, from
    ``os.environ``; we repeat its precedence (including the legacy ``HUGGINGFACE_HUB_CACHE`` and ``XDG_CACHE_HOME``)
    at call time so callers and tests can pass their own ``env``.
    """
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return _expand(env["HF_HUB_CACHE"], env)
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return _expand(env["HUGGINGFACE_HUB_CACHE"], env)
    if env.get("HF_HOME"):
        return _expand(env["HF_HOME"], env) / "hub"
    if env.get("XDG_CACHE_HOME"):
        return _expand(env["XDG_CACHE_HOME"], env) / "huggingface" / "hub"
    return _expand("~", env) / ".cache" / "huggingface" / "hub"


def modelscope_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The ModelScope cache root: ``MODELSCOPE_CACHE``, else ``~/.cache/modelscope``.

    modelscope 1.40 (through modelscope_hub 0.5) uses this root for new downloads; the ``hub/`` sub-folder that
    older SDKs used by default is probed by :func:`find_in_modelscope_cache`.
    """
    env = os.environ if env is None else env
    if env.get("MODELSCOPE_CACHE"):
        return _expand(env["MODELSCOPE_CACHE"], env)
    return _expand("~", env) / ".cache" / "modelscope"


def _first_complete(candidates: Iterable[Path]) -> tuple[Path | None, str]:
    """The first candidate folder that passes the check, else None and why the last existing one failed."""
    reason = "not downloaded"
    seen: set[Path] = set()
    for cand in candidates:
        if not cand.is_dir() or cand.resolve() in seen:
            continue
        seen.add(cand.resolve())
        problems = _problems(cand, REQUIRED_PARTS)
        if not problems:
            return cand, ""
        reason = f"{cand} is incomplete: missing {', '.join(problems[:3])}" + (", …" if len(problems) > 3 else "")
    return None, reason


def _newest_first(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    dirs = [p for p in folder.iterdir() if p.is_dir()]
    return sorted(dirs, key=lambda p: p.stat().st_mtime, reverse=True)


def _probe_hf_cache(repo_id: str, cache_dir: Path) -> tuple[Path | None, str]:
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        return None, "not downloaded"
    candidates: list[Path] = []
    try:
        from huggingface_hub import snapshot_download

        # local_files_only: never the network. It follows refs/main, and with huggingface_hub >= 2 it also checks
        # the snapshot against the cached file listing (trees/<commit>.json), catching interrupted downloads.
        candidates.append(Path(snapshot_download(repo_id, cache_dir=str(cache_dir), local_files_only=True)))
    except Exception as exc:  # LocalEntryNotFoundError, IncompleteSnapshotError, validation errors
        log.debug("huggingface_hub found no complete snapshot of %s in %s: %s", repo_id, cache_dir, exc)
    # Fall back to any complete snapshot, newest first (refs/main missing, or pointing at a partial download).
    candidates += _newest_first(repo_dir / "snapshots")
    return _first_complete(candidates)


def find_in_hf_cache(repo_id: str, cache_dir: Path) -> Path | None:
    """The complete snapshot folder of ``repo_id`` in the HF cache at ``cache_dir`` (refs/main first), or None."""
    return _probe_hf_cache(repo_id, cache_dir)[0]


def _modelscope_candidates(repo_id: str, cache_dir: Path) -> list[Path]:
    org, name = repo_id.split("/", 1)
    safe = name.replace(".", "___")  # older SDKs wrote dots in names as "___"
    base = Path(cache_dir)
    new_snapshots = base / "models" / f"{org}--{name}" / "snapshots"
    return [
        # modelscope <= 1.37 with MODELSCOPE_CACHE set: <cache>/models/<org>/<name>/ (1.40 reuses it if present).
        base / "models" / org / safe,
        base / "models" / org / name,
        # modelscope <= 1.37 default: ~/.cache/modelscope/hub/models/<org>/<name>/.
        base / "hub" / "models" / org / safe,
        base / "hub" / "models" / org / name,
        # modelscope 1.38+ (1.40 writes this; via modelscope_hub): <cache>/models/<org>--<name>/snapshots/<rev>/,
        # rev is "master" by default.
        new_snapshots / "master",
        new_snapshots / "main",
        *_newest_first(new_snapshots),
        # Oldest SDKs (before the models/ folder): <cache>/<org>/<name>/ and <cache>/hub/<org>/<name>/.
        base / org / name,
        base / org / safe,
        base / "hub" / org / name,
        base / "hub" / org / safe,
    ]


def _probe_modelscope_cache(repo_id: str, cache_dir: Path) -> tuple[Path | None, str]:
    # Probed by hand rather than with modelscope's own offline lookup: importing modelscope takes ~2 s and it only
    # checks that a folder is non-empty; the layouts below are the ones modelscope 1.40.2 itself probes.
    return _first_complete(_modelscope_candidates(repo_id, cache_dir))


def find_in_modelscope_cache(repo_id: str, cache_dir: Path) -> Path | None:
    """The complete folder of ``repo_id`` in the ModelScope cache at ``cache_dir`` (any SDK layout), or None."""
    return _probe_modelscope_cache(repo_id, cache_dir)[0]


# ---------------------------------------------------------------------------------------------------------------
# Spec resolution
# ---------------------------------------------------------------------------------------------------------------


def download_hint(source: str, repo_id: str = TURBO_REPO) -> str:
    """The command that fetches ``repo_id`` from ``source`` ("hf" or "modelscope")."""
    cmd = f"zimage-ui download --source {source}"
    return cmd if repo_id == TURBO_REPO else f"{cmd} --repo {repo_id}"


def _repo_from_path(path: Path) -> str | None:
    """The repo id a folder belongs to, when its path says so (HF/ModelScope cache layouts, known repo names)."""
    for part in reversed(path.parts):
        m = _HF_REPO_DIR_RE.match(part)
        if m:
            return f"{m['org']}/{m['name']}"
    parts = path.parts
    for i in range(len(parts) - 2, 0, -1):
        # ModelScope 1.38+: .../models/<org>--<name>/snapshots/<rev>
        if parts[i - 1] == "models" and parts[i + 1] == "snapshots" and "--" in parts[i]:
            org, name = parts[i].split("--", 1)
            return f"{org}/{name}"
    name = path.name.replace("___", ".").lower()
    for repo in KNOWN_REPOS:
        if repo.split("/")[1].lower() == name:
            return repo
    return None


def _looks_like_path(spec: str) -> bool:
    if spec.startswith(("/", "~", ".")) or (len(spec) > 2 and spec[1] == ":" and spec[2] in "\\/"):
        return True
    if _REPO_ID_RE.match(spec):
        return False  # "Org/Name" is a repo id unless it exists as a directory (checked before this)
    return os.sep in spec or "/" in spec or "\\" in spec


def _absolute(path: Path) -> Path:
    # abspath, not resolve(): a symlinked folder keeps its own name, which tells Turbo from base.
    return Path(os.path.abspath(path.expanduser()))


def _folder_source(spec: str, path: Path) -> ModelSource:
    path = _absolute(path)
    check_model_folder(path)
    return ModelSource(kind="folder", spec=spec, path=path, repo_id=_repo_from_path(path))


def _cache_source(spec: str, kind: str, repo_id: str, env: Mapping[str, str]) -> ModelSource:
    if not _REPO_ID_RE.match(repo_id):
        raise ModelNotFoundError(f"--model {spec!r}: {repo_id!r} is not a repo id of the form Org/Name")
    if kind == "hf":
        cache, where = hf_cache_dir(env), "Hugging Face"
        found, reason = _probe_hf_cache(repo_id, cache)
    else:
        cache, where = modelscope_cache_dir(env), "ModelScope"
        found, reason = _probe_modelscope_cache(repo_id, cache)
    if found is None:
        raise ModelNotFoundError(
            f"{repo_id} is not in the {where} cache {cache} ({reason}); run `{download_hint(kind, repo_id)}`"
        )
    return ModelSource(kind=kind, spec=spec, path=found, repo_id=repo_id)


def resolve_model(spec: str = "auto", *, model_dir: Path | None = None,
                  env: Mapping[str, str] | None = None) -> Resolution:
    """Turn a ``--model`` spec into a :class:`ModelSource` without loading anything or touching the network.

    ``model_dir`` is the ``ZIMAGE_UI_MODEL_DIR`` setting (tried first by ``auto``); ``env`` defaults to
    ``os.environ`` as it is now. Raises :class:`ModelNotFoundError` for a spec that names nothing complete.
    """
    env = os.environ if env is None else env
    spec = (spec or "auto").strip()
    low = spec.lower()
    if low == "demo":
        return Resolution(DEMO_SOURCE)
    if low == "auto":
        return _resolve_auto(model_dir, env)
    for prefix, kind in (("hf:", "hf"), ("huggingface:", "hf"), ("modelscope:", "modelscope"), ("ms:", "modelscope")):
        if low.startswith(prefix):
            return Resolution(_cache_source(spec, kind, spec[len(prefix):].strip(), env))
    # An existing directory always wins, so a relative "Org/Name" folder in the working directory is a folder.
    path = _expand(spec, env)
    if path.is_dir() or _looks_like_path(spec):
        return Resolution(_folder_source(spec, path))
    if _REPO_ID_RE.match(spec):
        return Resolution(_cache_source(spec, "hf", spec, env))
    raise ModelNotFoundError(
        f"--model {spec!r} is neither demo, auto, an existing folder, hf:Org/Name nor modelscope:Org/Name"
    )


def _resolve_auto(model_dir: Path | None, env: Mapping[str, str]) -> Resolution:
    looked: list[str] = []
    if model_dir is not None:
        path = _absolute(_expand(str(model_dir), env))
        problems = _problems(path, REQUIRED_PARTS)
        if not problems:
            return Resolution(ModelSource("folder", "auto", path, _repo_from_path(path)))
        # The user set this explicitly: say loudly why it was skipped instead of silently using a cache.
        log.warning("ZIMAGE_UI_MODEL_DIR=%s skipped: %s", path, ", ".join(problems))
        looked.append(f"ZIMAGE_UI_MODEL_DIR={path} ({problems[0]})")
    hf = hf_cache_dir(env)
    for repo in KNOWN_REPOS:
        found, _ = _probe_hf_cache(repo, hf)
        if found is not None:
            return Resolution(ModelSource("hf", "auto", found, repo))
    looked.append(f"Hugging Face cache {hf}")
    ms = modelscope_cache_dir(env)
    for repo in KNOWN_REPOS:
        found, _ = _probe_modelscope_cache(repo, ms)
        if found is not None:
            return Resolution(ModelSource("modelscope", "auto", found, repo))
    looked.append(f"ModelScope cache {ms}")
    banner = (
        f"No Z-Image weights found ({' or '.join(KNOWN_REPOS)}; looked in: {'; '.join(looked)}), "
        f"so this is the {demo_label()}: {demo_description()}. "
        "Get the real model with `zimage-ui download` (or `zimage-ui download --source modelscope`), "
        "or set ZIMAGE_UI_MODEL_DIR / --model PATH to a Z-Image folder."
    )
    return Resolution(DEMO_SOURCE, banner=banner)
