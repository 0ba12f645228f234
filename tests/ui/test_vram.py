"""The VRAM bar's arithmetic and markup from injected snapshots: no GPU, no server."""

from __future__ import annotations

import re

import pytest

from zimage_ui.memory.admission import admit, admit_shape
from zimage_ui.memory.estimator import WorkingMemoryEstimator, WorkShape
from zimage_ui.memory.probe import MemoryProbe, MemorySnapshot, RawMemory
from zimage_ui.ui.vram import bar_view, render_vram_bar
from zimage_ui.units import GiB, MiB


def snap(total=80 * GiB, weights=20 * GiB, working=0, cache=0, other=0, kind="cuda") -> MemorySnapshot:
    free = total - weights - working - cache - other
    label = "GPU · VRAM" if kind == "cuda" else "CPU · RAM"
    return MemorySnapshot(kind, "Test GPU", label, total, weights, working, cache, other, free, working)


def segments(html: str) -> dict[str, int]:
    """``data-segment`` → ``data-bytes`` of the direct children of ``#vram-bar``, as a browser would read them."""
    bar = re.search(r'<div id="vram-bar"[^>]*>(.*?)</div></div>', html, re.S) or re.search(
        r'id="vram-bar".*', html, re.S)
    return {m[0]: int(m[1]) for m in re.findall(r'data-segment="(\w+)" data-bytes="(\d+)"', bar.group(0))}


def test_segments_sum_to_the_total_and_widths_follow_bytes():
    s = snap(weights=19 * GiB, working=2 * GiB + 123, cache=512 * MiB, other=3 * GiB)
    view = bar_view(s, need_bytes=None, state="ok")
    assert [seg.name for seg in view.segments] == ["weights", "other", "working", "cache", "free"]
    assert sum(seg.bytes for seg in view.segments) == s.total_bytes
    assert sum(seg.percent for seg in view.segments) == pytest.approx(100.0)
    assert view.segments[0].percent == pytest.approx(100 * 19 / 80)
    html = render_vram_bar(s)
    found = segments(html)
    assert sum(found.values()) == s.total_bytes == int(re.search(r'data-total-bytes="(\d+)"', html)[1])
    assert found["working"] == 2 * GiB + 123  # integer bytes, not rounded GB


def test_cache_and_other_only_when_nonzero_but_the_three_always():
    found = segments(render_vram_bar(snap(weights=0, working=0)))
    assert set(found) == {"weights", "working", "free"}
    found = segments(render_vram_bar(snap(cache=1, other=2)))
    assert set(found) == {"weights", "working", "cache", "other", "free"}


def test_projected_block_starts_after_weights_and_other_and_is_clipped():
    s = snap(total=10 * GiB, weights=4 * GiB, other=1 * GiB, working=1 * GiB)
    view = bar_view(s, need_bytes=2 * GiB, state="ok")
    assert view.projected_left == pytest.approx(50.0) and view.projected_width == pytest.approx(20.0)
    view = bar_view(s, need_bytes=50 * GiB, state="over")
    assert view.projected_left + view.projected_width == pytest.approx(100.0)
    html = render_vram_bar(s, need_bytes=2 * GiB)
    assert f'data-projected-bytes="{2 * GiB}"' in html and 'data-need-bytes="2147483648"' in html


def admission_for(snapshot: MemorySnapshot, need: int, margin: int = int(0.7 * GiB)):
    return admit(snapshot, need, margin)


@pytest.mark.parametrize(("need_gb", "state"), [(1.0, "ok"), (2.5, "tight"), (9.0, "over")])
def test_state_and_message_follow_admission(need_gb, state):
    s = snap(total=24 * GiB, weights=19 * GiB, other=2 * GiB)  # ~2.75 GB available after the CUDA reserve
    adm = admission_for(s, int(need_gb * GiB))
    assert adm.state == state
    html = render_vram_bar(s, need_bytes=adm.need_bytes, admission=adm, largest=(768, 768, 1))
    assert f'id="vram-bar" class="zb-bar" data-state="{state}"' in html
    message = re.search(r'<div class="zb-msg" data-state="\w+">(.*?)</div>', html)[1]
    assert {"ok": "Fits", "tight": "Tight", "over": "Won&#x27;t fit"}[state] in message
    if state == "over":
        assert "needs ≈ 9.0 GiB" in message and "Largest size that fits: 768×768." in message


def test_over_with_no_smaller_size_says_so_and_chinese_legend():
    s = snap(total=24 * GiB, weights=23 * GiB)
    adm = admission_for(s, 4 * GiB)
    html = render_vram_bar(s, need_bytes=adm.need_bytes, admission=adm, largest=None, lang="zh")
    assert "放不下" in html and "模型权重" in html and "空闲" in html


def test_probe_with_a_fake_source_to_bar_end_to_end():
    """Raw readings → probe arithmetic → estimator admission → bar: the path the page takes, minus the GPU."""

    class FakeCuda:
        def read(self):
            # a 32 GiB card: 2048² × 4 does not fit, not even decoding one image at a time (9.5 GiB)
            return RawMemory(kind="cuda", name="Fake 32 GiB", total=32 * GiB, allocated=int(19.3 * GiB),
                             reserved=20 * GiB, device_used=24 * GiB, peak_allocated=int(19.3 * GiB))

        def reset_peak(self):
            pass

    probe = MemoryProbe(FakeCuda(), weights_bytes=lambda: int(19.3 * GiB))
    s = probe.snapshot()
    est = WorkingMemoryEstimator.default_for("cuda", int(19.3 * GiB))
    fits = admit_shape(est, s, WorkShape(1024, 1024, 1, False), int(0.7 * GiB))
    huge = admit_shape(est, s, WorkShape(2048, 2048, 4, True), int(0.7 * GiB))
    assert fits.state == "ok" and huge.state == "over" and huge.suggestion is not None
    html = render_vram_bar(s, need_bytes=huge.need_bytes, admission=huge,
                           largest=(huge.suggestion.width, huge.suggestion.height, huge.suggestion.batch))
    found = segments(html)
    assert found["weights"] == int(19.3 * GiB) and found["cache"] == 20 * GiB - int(19.3 * GiB)
    assert found["other"] == 4 * GiB and sum(found.values()) == 32 * GiB
    assert 'data-state="over"' in html and f"{huge.suggestion.width}×{huge.suggestion.height} × 4" in html


def test_no_snapshot_yet_draws_an_empty_bar():
    html = render_vram_bar(None)
    assert 'id="vram-bar"' in html and "not available" in html
