"""Model-spec resolution against real folders and real cache layouts written to tmp_path (no network, no mocks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zimage_ui.models.demo import build_demo_pipeline, demo_label
from zimage_ui.models.sources import (
    BASE_REPO,
    KNOWN_REPOS,
    TURBO_REPO,
    ModelNotFoundError,
    ModelSource,
    check_model_folder,
    find_in_hf_cache,
    find_in_modelscope_cache,
    hf_cache_dir,
    modelscope_cache_dir,
    resolve_model,
)

from ..support import REV_A, make_hf_snapshot

REV_B = "b" * 40


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo pipeline saved in diffusers layout, once per module."""
    folder = tmp_path_factory.mktemp("demo") / "saved"
    build_demo_pipeline().save_pretrained(folder)
    return folder


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """An env whose HOME and both caches live under tmp_path, so the real ~/.cache is never consulted."""
    return {
        "HOME": str(tmp_path / "home"),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "MODELSCOPE_CACHE": str(tmp_path / "ms"),
    }


# --- check_model_folder ----------------------------------------------------------------------------------------


def test_saved_demo_folder_is_complete(demo_dir: Path) -> None:
    check_model_folder(demo_dir)  # does not raise


def _break_missing_transformer(d: Path) -> str:
    shutil.rmtree(d / "transformer")
    return "transformer/"


def _break_vae_weights(d: Path) -> str:
    for f in (d / "vae").glob("*.safetensors"):
        f.unlink()
    return "vae/ (no *.safetensors or *.bin weight file)"


def _break_model_index(d: Path) -> str:
    (d / "model_index.json").write_text('{"_class_name": "ZImagePipeline",')
    return "model_index.json (not valid JSON)"


def _break_no_model_index(d: Path) -> str:
    (d / "model_index.json").unlink()
    return "model_index.json"


def _break_scheduler_config(d: Path) -> str:
    (d / "scheduler" / "scheduler_config.json").unlink()
    return "scheduler/scheduler_config.json"


def _break_missing_shard(d: Path) -> str:
    # A sharded checkpoint whose download stopped after the index and the first shard.
    index = {"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (d / "transformer" / "diffusion_pytorch_model.safetensors").rename(
        d / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    (d / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"


def _break_other_pipeline(d: Path) -> str:
    index = json.loads((d / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (d / "model_index.json").write_text(json.dumps(index))
    return "names FluxPipeline, not ZImagePipeline"


@pytest.mark.parametrize("breaker", [
    _break_missing_transformer, _break_vae_weights, _break_model_index, _break_no_model_index,
    _break_scheduler_config, _break_missing_shard, _break_other_pipeline,
])
def test_broken_folder_names_path_and_part(demo_dir: Path, tmp_path: Path, breaker) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(demo_dir, broken)
    part = breaker(broken)
    with pytest.raises(ModelNotFoundError) as exc:
        check_model_folder(broken)
    msg = one_line(exc)
    assert str(broken) in msg
    assert part in msg
    assert "zimage-ui download" in msg
    # The same folder as --model gives the same one-line error.
    with pytest.raises(ModelNotFoundError) as exc2:
        resolve_model(str(broken), env=isolated_env(tmp_path))
    assert part in one_line(exc2)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_model(str(tmp_path / "nope"), env=isolated_env(tmp_path))
    msg = one_line(exc)
    assert str(tmp_path / "nope") in msg and "does not exist" in msg


def test_check_model_folder_parts_subset(demo_dir: Path, tmp_path: Path) -> None:
    only = tmp_path / "transformer-only"
    for part in ("transformer", "scheduler"):
        shutil.copytree(demo_dir / part, only / part)
    check_model_folder(only, parts=("scheduler", "transformer"))
    with pytest.raises(ModelNotFoundError, match="text_encoder/"):
        check_model_folder(only)


# --- cache directories -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, expected", [
    ({"HF_HUB_CACHE": "/c/hub", "HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}, "/c/hub"),
    ({"HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HOME": "/h"}, "/legacy"),
    ({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}, "/h/hub"),
    ({"XDG_CACHE_HOME": "/x"}, "/x/huggingface/hub"),
    ({"HOME": "/home/u"}, "/home/u/.cache/huggingface/hub"),
    ({"HOME": "/home/u", "HF_HOME": "~/hfhome"}, "/home/u/hfhome/hub"),
])
def test_hf_cache_dir_precedence(env: dict[str, str], expected: str) -> None:
    assert hf_cache_dir(env) == Path(expected)


def test_hf_cache_dir_agrees_with_huggingface_hub(tmp_path: Path) -> None:
    # huggingface_hub computes its cache at import time from os.environ: ask a fresh interpreter.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hfh")}
    out = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    assert Path(out) == hf_cache_dir(env)


def test_modelscope_cache_dir() -> None:
    assert modelscope_cache_dir({"MODELSCOPE_CACHE": "/m", "HOME": "/home/u"}) == Path("/m")
    assert modelscope_cache_dir({"HOME": "/home/u"}) == Path("/home/u/.cache/modelscope")


def test_env_is_read_at_call_time(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = make_hf_snapshot(tmp_path / "hf", TURBO_REPO, demo_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert hf_cache_dir() == tmp_path / "hf"
    assert resolve_model("hf:" + TURBO_REPO).source.path == snap


# --- Hugging Face cache ------------------------------------------------------------------------------------------


def test_find_in_hf_cache_follows_refs_main(demo_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    assert find_in_hf_cache(TURBO_REPO, cache) is None
    make_hf_snapshot(cache, TURBO_REPO, demo_dir, rev=REV_B, ref=False)  # newer-looking but not what main says
    snap_a = make_hf_snapshot(cache, TURBO_REPO, demo_dir, rev=REV_A)
    os.utime(snap_a, (1, 1))  # older mtime: refs/main must still win
    assert find_in_hf_cache(TURBO_REPO, cache) == snap_a
    assert find_in_hf_cache(BASE_REPO, cache) is None


def test_find_in_hf_cache_without_refs_takes_newest_complete(demo_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    old = make_hf_snapshot(cache, TURBO_REPO, demo_dir, rev=REV_A, ref=False)
    new = make_hf_snapshot(cache, TURBO_REPO, demo_dir, rev=REV_B, ref=False)
    os.utime(old, (1, 1))
    assert find_in_hf_cache(TURBO_REPO, cache) == new


def test_find_in_hf_cache_skips_partial_main(demo_dir: Path, tmp_path: Path) -> None:
    # refs/main points at an interrupted download (HF links a file into the snapshot only once its blob is complete,
    # so the transformer weights are simply absent): fall back to the older complete snapshot instead of failing
    # later inside from_pretrained.
    cache = tmp_path / "hf"
    good = make_hf_snapshot(cache, TURBO_REPO, demo_dir, rev=REV_A, ref=False)
    partial = make_hf_snapshot(cache, TURBO_REPO, demo_dir, rev=REV_B)
    link = partial / "transformer" / "diffusion_pytorch_model.safetensors"
    link.unlink()
    assert find_in_hf_cache(TURBO_REPO, cache) == good
    shutil.rmtree(good)
    assert find_in_hf_cache(TURBO_REPO, cache) is None
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_model("hf:" + TURBO_REPO, env=isolated_env(tmp_path))
    msg = one_line(exc)
    assert "incomplete" in msg and "transformer/" in msg


# --- ModelScope cache --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [
    "models/Tongyi-MAI--Z-Image-Turbo/snapshots/master",  # modelscope >= 1.38 (1.40 writes this)
    "models/Tongyi-MAI/Z-Image-Turbo",  # <= 1.37 with MODELSCOPE_CACHE set
    "hub/models/Tongyi-MAI/Z-Image-Turbo",  # <= 1.37 default root ~/.cache/modelscope/hub
    "Tongyi-MAI/Z-Image-Turbo",  # oldest flat layout
])
def test_find_in_modelscope_cache_layouts(demo_dir: Path, tmp_path: Path, layout: str) -> None:
    cache = tmp_path / "ms"
    assert find_in_modelscope_cache(TURBO_REPO, cache) is None
    shutil.copytree(demo_dir, cache / layout)
    assert find_in_modelscope_cache(TURBO_REPO, cache) == cache / layout
    assert find_in_modelscope_cache(BASE_REPO, cache) is None


@pytest.mark.parametrize("layout", [
    "models/Tongyi-MAI--Z-Image-Turbo/snapshots/master",
    "models/Tongyi-MAI/Z-Image-Turbo",
])
def test_modelscope_itself_finds_the_same_folder(demo_dir: Path, tmp_path: Path, layout: str) -> None:
    # Cross-check our layout knowledge with the installed modelscope's own offline lookup (no network:
    # local_files_only).
    from modelscope import snapshot_download

    cache = tmp_path / "ms"
    shutil.copytree(demo_dir, cache / layout)
    theirs = Path(snapshot_download(TURBO_REPO, cache_dir=str(cache), local_files_only=True))
    assert theirs == find_in_modelscope_cache(TURBO_REPO, cache)


def test_modelscope_empty_snapshot_left_by_failed_download_is_skipped(demo_dir: Path, tmp_path: Path) -> None:
    # A failed modelscope download leaves models/<org>--<name>/snapshots/master/ empty.
    cache = tmp_path / "ms"
    (cache / "models/Tongyi-MAI--Z-Image-Turbo/snapshots/master").mkdir(parents=True)
    assert find_in_modelscope_cache(TURBO_REPO, cache) is None
    shutil.copytree(demo_dir, cache / "hub/models/Tongyi-MAI/Z-Image-Turbo")
    assert find_in_modelscope_cache(TURBO_REPO, cache) == cache / "hub/models/Tongyi-MAI/Z-Image-Turbo"


# --- resolve_model: explicit specs -------------------------------------------------------------------------------


def test_demo_spec(tmp_path: Path) -> None:
    res = resolve_model("demo", env=isolated_env(tmp_path))
    src = res.source
    assert res.banner is None
    assert (src.kind, src.path, src.repo_id, src.is_demo, src.is_base) == ("demo", None, None, True, False)
    assert src.model_id == "demo" and src.label == demo_label()  # "trained on simple shapes" when shipped


def test_folder_specs(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = isolated_env(tmp_path)
    res = resolve_model(str(demo_dir), env=env)
    assert res.banner is None
    src = res.source
    assert (src.kind, src.path, src.repo_id) == ("folder", demo_dir, None)
    assert src.model_id == "saved" and src.label == str(demo_dir) and not src.is_base and not src.is_demo
    # relative, "./", and "~" (expanded with the env's HOME)
    monkeypatch.chdir(demo_dir.parent)
    assert resolve_model("saved", env=env).source.path == demo_dir
    assert resolve_model("./saved", env=env).source.path == demo_dir
    home = Path(env["HOME"])
    shutil.copytree(demo_dir, home / "models" / "mine")
    assert resolve_model("~/models/mine", env=env).source.path == home / "models" / "mine"


def test_relative_org_name_folder_wins_over_repo_id(demo_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(demo_dir, tmp_path / "Tongyi-MAI" / "Z-Image")
    monkeypatch.chdir(tmp_path)
    src = resolve_model("Tongyi-MAI/Z-Image", env=isolated_env(tmp_path)).source
    assert src.kind == "folder" and src.path == tmp_path / "Tongyi-MAI" / "Z-Image"
    assert src.repo_id == BASE_REPO and src.is_base


@pytest.mark.parametrize("name, repo, base", [
    ("Z-Image-Turbo", TURBO_REPO, False),
    ("Z-Image", BASE_REPO, True),
    ("z_image", None, True),
    ("my-zimage-turbo-finetune", None, False),
    ("sdxl-something", None, False),
])
def test_folder_base_detection(demo_dir: Path, tmp_path: Path, name: str, repo: str | None, base: bool) -> None:
    shutil.copytree(demo_dir, tmp_path / name)
    src = resolve_model(str(tmp_path / name), env=isolated_env(tmp_path)).source
    assert src.repo_id == repo
    assert src.is_base is base
    assert src.model_id == (repo or name)


def test_folder_inside_hf_cache_knows_its_repo(demo_dir: Path, tmp_path: Path) -> None:
    snap = make_hf_snapshot(tmp_path / "elsewhere", BASE_REPO, demo_dir)
    src = resolve_model(str(snap), env=isolated_env(tmp_path)).source
    assert src.kind == "folder" and src.repo_id == BASE_REPO and src.is_base and src.model_id == BASE_REPO


@pytest.mark.parametrize("spec", ["hf:" + TURBO_REPO, TURBO_REPO, "huggingface:" + TURBO_REPO])
def test_hf_specs(demo_dir: Path, tmp_path: Path, spec: str) -> None:
    env = isolated_env(tmp_path)
    snap = make_hf_snapshot(Path(env["HF_HUB_CACHE"]), TURBO_REPO, demo_dir)
    res = resolve_model(spec, env=env)
    src = res.source
    assert res.banner is None
    assert (src.kind, src.path, src.repo_id, src.spec) == ("hf", snap, TURBO_REPO, spec)
    assert src.label == "Tongyi-MAI/Z-Image-Turbo (Hugging Face cache)"
    assert src.model_id == TURBO_REPO and not src.is_base


@pytest.mark.parametrize("spec", ["modelscope:" + BASE_REPO, "ms:" + BASE_REPO])
def test_modelscope_specs(demo_dir: Path, tmp_path: Path, spec: str) -> None:
    env = isolated_env(tmp_path)
    folder = Path(env["MODELSCOPE_CACHE"]) / "models" / "Tongyi-MAI--Z-Image" / "snapshots" / "master"
    shutil.copytree(demo_dir, folder)
    src = resolve_model(spec, env=env).source
    assert (src.kind, src.path, src.repo_id) == ("modelscope", folder, BASE_REPO)
    assert src.label == "Tongyi-MAI/Z-Image (ModelScope cache)"
    assert src.is_base


def test_unknown_repo_allowed_when_cached(demo_dir: Path, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    make_hf_snapshot(Path(env["HF_HUB_CACHE"]), "someone/z-image-turbo-anime", demo_dir)
    src = resolve_model("someone/z-image-turbo-anime", env=env).source
    assert src.repo_id == "someone/z-image-turbo-anime" and src.kind == "hf" and not src.is_base


@pytest.mark.parametrize("spec, where, command", [
    ("hf:" + TURBO_REPO, "Hugging Face cache", "zimage-ui download --source hf"),
    (BASE_REPO, "Hugging Face cache", "zimage-ui download --source hf --repo Tongyi-MAI/Z-Image"),
    ("ms:" + TURBO_REPO, "ModelScope cache", "zimage-ui download --source modelscope"),
])
def test_repo_not_in_cache(tmp_path: Path, spec: str, where: str, command: str) -> None:
    env = isolated_env(tmp_path)
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_model(spec, env=env)
    msg = one_line(exc)
    repo = spec.split(":")[-1]
    cache = env["HF_HUB_CACHE"] if "Hugging" in where else env["MODELSCOPE_CACHE"]
    assert repo in msg and where in msg and cache in msg and command in msg


@pytest.mark.parametrize("spec", ["hf:nothing", "ms:a/b/c", "justaword"])
def test_malformed_specs(tmp_path: Path, spec: str) -> None:
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_model(spec, env=isolated_env(tmp_path))
    assert one_line(exc)


# --- resolve_model: auto -----------------------------------------------------------------------------------------


def test_auto_order(demo_dir: Path, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    hf, ms = Path(env["HF_HUB_CACHE"]), Path(env["MODELSCOPE_CACHE"])

    # Nothing anywhere → demo, with a banner listing where we looked and how to get weights.
    res = resolve_model("auto", env=env)
    assert res.source.is_demo
    assert res.banner is not None and "\n" not in res.banner
    for text in (str(hf), str(ms), "zimage-ui download", "ZIMAGE_UI_MODEL_DIR", "--model", *KNOWN_REPOS):
        assert text in res.banner

    # ModelScope (base only) → found.
    shutil.copytree(demo_dir, ms / "models" / "Tongyi-MAI" / "Z-Image")
    src = resolve_model("auto", env=env).source
    assert (src.kind, src.repo_id, src.is_base) == ("modelscope", BASE_REPO, True)

    # HF base beats ModelScope; HF Turbo beats HF base.
    make_hf_snapshot(hf, BASE_REPO, demo_dir)
    src = resolve_model("auto", env=env).source
    assert (src.kind, src.repo_id) == ("hf", BASE_REPO)
    make_hf_snapshot(hf, TURBO_REPO, demo_dir)
    res = resolve_model("auto", env=env)
    assert (res.source.kind, res.source.repo_id, res.source.spec, res.banner) == ("hf", TURBO_REPO, "auto", None)

    # model_dir beats everything.
    src = resolve_model("auto", model_dir=demo_dir, env=env).source
    assert (src.kind, src.path) == ("folder", demo_dir)
    assert resolve_model("", model_dir=demo_dir, env=env).source.path == demo_dir


def test_auto_with_broken_model_dir_says_so(demo_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = isolated_env(tmp_path)
    res = resolve_model("auto", model_dir=tmp_path / "missing", env=env)
    assert res.source.is_demo
    assert f"ZIMAGE_UI_MODEL_DIR={tmp_path / 'missing'}" in res.banner
    assert "ZIMAGE_UI_MODEL_DIR" in caplog.text
    make_hf_snapshot(Path(env["HF_HUB_CACHE"]), TURBO_REPO, demo_dir)
    assert resolve_model("auto", model_dir=tmp_path / "missing", env=env).source.repo_id == TURBO_REPO


def test_model_source_is_frozen() -> None:
    src = ModelSource("demo", "demo", None, None)
    with pytest.raises(AttributeError):
        src.kind = "folder"  # type: ignore[misc]


def test_symlinked_folder_keeps_its_name(demo_dir: Path, tmp_path: Path) -> None:
    # ~/models/Z-Image -> /big/disk/anything: the link's name says "base", so the path must not be resolved away.
    (tmp_path / "Z-Image").symlink_to(demo_dir, target_is_directory=True)
    src = resolve_model(str(tmp_path / "Z-Image"), env=isolated_env(tmp_path)).source
    assert src.path == tmp_path / "Z-Image" and src.repo_id == BASE_REPO and src.is_base
