"""The timing store: one SQLite table of generation records, safe for many writing processes.

WAL mode lets readers and one writer work at once; `busy_timeout` plus a retry loop make concurrent
writers (WebUI workers, a benchmark) wait their turn instead of losing rows. A file that is not a
readable database is moved aside with a timestamp and a fresh one is created, so a damaged file
never stops a generation; the rows still readable in it are copied into the new one (the log says how many).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, get_type_hints

from ..errors import BKSDMError
from ..io import write_file

log = logging.getLogger(__name__)

TABLE = "generations"
BUSY_TIMEOUT_MS = 30_000
RETRIES = 20  # on top of busy_timeout: each retry waits a little longer


def default_path() -> Path:
    """Where the command line keeps records: $BKSDM_TIMINGS_DB, else timings.sqlite3 in $BKSDM_DATA_DIR
    or ~/.bksdm (the same on Windows)."""
    if os.environ.get("BKSDM_TIMINGS_DB"):
        return Path(os.environ["BKSDM_TIMINGS_DB"])
    return Path(os.environ.get("BKSDM_DATA_DIR") or Path.home() / ".bksdm") / "timings.sqlite3"


def now_iso() -> str:
    """UTC time with microseconds; sorts as text in time order."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_record_id() -> str:
    return uuid.uuid4().hex


@dataclass
class GenerationRecord:
    """What one generation (one WebUI call or one benchmark image) took, and on what."""

    # what ran
    checkpoint: str
    sampler: str
    steps: int
    width: int
    height: int
    total_s: float
    sampling_s: float
    unet_calls: int
    source: str = "webui"  # "webui", "bench", "webui-bench"
    run_id: str = ""
    checkpoint_hash: str = ""
    layout: str = "sd"  # "sd" for a standard model, else the BK layout name (base/small/tiny)
    version: str = ""  # v1, v2-base, v2-768 when known
    schedule: str = ""
    mode: str = "txt2img"
    batch_size: int = 1
    n_iter: int = 1
    cfg_scale: float = 7.0
    seed: int = -1
    hires: bool = False
    denoising_strength: float | None = None
    # how long
    vae_decode_s: float | None = None
    unet_median_ms: float | None = None
    unet_p90_ms: float | None = None
    it_per_s: float | None = None  # U-Net evaluations per second of sampling
    peak_memory_mb: float | None = None
    # where
    device: str = ""
    driver: str = ""
    cuda: str = ""
    torch_version: str = ""
    xformers_version: str = ""
    attention: str = ""
    precision: str = ""
    webui_version: str = ""
    jetson_board: str = ""
    l4t: str = ""
    power_mode: str = ""
    jetson_clocks: str = ""
    time: str = field(default_factory=now_iso)
    record_id: str = field(default_factory=new_record_id)

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def seconds_per_image(self) -> float:
        return self.total_s / max(self.images, 1)


FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRecord))
_TYPES = get_type_hints(GenerationRecord)
_SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL", bool: "INTEGER"}


def _base_type(name: str) -> type:
    hint = _TYPES[name]
    return next(t for t in getattr(hint, "__args__", (hint,)) if t is not type(None))


def _create_sql() -> str:
    columns = [f"{name} {_SQL_TYPES[_base_type(name)]}" + (" PRIMARY KEY" if name == "record_id" else "")
               for name in FIELDS]
    return f"CREATE TABLE IF NOT EXISTS {TABLE} ({', '.join(columns)})"


def _row_to_record(row: Iterable) -> GenerationRecord:
    values = dict(zip(FIELDS, row))
    for name in FIELDS:
        if _base_type(name) is bool and values[name] is not None:
            values[name] = bool(values[name])
    return GenerationRecord(**values)


def _parse(name: str, text: str):
    """A CSV cell back to the field's type; empty means None for optional fields."""
    kind = _base_type(name)
    if text == "" and kind is not str:
        return None
    if kind is bool:
        return text.strip().lower() in ("1", "true", "yes")
    return kind(text)


class TimingStore:
    """The records of one SQLite file: one connection, usable from several threads of one process."""

    def __init__(self, path: str | os.PathLike, keep: int | None = None):
        self.path = Path(path)
        self.keep = keep  # retention: the newest `keep` records survive each insert
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # one transaction at a time on the shared connection
        self._db = self._open()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                             check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return db

    def _open(self) -> sqlite3.Connection:
        try:
            return self._prepare(self._connect())
        except sqlite3.DatabaseError as error:
            if _is_busy(error):
                raise
            try:  # another process may have replaced the damaged file meanwhile
                return self._prepare(self._connect())
            except sqlite3.DatabaseError:
                pass
            aside = self._move_aside(error)
            db = self._prepare(self._connect())
            if aside is not None:
                self._salvage(aside, db)
            return db

    def _prepare(self, db: sqlite3.Connection) -> sqlite3.Connection:
        try:
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            _retry(lambda: db.execute("PRAGMA journal_mode = WAL"))
            db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across app crashes
            _retry(lambda: db.execute(_create_sql()))
            _retry(lambda: db.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE}(time)"))
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, error: Exception) -> Path | None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:  # another process moved it first
            return None
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, aside.with_name(aside.name + suffix))
        log.warning("Timing database %s was unreadable (%s); moved it to %s and started a new one.",
                    self.path, error, aside)
        return aside

    def _salvage(self, aside: Path, db: sqlite3.Connection) -> int:
        """Copy the rows still readable in a damaged file into the new one; says how many.

        A damaged page ends a scan, so the table is read from both ends: the rows before the damage
        and those after it.
        """
        found: dict[str, tuple] = {}  # by record_id
        columns, key = ", ".join(FIELDS), FIELDS.index("record_id")
        try:
            damaged = sqlite3.connect(f"file:{aside}?mode=ro", uri=True)
        except sqlite3.Error:
            damaged = None
        if damaged is not None:
            try:
                for order in ("ASC", "DESC"):
                    try:
                        for row in damaged.execute(f"SELECT {columns} FROM {TABLE} ORDER BY rowid {order}"):
                            found.setdefault(row[key], row)
                    except sqlite3.Error:
                        continue  # the scan reached the damage: the other direction reads on from the far end
            finally:
                damaged.close()
        if found:
            sql = f"INSERT OR IGNORE INTO {TABLE} ({columns}) VALUES ({', '.join('?' * len(FIELDS))})"
            _retry(lambda: db.executemany(sql, list(found.values())))
        log.warning("Recovered %d readable record(s) from %s into the new timing database %s.", len(found), aside,
                    self.path)
        return len(found)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> TimingStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, record: GenerationRecord) -> None:
        self.add_many([record])

    def add_many(self, records: Iterable[GenerationRecord]) -> int:
        """Insert records (ones whose record_id is already stored are skipped); returns how many were new."""
        rows = [tuple(getattr(r, name) for name in FIELDS) for r in records]
        if not rows:
            return 0
        sql = f"INSERT OR IGNORE INTO {TABLE} ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"

        def write() -> int:
            db = self._db
            db.execute("BEGIN IMMEDIATE")  # take the write lock up front: no read-to-write upgrade deadlock
            try:
                before = db.total_changes
                db.executemany(sql, rows)
                added = db.total_changes - before
                if self.keep is not None:
                    db.execute(f"DELETE FROM {TABLE} WHERE record_id NOT IN "
                               f"(SELECT record_id FROM {TABLE} ORDER BY time DESC LIMIT ?)", (self.keep,))
                db.execute("COMMIT")
                return added
            except BaseException:
                db.execute("ROLLBACK")
                raise

        with self._lock:
            return _retry(write)

    def records(self, where: str = "", params: tuple = ()) -> list[GenerationRecord]:
        """Records oldest first; `where` is an SQL condition over the field names."""
        sql = f"SELECT {', '.join(FIELDS)} FROM {TABLE}" + (f" WHERE {where}" if where else "") + " ORDER BY time"
        with self._lock:
            rows = _retry(lambda: self._db.execute(sql, params).fetchall())
        return [_row_to_record(row) for row in rows]

    def count(self) -> int:
        with self._lock:
            return _retry(lambda: self._db.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])

    def export_csv(self, path: str | os.PathLike) -> int:
        """Write every record to a CSV file (atomically); returns the number of rows."""
        path = Path(path)
        records = self.records()

        def write(handle):
            writer = csv.writer(handle)
            writer.writerow(FIELDS)
            for record in records:
                writer.writerow(["" if v is None else v for v in dataclasses.astuple(record)])

        write_file(path, write, "w", "utf-8", newline="")
        return len(records)

    def import_csv(self, path: str | os.PathLike) -> int:
        """Add the records of a CSV written by `export_csv`; ones already stored are skipped.

        Returns how many were new."""
        path = Path(path)
        try:
            handle = open(path, newline="", encoding="utf-8")
        except OSError as error:
            raise BKSDMError(f"Cannot read {path}: {error.strerror}. Give the path of a CSV from "
                             "`bksdm timings export`.") from error
        with handle:
            reader = csv.DictReader(handle)
            missing = [name for name in ("record_id", "checkpoint", "total_s") if name not in (reader.fieldnames or [])]
            if missing:
                raise BKSDMError(f"{path} is not a timings CSV (no column {', '.join(missing)}). "
                                 "Export one with `bksdm timings export FILE.csv`.")
            known = set(FIELDS)
            records = []
            for line, row in enumerate(reader, start=2):
                try:
                    records.append(GenerationRecord(**{k: _parse(k, v) for k, v in row.items() if k in known}))
                except (TypeError, ValueError) as error:
                    raise BKSDMError(f"{path}, line {line}: {error}. Fix or remove that line.") from error
        return self.add_many(records)


def _is_busy(error: sqlite3.Error) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


def _retry(action):
    """Run `action`, retrying while another process holds the database (beyond busy_timeout)."""
    for attempt in range(RETRIES):
        try:
            return action()
        except sqlite3.OperationalError as error:
            if not _is_busy(error) or attempt == RETRIES - 1:
                raise
            time.sleep(min(0.05 * 2 ** attempt, 2.0))
