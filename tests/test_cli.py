"""The zimage-ui command as a user runs it: a real subprocess, the demo model, real PNG files."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_ui.metadata import read_metadata


def zimage(*args, cwd=None, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "zimage_ui.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=240)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    common = ["generate", "--model", "demo", "--prompt", "a red circle", "--width", "256", "--height", "256",
              "--seed", "7"]
    runs = [zimage(*common, "--output", str(out / name)) for name in ("a.png", "b.png")]
    return out, runs


def test_generate_twice_gives_identical_pixels(two_runs):
    out, runs = two_runs
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[0].stdout.strip() == str((out / "a.png").resolve())
    a, b = (np.asarray(Image.open(out / n)) for n in ("a.png", "b.png"))
    assert a.shape == (256, 256, 3) and np.array_equal(a, b)


def test_parameters_chunk_carries_seed_and_size(two_runs):
    out, _ = two_runs
    meta = read_metadata(out / "a.png")
    assert "Seed: 7" in meta["parameters"] and "Size: 256x256" in meta["parameters"]
    assert "Model: demo" in meta["parameters"] and meta["zimage"]["request"]["seed"] == 7


def test_steps_999_is_clamped_and_reported(tmp_path):
    run = zimage("generate", "--model", "demo", "--prompt", "x", "--steps", "999", "--width", "256",
                 "--height", "256", "--seed", "1", "--output", str(tmp_path / "c.png"))
    assert run.returncode == 0, run.stderr
    assert "clamped: steps 999 → 16" in run.stderr
    assert "Steps: 16" in read_metadata(tmp_path / "c.png")["parameters"]


def test_batch_writes_one_file_per_seed(tmp_path):
    run = zimage("generate", "--model", "demo", "--prompt", "x", "--batch", "2", "--width", "256", "--height",
                 "256", "--seed", "5", "--output", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["zimage-5.png", "zimage-6.png"]


@pytest.mark.parametrize("args, word", [
    (["--width", "abc"], "width"),
    (["--steps", "nan"], "steps"),
    (["--prompt", ""], "prompt"),
    (["--preset", "ultra"], "preset"),
    (["--dtype", "float16"], "dtype"),
    (["--model", "/no/such/folder"], "/no/such/folder"),
])
def test_bad_input_is_one_line_naming_the_parameter(tmp_path, args, word):
    base = ["generate", "--model", "demo", "--prompt", "x", "--output", str(tmp_path / "x.png")]
    run = zimage(*base, *args)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in run.stderr
    assert not (tmp_path / "x.png").exists()


def test_version_and_help():
    assert zimage("--version").stdout.startswith("zimage-ui ")
    helptext = zimage("--help").stdout
    for command in ("serve", "generate", "doctor", "download"):
        assert command in helptext


def test_doctor_says_what_to_do_next():
    run = zimage("doctor", "--model", "auto", env_extra={"HF_HUB_CACHE": "/nonexistent",
                                                         "MODELSCOPE_CACHE": "/nonexistent"})
    assert run.returncode == 0, run.stderr
    assert "cuda" in run.stdout and "demo model" in run.stdout and "zimage-ui download" in run.stdout


def test_a_random_seed_is_not_reported_as_clamped(tmp_path):
    run = zimage("generate", "--model", "demo", "--prompt", "x", "--width", "256", "--height", "256",
                 "--steps", "1", "--output", str(tmp_path / "r.png"))
    assert run.returncode == 0, run.stderr
    assert "clamped" not in run.stderr
    seed = read_metadata(tmp_path / "r.png")["zimage"]["seed"]
    assert f"seed {seed}" in run.stderr  # still said, with the result


def test_flag_values_are_named_for_what_they_are():
    helptext = " ".join(zimage("serve", "--help").stdout.split())
    for flag in ("--max-queue N", "--rate-limit-per-minute N", "--jobs-per-client N", "--ui-gallery-max N",
                 "--auth USER:PASSWORD", "--watchdog-seconds SECONDS"):
        assert flag in helptext
    for word in ("MINUTE", "QUEUE", "CLIENT"):  # the last word of the flag's name, which was the metavar
        assert not re.search(rf"\b{word}\b", helptext), word


def test_generate_help_lists_no_server_only_flags():
    helptext = zimage("generate", "--help").stdout
    assert "--prompt" in helptext and "--model" in helptext and "--output" in helptext
    for flag in ("--host", "--port", "--auth", "--kiosk", "--max-queue", "--jobs-per-client", "--vram-poll-seconds",
                 "--idle-unload-minutes", "--rate-limit-per-minute", "--history-db", "--warmup"):
        assert flag not in helptext, flag


@pytest.mark.skipif(torch.cuda.is_available(), reason="what doctor says on a machine without CUDA")
def test_doctor_on_a_cpu_says_compile_is_off_as_the_server_does():
    run = zimage("doctor", "--json", "--model", "demo")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["speed"]["compile"].startswith("off")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_full_size_synthetic_bench_on_a_cpu_is_refused_at_once(tmp_path):
    # it used to print nothing for 109 s and then be killed by the OOM killer at 22 GB
    started = time.monotonic()
    run = zimage("bench", "--synthetic", "--runs", "5", "--http", "--output-dir", str(tmp_path))
    assert time.monotonic() - started < 60
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "--synthetic-scale demo" in lines[0]
    assert "needs a CUDA GPU" in lines[0]
