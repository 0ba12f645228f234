"""A history database that is garbage, damaged or read-only never stops the service; a failed save never loses the
image; a crash's half-written files are swept at start. Real files, real SQLite, a real server on loopback."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from zimage_ui.engine.jobs import Job, JobResult
from zimage_ui.service.history import History, HistoryUnavailable
from zimage_ui.validation import RunRequest

from .helpers import LiveServer, demo_settings, metric, wait_until

SMALL = {"width": 256, "height": 256, "steps": 2}
REQUEST = RunRequest("a red circle", "", "turbo", 2, 0.0, 256, 256, 7, 1)


def _row(history: History, prompt: str = "a red circle") -> int | None:
    job = Job(RunRequest(prompt, "", "turbo", 2, 0.0, 256, 256, 7, 1))
    result = JobResult(images=[], seeds=[7], request=job.request, changes=(), notes=[], model_id="demo",
                       model_label="demo", timings={"total_s": 0.1}, peak_working_bytes=0)
    return history.record_result(job, result)


def _filled_db(path: Path, rows: int = 4000) -> None:
    """A real history file with ``rows`` rows, all in the main file (checkpointed)."""
    History(path).close()
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO generations (created_at, job_id, outcome, prompt, negative_prompt, preset, "
                         "steps, guidance, width, height, seed, batch, seeds, paths, changes, notes) VALUES "
                         "(0, 'j', 'ok', ?, '', 'turbo', 2, 0, 256, 256, 7, 1, '[7]', '[]', '[]', '[]')",
                         [(f"prompt {i} " + "x" * 300,) for i in range(rows)])
    conn.close()
    sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()


def _damage(path: Path) -> None:
    """A run of pages in the middle of the file overwritten: a bad disk, a torn copy."""
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2 // 4096 * 4096)
        fh.write(os.urandom(4096 * 8))


def _immutable(path: Path) -> bool:
    """Make ``path`` unwritable even for root (chattr +i); False where the filesystem can't."""
    path.chmod(0o444)
    if os.geteuid() != 0:
        return True
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def _mutable(path: Path) -> None:
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o644)


@pytest.mark.parametrize("damage", ["random bytes", "damaged pages"])
def test_a_bad_file_is_moved_aside_and_a_new_history_started(tmp_path, damage, caplog):
    db = tmp_path / "history.sqlite3"
    if damage == "random bytes":
        db.write_bytes(os.urandom(50_000))
    else:
        _filled_db(db)
        _damage(db)
    original = db.read_bytes()
    history = History(db)
    try:
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("history.sqlite3.corrupt-")
                 and not p.name.endswith(("-wal", "-shm"))]
        assert len(aside) == 1 and aside[0].read_bytes() == original  # kept, for whoever wants to rescue it
        assert history.problem is not None and "moved aside to " + aside[0].name in history.problem
        assert str(tmp_path) not in history.problem  # no absolute server path in what /readyz shows
        assert _row(history) is not None and history.page()["total"] == 1
        lines = [r for r in caplog.records if r.name == "zimage_ui.service.history"]
        assert len(lines) == 1 and "\n" not in lines[0].getMessage()
    finally:
        history.close()


def test_damage_found_later_is_moved_aside_and_history_goes_on(tmp_path):
    db = tmp_path / "history.sqlite3"
    _filled_db(db, rows=400)
    history = History(db)
    try:
        assert history.problem is None and history.page()["total"] == 400
        # the disk goes bad under the running server; another writer makes SQLite drop its cached pages
        _damage(db)
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("PRAGMA user_version=2")
        other.close()
        assert history.page(limit=500)["total"] == 0  # a fresh history, not a 500
        assert _row(history, "after the damage") is not None
        assert history.problem is not None and "moved aside" in history.problem
        assert [i["prompt"] for i in history.page()["items"]] == ["after the damage"]
    finally:
        history.close()


def test_an_unwritable_file_turns_history_off_and_keeps_going(tmp_path):
    db = tmp_path / "history.sqlite3"
    _row(History(db))
    if not _immutable(db):
        pytest.skip("cannot make a file read-only for root here (no chattr +i)")
    try:
        history = History(db)
        assert history.problem is not None and history.problem.startswith("history is off")
        assert str(tmp_path) not in history.problem
        assert _row(history) is None and history.dropped == 1
        with pytest.raises(HistoryUnavailable):
            history.page()
        history.close()
    finally:
        _mutable(db)
    assert [p.name for p in tmp_path.iterdir() if "corrupt" in p.name] == []  # not the file's fault: left alone


def test_the_server_starts_on_a_garbage_history_and_says_so(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "history.sqlite3").write_bytes(os.urandom(20_000))
    live = LiveServer(demo_settings(tmp_path, warmup=False))
    try:
        with live.client() as http:
            ready = http.get("/readyz")
            assert ready.status_code == 200
            assert "moved aside" in ready.json()["degraded"]["history"]
            assert str(tmp_path) not in ready.text
            assert metric(http, "zimage_history_degraded") == 1
            made = http.post("/api/v1/generate", json={"prompt": "after", **SMALL})
            assert made.status_code == 200 and made.headers["x-zimage-history-id"] == "1"
            assert [i["prompt"] for i in http.get("/api/v1/history").json()["items"]] == ["after"]
    finally:
        assert live.stop() == 0


def test_a_read_only_history_leaves_the_server_ready_and_history_reads_503(tmp_path):
    out = tmp_path / "out"
    db = out / "history.sqlite3"
    out.mkdir()
    _row(History(db))
    if not _immutable(db):
        pytest.skip("cannot make a file read-only for root here (no chattr +i)")
    try:
        live = LiveServer(demo_settings(tmp_path, warmup=False))
        try:
            with live.client() as http:
                ready = http.get("/readyz")
                assert ready.status_code == 200 and ready.json()["degraded"]["history"].startswith("history is off")
                assert http.post("/api/v1/generate", json={"prompt": "still works", **SMALL}).status_code == 200
                page = http.get("/api/v1/history")
                assert page.status_code == 503 and page.json()["error"] == "history_unavailable"
                assert str(tmp_path) not in page.text
                assert metric(http, "zimage_history_rows_dropped_total") == 1
        finally:
            assert live.stop() == 0
    finally:
        _mutable(db)


def test_a_failed_save_still_answers_the_image_with_a_note(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # today's folder can't be made (a file has its name): as a full or read-only disk, for root too
    day = out / dt.datetime.now().strftime("%Y-%m-%d")
    day.write_text("in the way")
    live = LiveServer(demo_settings(tmp_path, warmup=False))
    try:
        with live.client() as http:
            made = http.post("/api/v1/generate", json={"prompt": "keep me", **SMALL},
                             headers={"Accept": "application/json"})
            assert made.status_code == 200, made.text
            body = made.json()
            assert body["images"][0]["png_base64"] and body["images"][0]["url"] is None
            assert any("not saved" in n for n in body["notes"]) and str(tmp_path) not in made.text
            png = http.post("/api/v1/generate", json={"prompt": "keep me too", **SMALL})
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
            item = http.get("/api/v1/history").json()["items"][0]
            assert item["outcome"] == "ok" and item["images"][0]["url"] is None
    finally:
        assert live.stop() == 0


def test_half_written_files_from_a_crash_are_swept_at_start(tmp_path):
    folder = tmp_path / "out" / "2026-01-01"
    folder.mkdir(parents=True)
    stale = folder / ".120000-job-1-7.png.ab12cd34.part"
    fresh = folder / ".120001-job-2-8.png.ef56ab78.part"  # maybe another process writing right now
    keep = folder / "120000-job-1-7.png"
    for path in (stale, fresh, keep):
        path.write_bytes(b"\x89PNG half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    live = LiveServer(demo_settings(tmp_path, warmup=False))
    try:
        wait_until(lambda: not stale.exists(), 30, what="stale .part removed")
        assert fresh.exists() and keep.exists()
    finally:
        assert live.stop() == 0
