"""Generation history: one SQLite row per finished job (stdlib ``sqlite3``, WAL, fsync on commit).

Rows are written from the engine's hooks on the worker thread: a successful job's row is committed before its
waiters are released, so nothing that was answered is lost by a crash or restart. Images themselves are saved
atomically by the engine (``save_images``); the row records their paths.

    >>> import tempfile, pathlib
    >>> h = History(pathlib.Path(tempfile.mkdtemp()) / "history.sqlite3")
    >>> h.page(limit=10)["total"]
    0
    >>> h.close()

A bad database never stops the service. A file that is not a database or is damaged (at start or later) is moved
aside as ``history.sqlite3.corrupt-<UTC time>`` and a fresh one started; a file that cannot be written
(read-only, disk full, no permission) leaves history off. Either way one log line says what happened and
``problem`` says it to /readyz and the ``zimage_history_degraded`` metric; messages name files relative to their
folder, never by absolute path.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine.jobs import Job, JobResult, JobState
from .metrics import job_outcome

if TYPE_CHECKING:
    from ..engine.api import EngineAPI

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
# SQLite's codes for a file that is damaged or not a database at all: those files are moved aside. Anything else
# (read-only, locked, disk full, I/O error) is not the file's fault and leaves it where it is.
_CORRUPT_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
T = TypeVar("T")
_WRITE_FAILING = "history rows are not being written"


class HistoryUnavailable(Exception):
    """History can't be read now; the message says why (no absolute paths)."""


def is_corrupt(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the file is damaged or not a database (as opposed to read-only, locked, full)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(_CORRUPT_CODES) or "malformed" in str(exc) or "not a database" in str(exc)


def _reason(exc: BaseException) -> str:
    """An error as a user may see it: SQLite's words or the OS error's, without the file's absolute path."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class History:
    """The history database. Thread-safe: one connection behind a lock (writes are one per job, reads small).

    ``problem`` is None while all is well, else one line for /readyz: history is off (the file can't be opened for
    writing) or was started afresh after a damaged file was moved aside. ``dropped`` counts rows not written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._rows: weakref.WeakKeyDictionary[Job, int] = weakref.WeakKeyDictionary()
        self.problem: str | None = None
        self.dropped = 0
        self.moved_aside: list[Path] = []
        with self._lock:
            self._open()

    # --- opening and recovering (called with the lock held) -------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss too, not only a process crash; one commit per job is cheap
            conn.execute("PRAGMA synchronous=FULL")
            # a damaged page shows here, at start, rather than as a failed read or a lost row later
            check = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
            if check != ["ok"]:
                log.debug("quick_check of %s: %s", self.path.name, check)
                raise sqlite3.DatabaseError("database disk image is malformed (quick_check failed)")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            # WAL needs the -wal/-shm files to be writable too: a read-only folder shows only at the first write
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open(self) -> None:
        try:
            self._conn = self._connect()
        except sqlite3.DatabaseError as exc:
            if is_corrupt(exc):
                self._replace(f"{self.path.name} is damaged ({_reason(exc)})")
            else:
                self._off(exc)
        except (sqlite3.Error, OSError) as exc:
            self._off(exc)

    def _off(self, exc: BaseException) -> None:
        self._conn = None
        self.problem = f"history is off: {self.path.name} can't be written ({_reason(exc)}); finished images " \
                       "are still made and saved"
        log.error("%s", self.problem)

    def _replace(self, why: str) -> None:
        """Move the damaged file (and its -wal/-shm) aside under a timestamped name and start a fresh one."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                extra = self.path.with_name(self.path.name + suffix)
                if extra.exists():
                    extra.rename(aside.with_name(aside.name + suffix))
        except OSError as exc:
            self._off(exc)
            return
        self.moved_aside.append(aside)
        try:
            self._conn = self._connect()
        except (sqlite3.Error, OSError) as exc:
            self._off(exc)
            return
        self.problem = f"{why}: moved aside to {aside.name} and started a new history"
        log.error("%s", self.problem)

    def _use(self, action: Callable[[sqlite3.Connection], T], what: str) -> T:
        """Run ``action`` on the connection (lock held by the caller). A damaged file is replaced and the action
        tried once more on the fresh one; other errors raise ``HistoryUnavailable``."""
        for attempt in (1, 2):
            if self._conn is None:
                raise HistoryUnavailable(self.problem or "history is off")
            try:
                return action(self._conn)
            except sqlite3.DatabaseError as exc:
                if is_corrupt(exc) and attempt == 1:
                    self._replace(f"{self.path.name} was found damaged while {what} ({_reason(exc)})")
                    continue
                raise HistoryUnavailable(f"history failed while {what}: {_reason(exc)}") from None
        raise AssertionError("unreachable")

    def collector(self) -> Collector:
        """Prometheus series of this history: degraded (0/1) and rows that could not be written."""
        return _HistoryCollector(self)

    def attach(self, engine: EngineAPI) -> None:
        """Record every job the engine finishes: successes before they are answered, the rest when they end."""
        engine.add_result_hook(self.record_result)
        engine.add_end_hook(self.record_end)

    # --- writing --------------------------------------------------------------------------------------------
    def record_result(self, job: Job, result: JobResult) -> int | None:
        """The row of a successful job (called on the worker thread before the job is marked done); None when it
        could not be written (the job still succeeds)."""
        return self._insert(job, "ok", result=result)

    def record_end(self, job: Job) -> int | None:
        """The row of a cancelled or failed job (successes were recorded by ``record_result``)."""
        if job.state == JobState.DONE:
            return None
        return self._insert(job, job_outcome(job), error=str(job.error) if job.error else None)

    def _insert(self, job: Job, outcome: str, *, result: JobResult | None = None,
                error: str | None = None) -> int | None:
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
            "notes": [str(n) for n in (result.notes if result else job.notes)], "error": error,
        }
        for key in _JSON_COLUMNS:
            values[key] = json.dumps(values[key], ensure_ascii=False) if values[key] is not None else None
        sql = f"INSERT INTO generations ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        row = [values[c] for c in _COLUMNS]
        with self._lock:
            try:
                row_id = self._use(lambda conn: int(conn.execute(sql, row).lastrowid or 0), "writing a row")
                if self.problem is not None and self.problem.startswith(_WRITE_FAILING):
                    self.problem = None  # the database works again (space freed, lock released)
            except HistoryUnavailable as exc:
                self.dropped += 1
                if self.problem is None:
                    self.problem = f"{_WRITE_FAILING}: {exc}"
                if self.dropped == 1 or self.dropped % 100 == 0:  # one line, not one per job
                    log.error("history row of %s not written (%d so far): %s", job.id, self.dropped, exc)
                return None
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
        def read(conn: sqlite3.Connection) -> tuple[int, list[sqlite3.Row]]:
            total = conn.execute(f"SELECT COUNT(*) FROM generations {clause}", args).fetchone()[0]
            rows = conn.execute(f"SELECT * FROM generations {clause} ORDER BY id DESC LIMIT ? OFFSET ?",
                                [*args, limit, offset]).fetchall()
            return total, rows

        with self._lock:
            total, rows = self._use(read, "reading")
        items = [_row(r) for r in rows]
        next_offset = offset + len(items) if offset + len(items) < total else None
        return {"items": items, "total": total, "limit": limit, "offset": offset, "next_offset": next_offset}

    def get(self, row_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._use(lambda conn: conn.execute("SELECT * FROM generations WHERE id = ?", (row_id,)).fetchone(),
                            "reading")
        return _row(row) if row is not None else None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _row(row: sqlite3.Row) -> dict[str, Any]:
    item = dict(row)
    for key in _JSON_COLUMNS:
        if item.get(key) is not None:
            item[key] = json.loads(item[key])
    return item


class _HistoryCollector(Collector):
    def __init__(self, history: History):
        self.history = history

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("zimage_history_degraded", "1 while history is off or was started afresh after a "
                                "damaged file was moved aside (see /readyz).", value=int(self.history.problem
                                                                                         is not None))
        yield CounterMetricFamily("zimage_history_rows_dropped", "Finished jobs whose history row could not be "
                                  "written.", value=self.history.dropped)
