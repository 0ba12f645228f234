import pytest

from zimage_ui.settings import Settings, SettingsError, load_settings


def test_defaults_are_safe_for_a_lan():
    s = Settings()
    assert s.host == "127.0.0.1" and s.model == "auto" and s.max_queue == 16


def test_gib_settings_in_bytes():
    s = Settings(vram_budget_gb=1.5, memory_margin_gb=0.5)
    assert s.vram_budget_bytes == 3 * 2**29 and s.memory_margin_bytes == 2**29
    assert Settings().vram_budget_bytes is None  # no budget: the whole card


def test_precedence_flags_over_env_over_file(tmp_path, monkeypatch):
    cfg = tmp_path / "zimage.toml"
    cfg.write_text('port = 9000\nmax_queue = 3\nmodel = "demo"\n')
    monkeypatch.setenv("ZIMAGE_UI_MAX_QUEUE", "5")
    s = load_settings(cfg, port=1234)
    assert (s.port, s.max_queue, s.model) == (1234, 5, "demo")


def test_config_file_from_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "zimage.toml"
    cfg.write_text("port = 9001\n")
    monkeypatch.setenv("ZIMAGE_UI_CONFIG", str(cfg))
    assert load_settings().port == 9001


def test_every_field_is_documented():
    assert all(f.description for f in Settings.model_fields.values())


@pytest.mark.parametrize("kw, name", [(dict(dtype="float16"), "dtype"), (dict(port="abc"), "port"),
                                      (dict(max_queue=0), "max_queue")])
def test_bad_settings_name_the_setting(kw, name):
    with pytest.raises(SettingsError, match=f"^{name}:"):
        load_settings(**kw)


def test_missing_config_file(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.toml")
