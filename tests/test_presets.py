import pytest

from zimage_ui.presets import PresetFileError, load_presets


def test_shipped_presets_are_the_official_settings():
    book = load_presets()
    assert list(book.presets) == ["turbo", "standard", "quality"]
    t, s, q = (book.presets[n] for n in ("turbo", "standard", "quality"))
    assert (t.steps, t.guidance) == (8, 0.0)
    assert (s.steps, s.guidance) == (25, 4.0)
    assert (q.steps, q.guidance) == (50, 5.0)
    assert book.limits.steps == (1, 50) and book.limits.guidance == (0.0, 7.0)
    assert book.to_dict()["presets"]["turbo"]["steps"] == 8


def test_a_user_file_replaces_the_shipped_one(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("""
[limits]
steps = [1, 50]
guidance = [0.0, 7.0]
side = [256, 1024]
batch = [1, 2]
seed = [0, 100]
[presets.fast]
label = "Fast"
steps = 4
guidance = 0.0
steps_range = [1, 8]
guidance_range = [0.0, 0.0]
width = 512
height = 512
""")
    book = load_presets(f)
    assert list(book.presets) == ["fast"] and book.limits.batch == (1, 2)


@pytest.mark.parametrize("body, words", [
    ("not toml [", "not valid TOML"),
    ("[limits]\nsteps=[1,50]\nguidance=[0.0,7.0]\nside=[256,2048]\nbatch=[1,4]\nseed=[0,9]\n", "no [presets"),
    ("[limits]\nsteps=[1,50]\nguidance=[0.0,7.0]\nside=[256,2048]\nbatch=[1,4]\nseed=[0,9]\n"
     "[presets.x]\nsteps=80\nguidance=0.0\nsteps_range=[1,80]\nguidance_range=[0.0,1.0]\n", "outside the limits"),
])
def test_bad_files_say_what_is_wrong(tmp_path, body, words):
    f = tmp_path / "p.toml"
    f.write_text(body)
    with pytest.raises(PresetFileError, match=words.replace("[", r"\[")):
        load_presets(f)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PresetFileError, match="not found"):
        load_presets(tmp_path / "none.toml")
