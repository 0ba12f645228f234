"""Generation history: one SQLite row per finished job (stdlib ``sqlite3``, WAL, fsync on commit).

Rows are written from the engine's hooks on the worker thread: a successful job's row is committed before its
waiters are released, so nothing that was answered is lost by a crash or restart. Images themselves are saved
atomically by the engine (``save_images``); the row records their paths.

    >>> import tempfile, pathlib
    >>> h = History(pathlib.Path(tempfile.mkdtemp()) / "history.sqlite3")
    >>> h.page(limit=10)["total"]
    0
    >>> h.close()
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from ..engine.jobs import Job, JobResult, JobState
from .metrics import job_outcome

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,          -- unix time the row was written (job end)
    job_id TEXT NOT NULL,              -- the engine's id; unique only within one server run
    owner TEXT,                        -- browser session or API client that asked
    outcome TEXT NOT NULL,             -- ok | cancelled | oom | error
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    preset TEXT NOT NULL,
    steps INTEGER NOT NULL,
    guidance REAL NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    seeds TEXT NOT NULL,               -- JSON list, one per image
    model_id TEXT,
    timings TEXT,                      -- JSON object of seconds
    total_s REAL,
    peak_working_bytes INTEGER,
    paths TEXT NOT NULL,               -- JSON list of absolute image paths
    changes TEXT NOT NULL,             -- JSON list of what the validator clamped
    notes TEXT NOT NULL,               -- JSON list
    error TEXT
);
CREATE INDEX IF NOT EXISTS generations_outcome ON generations (outcome, id);
"""
_COLUMNS = ("created_at", "job_id", "owner", "outcome", "prompt", "negative_prompt", "preset", "steps", "guidance",
            "width", "height", "seed", "batch", "seeds", "model_id", "timings", "total_s", "peak_working_bytes",
            "paths", "changes", "notes", "error")
_JSON_COLUMNS = ("seeds", "timings", "paths", "changes", "notes")


class History:
    """The history database. Thread-safe: one connection behind a lock (writes are one per job, reads small)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._rows: weakref.WeakKeyDictionary[Job, int] = weakref.WeakKeyDictionary()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss too, not only a process crash; one commit per job is cheap
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def attach(self, engine: Any) -> None:
        """Record every job the engine finishes: successes before they are answered, the rest when they end."""
        engine.add_result_hook(self.record_result)
        engine.add_end_hook(self.record_end)

    # --- writing --------------------------------------------------------------------------------------------
    def record_result(self, job: Job, result: JobResult) -> int:
        """The row of a successful job (called on the worker thread before the job is marked done)."""
        return self._insert(job, "ok", result=result)

    def record_end(self, job: Job) -> int | None:
        """The row of a cancelled or failed job (successes were recorded by ``record_result``)."""
        if job.state == JobState.DONE:
            return None
        return self._insert(job, job_outcome(job), error=str(job.error) if job.error else None)

    def _insert(self, job: Job, outcome: str, *, result: JobResult | None = None, error: str | None = None) -> int:
        req = job.request
        values = {
            "created_at": time.time(), "job_id": job.id, "owner": job.owner, "outcome": outcome,
            "prompt": req.prompt, "negative_prompt": req.negative_prompt, "preset": req.preset, "steps": req.steps,
            "guidance": req.guidance, "width": req.width, "height": req.height, "seed": req.seed,
            "batch": req.batch, "seeds": result.seeds if result else req.seeds(),
            "model_id": result.model_id if result else None, "timings": result.timings if result else None,
            "total_s": result.timings.get("total_s") if result else None,
            "peak_working_bytes": result.peak_working_bytes if result else None,
            "paths": list(result.paths) if result else [], "changes": [str(c) for c in job.changes],
            "notes": list(result.notes if result else job.notes), "error": error,
        }
        for key in _JSON_COLUMNS:
            values[key] = json.dumps(values[key], ensure_ascii=False) if values[key] is not None else None
        with self._lock:
            cursor = self._conn.execute(
                f"INSERT INTO generations ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                [values[c] for c in _COLUMNS])
            row_id = int(cursor.lastrowid or 0)
        self._rows[job] = row_id
        return row_id

    # --- reading --------------------------------------------------------------------------------------------
    def row_for(self, job: Job) -> int | None:
        """The history id of ``job`` in this run, if it has a row."""
        return self._rows.get(job)

    def page(self, *, limit: int = 50, offset: int = 0, outcome: str | None = None,
             owner: str | None = None) -> dict[str, Any]:
        """Newest first: ``{"items": [...], "total": n, "limit", "offset", "next_offset"}``."""
        where, args = [], []
        if outcome is not None:
            where.append("outcome = ?")
            args.append(outcome)
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            total = self._conn.execute(f"SELECT COUNT(*) FROM generations {clause}", args).fetchone()[0]
            rows = self._conn.execute(f"SELECT * FROM generations {clause} ORDER BY id DESC LIMIT ? OFFSET ?",
                                      [*args, limit, offset]).fetchall()
        items = [_row(r) for r in rows]
        next_offset = offset + len(items) if offset + len(items) < total else None
        return {"items": items, "total": total, "limit": limit, "offset": offset, "next_offset": next_offset}

    def get(self, row_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM generations WHERE id = ?", (row_id,)).fetchone()
        return _row(row) if row is not None else None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _row(row: sqlite3.Row) -> dict[str, Any]:
    item = dict(row)
    for key in _JSON_COLUMNS:
        if item.get(key) is not None:
            item[key] = json.loads(item[key])
    return item
