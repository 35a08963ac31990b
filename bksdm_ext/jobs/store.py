"""The job store: one SQLite file (WAL) holding every job's state, safe across threads and processes.

The store never loses a job: rows are only removed by an explicit delete. Creation is idempotent:
the same request id, or the same kind and config within a short window (a double click, a client
retry), returns the job already created instead of a second one.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from ..errors import BKSDMError

STATES = ("queued", "running", "cancelling", "cancelled", "done", "failed", "interrupted")
ACTIVE_STATES = ("running", "cancelling")
FINAL_STATES = ("cancelled", "done", "failed", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    folder TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    pid INTEGER,
    pid_started REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    request_key TEXT UNIQUE,
    config_hash TEXT NOT NULL,
    resume INTEGER NOT NULL DEFAULT 0,
    resumable INTEGER NOT NULL DEFAULT 0,
    cancel_requested REAL,
    terminate_sent REAL,
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_by_hash ON jobs (config_hash, created);
"""


class JobNotFound(BKSDMError):
    pass


@dataclass
class Job:
    id: str
    kind: str
    state: str
    folder: str
    created: float
    started: float | None
    finished: float | None
    pid: int | None
    pid_started: float | None
    attempts: int
    request_key: str | None
    config_hash: str
    resume: int
    resumable: int
    cancel_requested: float | None
    terminate_sent: float | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_COLUMNS = ", ".join(f.name for f in fields(Job))


def config_hash(kind: str, config: dict[str, Any]) -> str:
    canonical = json.dumps([kind, config], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class JobStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as error:
            raise BKSDMError(f"The job store {self.path} cannot be opened ({error}). Move it aside to start "
                             "a new one; the job folders beside it keep their configs and outputs.") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so check-then-insert is atomic across processes.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def create(self, job_id: str, kind: str, folder: str, config: dict[str, Any],
               request_id: str | None = None, dedupe_window_s: float = 30.0) -> tuple[Job, bool]:
        """Insert a queued job, or return the one this request already created: (job, created)."""
        digest = config_hash(kind, config)
        now = time.time()
        with self._transaction() as db:
            if request_id:
                row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE request_key = ?", (request_id,)).fetchone()
            else:
                row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE config_hash = ? AND created >= ? "
                                 "ORDER BY created DESC LIMIT 1", (digest, now - dedupe_window_s)).fetchone()
            if row:
                return Job(*row), False
            db.execute("INSERT INTO jobs (id, kind, state, folder, created, request_key, config_hash) "
                       "VALUES (?, ?, 'queued', ?, ?, ?, ?)", (job_id, kind, folder, now, request_id, digest))
            return Job(*db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()), True

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"There is no job {job_id!r}; the job list shows the ones that exist.")
        return Job(*row)

    def list(self, states: tuple[str, ...] = STATES) -> list[Job]:
        marks = ", ".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) "
                                    "ORDER BY created DESC, id DESC", states).fetchall()
        return [Job(*row) for row in rows]

    def update(self, job_id: str, expect: tuple[str, ...] | None = None, **values: Any) -> bool:
        """Set `values`; with `expect`, only if the job is in one of those states. True if it changed."""
        unknown = set(values) - {f.name for f in fields(Job)}
        if unknown:
            raise ValueError(f"unknown job columns {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in values)
        sql = f"UPDATE jobs SET {assignments} WHERE id = ?"
        params: list[Any] = [*values.values(), job_id]
        if expect:
            sql += f" AND state IN ({', '.join('?' * len(expect))})"
            params += list(expect)
        with self._lock:
            return self._db.execute(sql, params).rowcount == 1

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
