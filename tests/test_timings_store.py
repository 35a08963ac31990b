"""The timing store: no lost rows under concurrent writers, corruption recovery, retention, CSV round trip."""

import multiprocessing
import sqlite3
import time

import pytest

from bksdm_ext.errors import BKSDMError
from bksdm_ext.timings.store import FIELDS, GenerationRecord, TimingStore


def make_record(i: int = 0, **fields) -> GenerationRecord:
    values = dict(checkpoint=f"ckpt-{i % 3}", sampler="DPM++ 2M", steps=20, width=512, height=512,
                  total_s=1.0 + i / 1000, sampling_s=0.8, unet_calls=20, vae_decode_s=0.1, unet_median_ms=35.5,
                  unet_p90_ms=41.25, it_per_s=25.0, device="CPU: test", seed=1234 + i)
    values.update(fields)
    return GenerationRecord(**values)


def _insert_many(path, worker, count, start_event):
    start_event.wait()
    with TimingStore(path) as store:
        for i in range(count):
            store.add(make_record(i, run_id=f"worker-{worker}"))


@pytest.mark.slow
def test_sixteen_processes_inserting_concurrently_lose_no_row(tmp_path):
    path = tmp_path / "timings.sqlite3"
    TimingStore(path).close()
    start = multiprocessing.Event()
    workers = [multiprocessing.Process(target=_insert_many, args=(path, w, 1000, start)) for w in range(16)]
    for process in workers:
        process.start()
    began = time.perf_counter()
    start.set()
    for process in workers:
        process.join(timeout=300)
    elapsed = time.perf_counter() - began
    assert [p.exitcode for p in workers] == [0] * 16
    with TimingStore(path) as store:
        assert store.count() == 16_000
        per_worker = store._db.execute("SELECT run_id, COUNT(*) FROM generations GROUP BY run_id").fetchall()
    assert sorted(per_worker) == sorted((f"worker-{w}", 1000) for w in range(16))
    print(f"16 x 1000 inserts in {elapsed:.1f} s")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_records_round_trip_with_types(tmp_path):
    record = make_record(7, hires=True, denoising_strength=0.8, peak_memory_mb=None, layout="small")
    with TimingStore(tmp_path / "t.sqlite3") as store:
        store.add(record)
        store.add(record)  # the same record id again: ignored
        assert store.records() == [record]
        assert store.records("layout = ?", ("small",)) == [record]
        assert store.records("layout = ?", ("tiny",)) == []


def test_corrupted_file_is_moved_aside_and_a_new_store_works(tmp_path, caplog):
    path = tmp_path / "timings.sqlite3"
    with TimingStore(path) as store:
        store.add(make_record(1))
    garbage = b"this is not an SQLite database" * 100
    path.write_bytes(garbage)
    with caplog.at_level("WARNING"):
        store = TimingStore(path)
    aside = list(tmp_path.glob("timings.sqlite3.corrupt-*"))
    assert [p.read_bytes() for p in aside if not p.name.endswith(("-wal", "-shm"))] == [garbage]
    assert "moved it to" in caplog.text and str(aside[0].name) in caplog.text
    assert store.count() == 0
    store.add(make_record(2))
    assert store.count() == 1
    store.close()


def test_damaged_pages_are_detected_and_the_readable_rows_salvaged(tmp_path, caplog):
    path = tmp_path / "timings.sqlite3"
    records = [make_record(i) for i in range(4000)]
    with TimingStore(path) as store:
        store.add_many(records)
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    middle = len(data) // 4096 // 2
    data[4096 * middle:4096 * (middle + 1)] = b"\xff" * 4096  # overwrite a whole page in the middle of the table
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"), TimingStore(path) as store:
        kept = store.records()
    assert len([p for p in tmp_path.glob("timings.sqlite3.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]) == 1
    by_id = {r.record_id: r for r in records}
    assert 2000 < len(kept) < 4000 and all(by_id[r.record_id] == r for r in kept)
    assert f"Recovered {len(kept)} readable record(s)" in caplog.text


def test_retention_keeps_the_newest_records(tmp_path):
    with TimingStore(tmp_path / "t.sqlite3", keep=5) as store:
        records = [make_record(i, time=f"2026-01-01T00:00:{i:02d}.000000Z") for i in range(12)]
        for record in records:
            store.add(record)
        assert store.records() == records[-5:]


def test_csv_export_then_import_twice_adds_each_record_once(tmp_path):
    records = [make_record(i, hires=i % 2 == 0, denoising_strength=None if i % 2 else 0.5,
                           peak_memory_mb=1234.5 if i == 3 else None, checkpoint="name, with \"quotes\"")
               for i in range(6)]
    with TimingStore(tmp_path / "a.sqlite3") as source:
        source.add_many(records)
        assert source.export_csv(tmp_path / "out.csv") == 6
    header = (tmp_path / "out.csv").read_text().splitlines()[0]
    assert header.split(",") == list(FIELDS)
    with TimingStore(tmp_path / "b.sqlite3") as target:
        target.add(make_record(99))
        assert target.import_csv(tmp_path / "out.csv") == 6
        assert target.import_csv(tmp_path / "out.csv") == 0
        assert target.count() == 7
        imported = {r.record_id: r for r in target.records()}
    assert [imported[r.record_id] for r in records] == records


def test_import_of_a_file_that_is_not_a_timings_csv_says_so(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with TimingStore(tmp_path / "t.sqlite3") as store:
        with pytest.raises(BKSDMError, match="not a timings CSV"):
            store.import_csv(tmp_path / "other.csv")
        with pytest.raises(BKSDMError, match="Cannot read"):
            store.import_csv(tmp_path / "missing.csv")


def test_one_store_shared_by_threads_loses_no_row(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with TimingStore(tmp_path / "t.sqlite3") as store:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: (store.add(make_record(i)), store.records("seed = ?", (1234 + i,))), range(400)))
        assert store.count() == 400
