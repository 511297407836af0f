"""The durable job queue of `graphflow serve`: jobs and their events in one SQLite database (WAL mode).

Every state change is one transaction, so a crash (kill -9, power loss) leaves each job in the state of its last
commit: `recover` at start turns jobs left running into failed ones (or back into pending ones). Events are
append-only; their autoincrement id is the Server-Sent Events id, so a client replays from `Last-Event-ID`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = "pending", "running", "completed", "failed", "cancelled"
STATUSES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED)
FINISHED_STATUSES = (COMPLETED, FAILED, CANCELLED)
# the event that ends a job's stream, per final status
FINAL_EVENTS = {COMPLETED: "job_completed", FAILED: "job_failed", CANCELLED: "job_cancelled"}
_CLAIM_WINDOW = 64  # pending jobs of the top priority looked at for one whose models a worker already holds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    template TEXT,
    document TEXT NOT NULL,
    params TEXT NOT NULL,
    options TEXT NOT NULL,
    models TEXT NOT NULL DEFAULT '[]',
    batch_id TEXT,
    worker TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (status, priority DESC, seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id);
"""


@dataclass(frozen=True)
class NewJob:
    """What a submit stores: the document (or the template it came from), param values, run options."""

    document: dict[str, Any]
    params: dict[str, Any]
    options: dict[str, Any]
    template: str | None = None
    priority: int = 0
    models: tuple[str, ...] = ()  # the model sources the job loads: a worker holding them is preferred


@dataclass(frozen=True)
class Job:
    """One row of the jobs table."""

    id: str
    status: str
    priority: int
    created: float
    started: float | None
    finished: float | None
    template: str | None
    document: dict[str, Any]
    params: dict[str, Any]
    options: dict[str, Any]
    models: list[str]
    batch_id: str | None
    worker: str | None
    cancel_requested: bool
    error: dict[str, Any] | None
    result: str | None


@dataclass(frozen=True)
class Event:
    """One row of the events table: `id` is the SSE event id."""

    id: int
    job_id: str
    kind: str
    time: float
    data: dict[str, Any]


class JobQueue:
    """Jobs with priority then FIFO order, claimed atomically by workers, with their events; safe across threads
    (one connection per thread) and processes (SQLite's locking, with a busy timeout)."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connection().executescript(_SCHEMA)  # executescript commits on its own: no transaction around it

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                                 check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes, fast commits
            db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: the write lock up front, so two claimers never both read a job as pending."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def submit(self, jobs: Iterable[NewJob], ids: list[str] | None = None) -> list[str]:
        """Queue jobs (all or none, one batch id when several); their ids, in order. `ids` are given by a caller
        that records them elsewhere before a worker can claim the jobs (the ComfyUI endpoints)."""
        jobs = list(jobs)
        now = time.time()
        batch_id = uuid.uuid4().hex if len(jobs) > 1 else None
        ids = ids if ids is not None else [uuid.uuid4().hex for _ in jobs]
        with self._transaction() as db:
            for job_id, job in zip(ids, jobs, strict=True):
                db.execute("INSERT INTO jobs (id, status, priority, created, template, document, params, options, "
                           "models, batch_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (job_id, PENDING, job.priority, now, job.template, _dump(job.document), _dump(job.params),
                            _dump(job.options), _dump(list(job.models)), batch_id))
                _append(db, job_id, "job_queued", {"priority": job.priority, "batch_id": batch_id}, now)
        return ids

    def claim(self, worker: str, held: Iterable[str] = (), *, device: str | None = None) -> Job | None:
        """Take the next pending job (highest priority, then oldest; among those of the top priority, the oldest
        whose models are all in `held`, if any) and mark it running; None when nothing is pending. Its job_started
        event names the worker and, when given, the worker's device."""
        held = set(held)
        with self._transaction() as db:
            rows = db.execute("SELECT id, priority, models FROM jobs WHERE status = ? ORDER BY priority DESC, seq "
                              "LIMIT ?", (PENDING, _CLAIM_WINDOW)).fetchall()
            if not rows:
                return None
            top = [row for row in rows if row["priority"] == rows[0]["priority"]]
            warm = [row for row in top if held and set(json.loads(row["models"])) <= held]
            chosen = (warm or top)[0]["id"]
            now = time.time()
            db.execute("UPDATE jobs SET status = ?, started = ?, worker = ? WHERE id = ?",
                       (RUNNING, now, worker, chosen))
            _append(db, chosen, "job_started", {"worker": worker, **({"device": device} if device else {})}, now)
            return _load(db, chosen)

    def finish(self, job_id: str, status: str, *, error: dict[str, Any] | None = None, result: str | None = None,
               data: dict[str, Any] | None = None) -> None:
        """End a running job as completed, failed or cancelled, with its final event."""
        if status not in FINISHED_STATUSES:
            raise ValueError(f"a job finishes as one of {FINISHED_STATUSES}, not {status!r}")
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = ?, finished = ?, error = ?, result = ? WHERE id = ?",
                       (status, now, _dump(error) if error is not None else None, result, job_id))
            _append(db, job_id, FINAL_EVENTS[status], {**(data or {}), **({"error": error} if error else {})}, now)

    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> int:
        """Append one event; its id."""
        with self._transaction() as db:
            return _append(db, job_id, kind, data, time.time())

    def events(self, after: int = 0, job_id: str | None = None, limit: int = 500) -> list[Event]:
        """Events with ids above `after` (of one job, or all), oldest first."""
        query = "SELECT * FROM events WHERE id > ?" + (" AND job_id = ?" if job_id else "") + " ORDER BY id LIMIT ?"
        args = (after, job_id, limit) if job_id else (after, limit)
        return [Event(row["id"], row["job_id"], row["kind"], row["time"], json.loads(row["data"]))
                for row in self._connection().execute(query, args)]

    def last_event_id(self) -> int:
        """The id of the newest event (0 when there is none): a live stream that replays nothing starts there."""
        row = self._connection().execute("SELECT MAX(id) FROM events").fetchone()
        return int(row[0] or 0)

    def get(self, job_id: str) -> Job | None:
        return _load(self._connection(), job_id)

    def jobs(self, status: str | None = None, limit: int = 1000) -> list[Job]:
        """Jobs in queue order (priority, then FIFO) for pending ones, newest first for the rest."""
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        rows = self._connection().execute(
            f"SELECT * FROM jobs {where} ORDER BY status != 'running', status != 'pending', "
            "CASE WHEN status = 'pending' THEN -priority ELSE 0 END, "
            "CASE WHEN status = 'pending' THEN seq ELSE -seq END LIMIT ?", (*args, limit))
        return [_job(row) for row in rows]

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a pending job at once, or ask the worker running it to stop at its next step (that job only).
        The job as it is now; None when there is no such job."""
        with self._transaction() as db:
            status = _status(db, job_id)
            if status is None:
                return None
            if status == PENDING:
                now = time.time()
                db.execute("UPDATE jobs SET status = ?, finished = ? WHERE id = ?", (CANCELLED, now, job_id))
                _append(db, job_id, FINAL_EVENTS[CANCELLED], {"while": PENDING}, now)
            elif status == RUNNING:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                _append(db, job_id, "job_cancel_requested", {}, time.time())
            return _load(db, job_id)

    def status(self, job_id: str) -> str | None:
        """A job's status alone (None: no such job), for pollers that need nothing else of the row."""
        return _status(self._connection(), job_id)

    def cancel_requested(self, job_id: str) -> bool:
        row = self._connection().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def delete(self, job_id: str) -> str | None:
        """Delete a job that is not running, with its events; the status it had (None: no such job). A running
        job is left alone and its status returned: cancel it first."""
        with self._transaction() as db:
            status = _status(db, job_id)
            if status is None or status == RUNNING:
                return status
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            return status

    def clear_history(self) -> int:
        """Delete every finished job with its events; how many."""
        with self._transaction() as db:
            finished = [row[0] for row in db.execute(
                f"SELECT id FROM jobs WHERE status IN ({','.join('?' * len(FINISHED_STATUSES))})", FINISHED_STATUSES)]
            db.executemany("DELETE FROM events WHERE job_id = ?", [(job_id,) for job_id in finished])
            db.executemany("DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id in finished])
            return len(finished)

    def recover(self, *, requeue: bool = False) -> int:
        """At start: jobs a dead process left running become failed (or, with `requeue`, pending again); how many."""
        now = time.time()
        with self._transaction() as db:
            stranded = [row[0] for row in db.execute("SELECT id FROM jobs WHERE status = ?", (RUNNING,))]
            for job_id in stranded:
                if requeue:
                    db.execute("UPDATE jobs SET status = ?, started = NULL, worker = NULL, cancel_requested = 0 "
                               "WHERE id = ?", (PENDING, job_id))
                    _append(db, job_id, "job_queued", {"requeued": True}, now)
                else:
                    error = {"message": "the server stopped while the job ran (crash or kill); submit it again",
                             "errors": []}
                    db.execute("UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ?",
                               (FAILED, now, _dump(error), job_id))
                    _append(db, job_id, FINAL_EVENTS[FAILED], {"error": error}, now)
            return len(stranded)

    def counts(self) -> dict[str, int]:
        rows = self._connection().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        return {status: 0 for status in STATUSES} | {row[0]: row[1] for row in rows}

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _append(db: sqlite3.Connection, job_id: str, kind: str, data: dict[str, Any], now: float) -> int:
    cursor = db.execute("INSERT INTO events (job_id, kind, time, data) VALUES (?, ?, ?, ?)",
                        (job_id, kind, now, _dump(data)))
    return int(cursor.lastrowid or 0)


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def _status(db: sqlite3.Connection, job_id: str) -> str | None:
    row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return str(row[0]) if row is not None else None


def _load(db: sqlite3.Connection, job_id: str) -> Job | None:
    row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return _job(row) if row is not None else None


def _job(row: sqlite3.Row) -> Job:
    return Job(row["id"], row["status"], row["priority"], row["created"], row["started"], row["finished"],
               row["template"], json.loads(row["document"]), json.loads(row["params"]), json.loads(row["options"]),
               json.loads(row["models"]), row["batch_id"], row["worker"], bool(row["cancel_requested"]),
               json.loads(row["error"]) if row["error"] else None, row["result"])
