"""The page's data-driven parts: strings, languages, the size table, the GPU panel."""

from __future__ import annotations

import json
import string

from zimage_ui.memory.nvml import GpuStats
from zimage_ui.presets import load_presets
from zimage_ui.sizes import load_sizes
from zimage_ui.ui.gpu import GpuHistory, render_gpu_panel
from zimage_ui.ui.i18n import I18N_DIR, LANGUAGES, format_bytes, format_seconds, pick_language, t


def test_every_language_has_every_key_with_the_same_placeholders():
    tables = {lang: json.loads((I18N_DIR / f"{lang}.json").read_text("utf-8")) for lang in LANGUAGES}
    keys = set(tables["en"])
    for lang, table in tables.items():
        assert set(table) == keys, lang
        for key in keys:
            fields = {f for _, f, _, _ in string.Formatter().parse(table[key]) if f}
            assert fields == {f for _, f, _, _ in string.Formatter().parse(tables["en"][key]) if f}, (lang, key)
    book = load_presets()
    assert all(f"preset.{name}" in keys and f"preset_info.{name}" in keys for name in book.presets)


def test_language_follows_the_setting_then_the_browser():
    assert pick_language("zh", "en-US") == "zh"
    assert pick_language("auto", "zh-TW,zh;q=0.8") == "zh"
    assert pick_language("auto", "de-DE,en;q=0.5") == "en"
    assert pick_language("auto", None) == "en"
    assert t("zh", "status_running", step=3, total=8) == "第 3/8 步"
    assert t("xx", "generate") == "Generate"


def test_byte_and_time_formats():
    assert format_bytes(19.28 * 2**30) == "19.3 GiB" and format_bytes(300 * 2**20) == "300 MiB"
    assert format_seconds(0.84) == "0.8 s" and format_seconds(42) == "42 s" and format_seconds(185) == "3 min 5 s"
    assert format_seconds(42, "zh") == "42 秒"


def test_size_table_has_the_official_ratios_inside_the_limits():
    table, limits = load_sizes(), load_presets().limits
    assert {"1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21"} <= set(table.ratios)
    assert table.classes(demo=False) == ["768", "1024", "1280", "1536"]
    assert table.classes(demo=True)[0] == "512"
    assert table.classes(demo=False, max_side=1536) == ["768", "1024"]  # 1280's 3:2 is 1536 wide; 1536 is not
    for row in table.sizes.values():
        for width, height in row.values():
            assert limits.side[0] <= min(width, height) and max(width, height) <= limits.side[1]
            assert width % limits.side_multiple == 0 and height % limits.side_multiple == 0
    assert table.size("1024", "3:2") == (1248, 832) and table.find(1248, 832) == ("1024", "3:2")


def test_gpu_panel_keeps_a_rolling_history_and_samples_once_per_interval():
    readings = iter(range(100))

    def read():
        i = next(readings)
        return GpuStats(0, "Fake H100", "550.54", 80 * 2**30, 20 * 2**30, 90 - i, 1980 - 10 * i, 2619, 60 + i,
                        500.0 + i, 700.0)

    history = GpuHistory(read, size=5, min_interval_s=1.0)
    for k in range(8):
        history.sample(now=float(k))
        history.sample(now=k + 0.5)  # a second tab in the same second reuses the reading
    assert len(history.samples) == 5 and history.series("temperature_c") == [63, 64, 65, 66, 67]
    html = render_gpu_panel(history, "en")
    assert "Fake H100 #0" in html and "67 °C" in html and "1910 MHz" in html and "507 W" in html
    assert html.count("<polyline") == 5


def test_gpu_panel_says_there_is_no_gpu():
    history = GpuHistory(lambda: None)
    history.sample()
    assert history.available is False
    assert "No NVIDIA GPU" in render_gpu_panel(history, "en") and "没有" in render_gpu_panel(history, "zh")
