"""The shapes world and its judge: captions, split, renderer, and a judge that reads the rendered truth right."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from zimage_ui.models import shapes_world as world
from zimage_ui.models.demo import build_demo_tokenizer
from zimage_ui.models.judge import read_picture, score, summarise
from zimage_ui.models.shapes_world import (
    COLOURS,
    POSITIONS,
    SHAPES,
    Scene,
    held_out_scenes,
    is_held_out,
    render,
    training_scene,
)


@pytest.fixture(scope="module")
def train_scenes() -> list[Scene]:
    return [training_scene(0, i) for i in range(3000)]


def test_captions_follow_the_grammar(train_scenes):
    captions = {s.caption for s in train_scenes}
    assert "a red circle on a blue background" in {world.caption_for(Scene("red", "circle", background="blue"))}
    assert world.caption_for(Scene("yellow", "square", count=2, background="white")) == \
        "two yellow squares on a white background"
    assert world.caption_for(Scene("green", "triangle", position="in the top left corner")) == \
        "a green triangle in the top left corner"
    assert world.caption_for(Scene("purple", "star", size="large")) == "a large purple star"
    assert world.caption_for(Scene("orange", "cross", count=3)) == "three orange crosses"
    assert world.caption_for(Scene("orange", "cross")) == "an orange cross"
    assert world.caption_for(Scene("red", "star", background="orange")) == "a red star on an orange background"
    assert len(captions) > 1500  # a varied world, not a handful of sentences
    for s in train_scenes:
        assert s.caption == world.caption_for(s)
        assert s.colour != s.background_colour  # an object never vanishes into its background
        assert s.count == 1 or not s.position


def test_tokenizer_knows_every_word_of_the_world():
    tok = build_demo_tokenizer()
    unk = tok.convert_tokens_to_ids("[UNK]")
    for word in sorted(world.world_words()):
        assert tok.convert_tokens_to_ids(word) != unk, word
    assert tok("a red dragon").input_ids.count(unk) == 1
    assert tok("a red circle, on blue!").input_ids == tok("a red circle on blue").input_ids


def test_training_never_draws_a_held_out_triple(train_scenes):
    assert not any(is_held_out(s) for s in train_scenes)
    held = held_out_scenes(200)
    assert all(is_held_out(s) for s in held)
    # every colour, shape and background is still trained on; only their combinations are held out
    assert {s.colour for s in train_scenes} == set(COLOURS)
    assert {s.shape for s in train_scenes} == set(SHAPES)
    assert {s.background_colour for s in train_scenes} == set(COLOURS)
    triples = {(s.colour, s.shape, s.background_colour) for s in held}
    assert len(triples) > 30
    assert sum(bool(s.position) for s in held) > 60  # enough prompts that name a position


def test_scenes_and_pixels_are_a_function_of_the_seed():
    assert training_scene(5, 17) == training_scene(5, 17)
    assert [training_scene(5, i) for i in range(20)] != [training_scene(6, i) for i in range(20)]
    assert held_out_scenes(30) == held_out_scenes(200)[:30]
    a, b = render(training_scene(5, 17), 128), render(training_scene(5, 17), 128)
    assert a.tobytes() == b.tobytes()


def test_renderer_is_anti_aliased_and_places_objects():
    img = np.asarray(render(Scene("black", "circle", background="white", position="in the top left corner"), 128))
    values = {tuple(p) for p in img.reshape(-1, 3)}
    assert len(values) > 2  # edge pixels blend the two colours
    ys, xs = np.nonzero(img[..., 0] < 128)
    assert xs.mean() < 128 / 3 and ys.mean() < 128 / 3


def test_judge_reads_the_rendered_truth(train_scenes):
    scenes = held_out_scenes(200) + train_scenes[:100]
    scores = [score(s, read_picture(render(s, 256))) for s in scenes]
    summary = summarise(scores)
    for key in ("background", "colour", "shape", "position", "count"):
        assert summary[key] == 1.0, (key, [s.caption for s, sc in zip(scenes, scores, strict=True) if not sc[key]])


def test_judge_reads_blurred_and_small_pictures():
    # generated pictures are softer than the renderer's; the judge must not depend on crisp edges
    scenes = held_out_scenes(60)
    blurred = [score(s, read_picture(render(s, 256).filter(ImageFilter.GaussianBlur(2)))) for s in scenes]
    small = [score(s, read_picture(render(s, 128))) for s in scenes]
    for summary in (summarise(blurred), summarise(small)):
        assert summary["background"] == summary["colour"] == 1.0
        assert summary["shape"] >= 0.95 and summary["position"] == 1.0


def test_judge_says_no_to_the_wrong_picture():
    picture = render(Scene("blue", "star", background="yellow", position="in the bottom right corner"), 256)
    reading = read_picture(picture)
    verdict = score(Scene("red", "circle", background="black", position="in the top left corner"), reading)
    assert verdict == {"background": False, "colour": False, "shape": False, "position": False, "count": True}
    for shape in SHAPES:
        if shape != "star":
            assert not score(Scene("blue", shape, background="yellow"), reading)["shape"]
    blank = read_picture(Image.new("RGB", (256, 256), COLOURS["green"]))
    assert (blank.background, blank.colour, blank.shape, blank.count) == ("green", None, None, 0)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3)).astype(np.uint8)
    assert summarise([score(s, read_picture(noise)) for s in held_out_scenes(10)])["shape"] < 0.5


def test_every_position_is_told_apart():
    for phrase, cell in POSITIONS.items():
        for size in ("small", "", "large"):
            reading = read_picture(render(Scene("white", "square", size=size, position=phrase, background="black")))
            assert reading.cell == cell, (phrase, size)


def test_unknown_words_are_named_once_in_order():
    assert world.unknown_words("A red circle on a blue background") == []
    assert world.unknown_words("a red dragon, a Red DRAGON and a castle 3") == ["dragon", "and", "castle"]
    assert world.unknown_words("红色的圆 circle") == ["红色的圆"]
    assert all(world.unknown_words(p) == [] for p in world.EXAMPLE_PROMPTS)
