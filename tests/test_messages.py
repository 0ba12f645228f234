"""The message catalogue: every code the package uses has an English and a Chinese template with the same
placeholders, the Chinese says no English, and the lower layers' real messages render in both languages."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

import zimage_ui
from zimage_ui.messages import LANGUAGES, Count, Message, Word, render, strings

PACKAGE_DIR = Path(zimage_ui.__file__).resolve().parent
FAMILIES = ("change", "error", "admission", "note", "refusal", "failure", "decode_plan")
# ASCII a Chinese message may still hold: units, product and format names, a command-line flag
ALLOWED_ASCII = {"GiB", "MiB", "KiB", "Turbo", "Z-Image", "--base-model", "JSON"}


def codes() -> list[str]:
    """Every message code in the catalogue (a family's keys: ``change.*``, ``error.*``, …)."""
    return sorted(k for k in strings("en") if k.split(".")[0] in FAMILIES or k in ("change", "field_error"))


def placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def english_words() -> set[str]:
    """Words of the English message templates: none may show on the Chinese page (the allowed names aside)."""
    words: set[str] = set()
    for code in codes():
        text = re.sub(r"\{[^}]*\}", " ", strings("en")[code])
        words |= {w.lower() for w in re.findall(r"[A-Za-z]{3,}", text)}
    return words - {w.lower() for w in ALLOWED_ASCII} - {"base", "model", "image"}


def english_in(text: str) -> set[str]:
    """The words of ``text`` that are words of the English templates."""
    return {w.lower() for w in re.findall(r"[A-Za-z]{3,}", text)} & english_words()


def ascii_letters_left(text: str) -> str:
    for allowed in ALLOWED_ASCII:
        text = text.replace(allowed, "")
    return "".join(re.findall(r"[A-Za-z]+", text))


# Sample values by placeholder: numbers, the kinds of value the code passes (words, counts, nested messages)
SAMPLES = {
    "field": Word("steps"), "preset": Word("quality"), "kind": Word("text"), "reason": Word("loading"),
    "known": [Word("prompt"), Word("steps")], "choices": [Word("turbo"), Word("standard")],
    "words": ["龙"], "images": Count(2, "images"), "jobs": Count(1, "jobs"),
    "plan": Message("decode_plan_tiled", {"images": Count(1, "images"), "tile": 512}),
    "message": Message("error.empty"), "value": "123", "char": "'〇'", "why": "28",
    "before": 60, "after": 50, "guidance": 3.5, "megapixels": 1.0,
}


def sample(code: str) -> Message:
    values = {name: SAMPLES.get(name, 7 * 2**30 if name.endswith("_bytes") else 42)
              for name in placeholders(strings("en")[code])}
    return Message(code, values)


def test_every_code_has_both_languages_with_the_same_placeholders():
    assert len(codes()) >= 45
    for code in codes():
        for lang in LANGUAGES:
            assert code in strings(lang), (lang, code)
            assert placeholders(strings(lang)[code]) == placeholders(strings("en")[code]), (lang, code)
    for key in strings("en"):  # the words and counts the renderer looks up
        if key.startswith(("word.", "count.")):
            assert key in strings("zh"), key


@pytest.mark.parametrize("code", codes())
def test_each_code_in_chinese_has_no_ascii_letters_but_units_and_names(code):
    zh = render(sample(code), "zh")
    assert ascii_letters_left(zh) == "", (code, zh)
    assert re.search(r"[\u4e00-\u9fff]", zh) or code == "change", (code, zh)
    assert render(sample(code), "en") != zh


def test_every_code_the_package_writes_is_in_the_catalogue():
    """Codes written as literals (``Message("note.demo_size", …)``, ``message("error.empty")``) and the change
    codes (``Change(field, before, after, "preset_range")``) all have templates."""
    used: set[str] = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        source = path.read_text("utf-8")
        used |= set(re.findall(r"""[Mm]essage\(\s*["']([a-z_.]+)["']""", source))
        arg = r"(?:[^,()]|\([^()]*\))+"  # one argument (a call inside it allowed)
        used |= {f"change.{c}" for c in re.findall(rf"""Change\({arg},{arg},{arg},\s*["']([a-z_]+)["']""", source)}
        clamp = r'\bf\.clamp\(\s*(?:"\w+"|\w+)\s*,[^"]*"([a-z_]+)"'  # clamp(name, value, low, high, "code")
        used |= {f"change.{c}" for c in re.findall(clamp, source)}
        used |= {f"change.kiosk_{c}" for c in re.findall(r"""change\(\s*"\w+",[^()]*?,\s*"([a-z_]+)""", source)}
        used |= {f"admission.{c}" for c in ("ok", "tight", "over", "over_suggest", "over_others", "ok_chunked",
                                             "tight_chunked")}
    assert {"note.demo_size", "error.empty", "change.preset_range", "change.seed_range", "change.whole",
            "change.kiosk_steps"} <= used
    missing = {code for code in used if code not in strings("en")}
    assert not missing, missing


def test_the_lower_layers_return_codes_and_the_doors_render_them():
    from zimage_ui.engine.jobs import ClientBusy, NotReady, QueueFull
    from zimage_ui.limits import kiosk_request
    from zimage_ui.presets import load_presets
    from zimage_ui.validation import RequestError, validate

    book = load_presets()
    v = validate({"prompt": "x" * 9000, "preset": "quality", "steps": 60, "guidance": 9.5, "width": 250,
                  "height": 3000, "batch": 9, "seed": 2**40}, book, count_tokens=lambda text: 999)
    assert {(c.field, c.code) for c in v.changes} >= {("steps", "preset_range"), ("guidance", "preset_range"),
                                                      ("width", "side_range"), ("prompt", "too_long"),
                                                      ("prompt", "truncated"), ("seed", "seed_range")}
    steps = next(c for c in v.changes if c.field == "steps")
    assert (steps.before, steps.after, dict(steps.values)) == (60, 50, {"preset": "quality", "low": 20, "high": 50})
    assert str(steps) == "steps 60 → 50 (quality allows 20–50)" and steps.reason == "quality allows 20–50"
    assert render(steps.message, "zh") == "步数 60 → 50（高质量允许 20–50）"
    kiosk = kiosk_request(validate({"prompt": "x", "batch": 3, "steps": 4}, book), book, demo=False)
    lines = [c.message for c in kiosk.changes if c.code.startswith("kiosk")]
    assert lines and all(not english_in(render(m, "zh")) for m in lines)
    with pytest.raises(RequestError) as caught:
        validate({"prompt": " ", "steps": "many", "guidance": float("nan"), "preset": "fast", "batch": [1]}, book)
    codes_seen = [m.code for _, m in caught.value.errors]
    assert codes_seen == ["error.unknown_preset", "error.empty", "error.not_a_number", "error.not_finite",
                          "error.expected_number"]
    assert "steps: many is not a number" in str(caught.value)
    zh = caught.value.render("zh")
    assert "步数：many 不是数字" in zh and not english_in(zh.replace("many", "")), zh
    for refusal in (QueueFull(3, 29.6), ClientBusy("me", 1), NotReady("loading the model", state="loading")):
        assert refusal.message.code.startswith("refusal.")
        assert not english_in(render(refusal.message, "zh")), render(refusal.message, "zh")
    assert str(QueueFull(3, 29.6)) == "queue full: 3 jobs waiting; try again in about 30 s"
    assert render(ClientBusy("me", 2).message, "zh") == "你已有 2 个任务在排队或运行；请等待，或先取消"


def test_admission_is_figures_and_a_code():
    from zimage_ui.memory.admission import admit_shape, explain_cohost
    from zimage_ui.memory.estimator import GiB, WorkingMemoryEstimator, WorkShape
    from zimage_ui.memory.probe import MemorySnapshot

    est = WorkingMemoryEstimator.default_for("cuda", int(19.28 * GiB))

    def snap(total: float, other: float, nvml_others: float | None = None) -> MemorySnapshot:
        return MemorySnapshot("cuda", "H200", "GPU", int(total * GiB), int(19.28 * GiB), 0, 0, int(other * GiB),
                              int((total - 19.28 - other) * GiB), 0,
                              nvml=None if nvml_others is None else {"other_processes_bytes": int(nvml_others * GiB)})

    over = admit_shape(est, snap(27.7, 0.5), WorkShape(2048, 2048))
    assert over.message.code == "admission.over_suggest"
    chunked = admit_shape(est, snap(27.7, 0.5), WorkShape(1024, 1024, batch=4))
    assert chunked.decode_batch is not None and chunked.message.code.endswith("_chunked")
    assert "decodes" in str(chunked.message) and "解码器每次解码" in render(chunked.message, "zh")
    crowded = snap(22.0, 2.6, nvml_others=2.5)
    others = explain_cohost(admit_shape(est, crowded, WorkShape(1024, 1024)), est, crowded, 256)
    assert others.message.code == "admission.over_others" and others.to_dict()["code"] == "admission.over_others"
    assert "other processes use 2.5 GiB" in str(others.message) and "256x256" in str(others.message)
    for admission in (over, chunked, others):
        zh = render(admission.message, "zh")
        assert not english_in(zh) and ascii_letters_left(zh) == "", zh


def test_the_demo_models_notes_are_codes_said_in_both_languages():
    from zimage_ui.models import demo
    from zimage_ui.validation import RunRequest

    notes = demo.request_notes(RunRequest("a red dragon on a blue castle", "", "turbo", 8, 0.0, 512, 512, 1, 1))
    assert [n.code for n in notes] == ["note.demo_unknown_words", "note.demo_size"]
    assert notes[0].values["words"] == ["dragon", "castle"]
    zh = [render(n, "zh") for n in notes]
    assert zh[0] == "演示模型不认识：'dragon'、'castle'（它只认识简单的图形、颜色和位置）"
    assert zh[1] == "演示模型是按 256×256 的图片训练的；在 512×512 下画得更差"
    assert str(notes[1]) == "the demo model is trained for 256×256 pictures; at 512×512 it draws worse"
