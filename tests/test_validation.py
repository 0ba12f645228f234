"""The validator: clamps what is out of range, says what it changed, and raises only its own error."""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zimage_ui.presets import load_presets
from zimage_ui.validation import GenerationRequest, RequestError, validate

BOOK = load_presets()


def run(**kw):
    return validate(GenerationRequest(**kw), BOOK, rng=random.Random(0))


def test_turbo_defaults_fill_in():
    v = run(prompt="a red circle", seed=7)
    r = v.request
    assert (r.preset, r.steps, r.guidance, r.width, r.height, r.batch, r.seed) == ("turbo", 8, 0.0, 1024, 1024, 1, 7)
    assert v.changes == ()


def test_out_of_range_values_are_clamped_and_reported():
    v = run(prompt="x", preset="quality", steps=60, guidance=7.5, width=5000, height=100, batch=9, seed=2**40)
    r = v.request
    assert (r.steps, r.guidance, r.width, r.height, r.batch, r.seed) == (50, 7.0, 2048, 256, 4, 2**32 - 1)
    messages = v.messages
    assert "steps 60 → 50 (quality allows 20–50)" in messages
    assert any(m.startswith("guidance 7.5 → 7") for m in messages)
    assert {c.field for c in v.changes} == {"steps", "guidance", "width", "height", "batch", "seed"}


def test_sides_snap_to_multiples_of_16():
    v = run(prompt="x", width=1000, height=1030, seed=1)
    assert v.request.width % 16 == 0 and v.request.height % 16 == 0
    assert [c.field for c in v.changes] == ["width", "height"]


def test_max_side_setting_lowers_the_limit():
    book = load_presets(max_side=768)
    v = validate(GenerationRequest(prompt="x", width=1024, height=512, seed=1), book)
    assert v.request.width == 768 and v.request.height == 512


def test_missing_seed_is_drawn_and_reported():
    v = run(prompt="x")
    assert 0 <= v.request.seed < 2**32
    assert [c.field for c in v.changes] == ["seed"] and "random" in str(v.changes[0])
    assert run(prompt="x", seed=-1).request.seed == v.request.seed  # same rng, -1 means random too


def test_numeric_text_is_accepted_like_a_form_would_send_it():
    v = run(prompt="x", steps="12", guidance="0.5", width=" 512 ", seed="7")
    assert (v.request.steps, v.request.guidance, v.request.width, v.request.seed) == (12, 0.5, 512, 7)


def test_fractional_steps_are_rounded_and_reported():
    v = run(prompt="x", steps=7.6, seed=1)
    assert v.request.steps == 8 and "whole numbers only" in v.messages[0]


def test_preset_by_label_any_case():
    assert run(prompt="x", preset="Standard", seed=1).request.preset == "standard"


def test_negative_prompt_dropped_without_guidance():
    v = run(prompt="x", negative_prompt="blurry", seed=1)
    assert v.request.negative_prompt == ""
    assert "ignored without guidance" in v.messages[0]
    assert run(prompt="x", preset="standard", negative_prompt="blurry", seed=1).request.negative_prompt == "blurry"


def test_long_prompts_are_reported_as_truncated():
    v = validate(GenerationRequest(prompt="word " * 600, seed=1), BOOK, count_tokens=lambda t: len(t.split()) + 5)
    assert any(c.field == "prompt" and "truncated" in c.reason for c in v.changes)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="   "), "prompt"),
        (dict(prompt=None), "prompt"),
        (dict(prompt=12), "prompt"),
        (dict(prompt="x", width="abc"), "width"),
        (dict(prompt="x", steps=float("nan")), "steps"),
        (dict(prompt="x", guidance=math.inf), "guidance"),
        (dict(prompt="x", guidance="-inf"), "guidance"),
        (dict(prompt="x", batch=[1]), "batch"),
        (dict(prompt="x", seed=True), "seed"),
        (dict(prompt="x", preset="ultra"), "preset"),
        (dict(prompt="x", preset=3), "preset"),
        (dict(prompt="x", negative_prompt={"a": 1}), "negative_prompt"),
    ],
)
def test_garbage_is_an_error_naming_the_field(kw, field):
    with pytest.raises(RequestError) as info:
        run(**kw)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_unknown_fields_are_refused():
    with pytest.raises(RequestError) as info:
        validate({"prompt": "x", "stpes": 3}, BOOK)
    assert info.value.field == "stpes"


def test_every_bad_field_is_named():
    with pytest.raises(RequestError) as info:
        run(prompt="", width="wide", height="tall")
    assert [f for f, _ in info.value.errors] == ["prompt", "width", "height"]


anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.binary(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers()),
    st.sampled_from(["turbo", "Quality", "standard", "-1", "1e309", "nan", "0x10", "12.5", " 64 ", "9" * 5000]),
)


@settings(max_examples=1500, deadline=None)
@given(prompt=anything, negative=anything, preset=anything, steps=anything, guidance=anything, width=anything,
       height=anything, seed=anything, batch=anything)
def test_no_input_raises_anything_but_request_error(prompt, negative, preset, steps, guidance, width, height, seed,
                                                    batch):
    raw = GenerationRequest(prompt, negative, preset, steps, guidance, width, height, seed, batch)
    try:
        v = validate(raw, BOOK, rng=random.Random(1))
    except RequestError as exc:
        assert exc.errors and all(isinstance(f, str) and m for f, m in exc.errors)
        return
    r = v.request
    lim = BOOK.limits
    preset_ = BOOK.presets[r.preset]
    assert preset_.steps_range[0] <= r.steps <= preset_.steps_range[1]
    assert preset_.guidance_range[0] <= r.guidance <= preset_.guidance_range[1]
    assert lim.side[0] <= r.width <= lim.side[1] and r.width % 16 == 0
    assert lim.side[0] <= r.height <= lim.side[1] and r.height % 16 == 0
    assert lim.batch[0] <= r.batch <= lim.batch[1]
    assert lim.seed[0] <= r.seed <= lim.seed[1]
    assert r.prompt.strip()
