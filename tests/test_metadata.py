import io
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from zimage_ui.metadata import encode_png, png_info, read_metadata, save_png, write_atomic
from zimage_ui.validation import RunRequest


def test_round_trip(tmp_path):
    req = RunRequest("a red circle", "blurry", "standard", 25, 4.0, 256, 256, 7, 1)
    image = Image.fromarray(np.full((256, 256, 3), 128, np.uint8))
    path = save_png(image, tmp_path / "a.png", req, seed=7, model="demo")
    meta = read_metadata(path)
    assert meta["parameters"] == ("a red circle\nNegative prompt: blurry\nSteps: 25, CFG scale: 4, Seed: 7, "
                                  "Size: 256x256, Model: demo, Preset: standard")
    assert meta["zimage"]["request"] == req.to_dict()
    assert meta["zimage"]["versions"]["diffusers"]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_a_failed_write_leaves_no_file(tmp_path):
    class Boom(bytes):
        pass

    target = tmp_path / "b.png"
    with pytest.raises(TypeError):
        write_atomic(target, None)  # type: ignore[arg-type]
    assert not target.exists() and os.listdir(tmp_path) == []


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(["L", "RGB", "RGBA"]), width=st.integers(1, 40), height=st.integers(1, 40),
       seed=st.integers(0, 2**32 - 1))
def test_encoded_png_decodes_to_the_same_pixels(mode, width, height, seed):
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    shape = (height, width) if channels == 1 else (height, width, channels)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(pixels, mode)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red circle")
    data = encode_png(image, info)
    with Image.open(io.BytesIO(data)) as check:
        check.verify()  # chunk CRCs and structure
    with Image.open(io.BytesIO(data)) as back:
        assert back.mode == mode and back.size == (width, height)
        assert np.array_equal(np.asarray(back), pixels)
        assert back.text["parameters"] == "a red circle"


def test_encoded_png_is_compressed_and_keeps_every_chunk():
    req = RunRequest("桜の下の猫", "", "turbo", 8, 0.0, 512, 512, 3, 1)
    ramp = np.linspace(0, 255, 512, dtype=np.float32)
    smooth = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (512, 1)), np.full((512, 512), 40.0)], axis=-1)
    image = Image.fromarray(smooth.astype(np.uint8))
    data = encode_png(image, png_info(req, seed=3, model="demo"))
    assert len(data) < 0.2 * 512 * 512 * 3  # deflate did its job on a smooth image
    with Image.open(io.BytesIO(data)) as back:
        assert back.text["parameters"].startswith("桜の下の猫\nSteps: 8")  # non-latin text goes into iTXt
        assert json.loads(back.text["zimage"])["seed"] == 3
        assert np.array_equal(np.asarray(back), np.asarray(image))


def test_other_modes_go_through_pil():
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "p")
    with Image.open(io.BytesIO(encode_png(image, info))) as back:
        assert back.mode == "P" and back.text["parameters"] == "p"
        assert np.array_equal(np.asarray(back.convert("L")), np.asarray(image.convert("L")))


def test_saved_images_are_readable_by_others_as_umask_allows(tmp_path):
    # mkstemp's 0600 made every PNG private to the server's user (a teacher's account could not open them)
    req = RunRequest("a red circle", "", "turbo", 8, 0.0, 64, 64, 7, 1)
    image = Image.new("RGB", (64, 64), (200, 30, 90))
    old = os.umask(0o022)
    try:
        path = save_png(image, tmp_path / "a.png", req, seed=7, model="demo")
        os.umask(0o027)
        private = save_png(image, tmp_path / "b.png", req, seed=7, model="demo")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert private.stat().st_mode & 0o777 == 0o640


def test_sweep_removes_only_stale_part_files(tmp_path):
    import time

    from zimage_ui.metadata import sweep_partial_files

    day = tmp_path / "2026-01-01"
    day.mkdir()
    stale, fresh = day / ".a.png.0011aabb.part", day / ".b.png.2233ccdd.part"
    other, image = day / "notes.part", day / "a.png"
    for path in (stale, fresh, other, image):
        path.write_bytes(b"x")
    for path in (stale, other, image):
        os.utime(path, (time.time() - 3600,) * 2)
    assert sweep_partial_files(tmp_path) == 1
    assert not stale.exists() and fresh.exists() and other.exists() and image.exists()
