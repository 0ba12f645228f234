import os

import numpy as np
import pytest
from PIL import Image

from zimage_ui.metadata import read_metadata, save_png, write_atomic
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
