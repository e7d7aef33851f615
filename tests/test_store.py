"""The store against a real SQLite file: transactions that roll back whole, a journal and an
audit table bounded by bytes and time (measured on disk with SQLite's dbstat), large answers not
kept, and databases written by an older version."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest

from hearth_gateway.crypto import Sealer
from hearth_gateway.policy import LimitsPolicy
from hearth_gateway.store import (
    CONFLICT,
    AuditEntry,
    DeviceRecord,
    JournalEntry,
    Receipt,
    Store,
)

KiB = 1024
MiB = 1024 * KiB
CLIENT = "dev-1"
TOPIC = f"hearth/v1/reply/{CLIENT}"


def _store(tmp_path: Path, **limits: float) -> Store:
    return Store(tmp_path / "db.sqlite3", Sealer(os.urandom(32)), LimitsPolicy(**limits))  # type: ignore[arg-type]


def _entry(
    job_id: str, request: bytes = b"request", topic: str = TOPIC, digest: bytes = b""
) -> JournalEntry:
    return JournalEntry(CLIENT, job_id, request, topic, b"corr-" + job_id.encode(), digest)


def _device(serial: str, device_id: str = "cam-1") -> DeviceRecord:
    return DeviceRecord(serial, device_id, "f" * 64, "k" * 64, time.time())


def _on_disk(path: Path) -> dict[str, int]:
    """Bytes of pages each table takes (its indexes with it), from SQLite's dbstat."""
    conn = sqlite3.connect(path)
    try:
        tables = dict(conn.execute("SELECT name, tbl_name FROM sqlite_schema WHERE rootpage > 0"))
        sizes: dict[str, int] = {}
        for name, size in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            table = tables.get(name, name)
            sizes[table] = sizes.get(table, 0) + int(size)
        return sizes
    finally:
        conn.close()


# -- transactions ------------------------------------------------------------------------------


def test_a_failed_statement_is_rolled_back_and_the_next_accept_works(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.add_device(_device("01"))
    # Pairing again with a serial already used: the INSERT fails after the UPDATE that
    # revoked the earlier certificate has run, inside the same transaction.
    with pytest.raises(sqlite3.IntegrityError):
        store.add_device(_device("01"), supersede=True)
    assert [d.revoked_at for d in store.devices()] == [None]  # the UPDATE was rolled back
    assert store.accept(_entry("after")) is None  # no "transaction within a transaction"
    assert [e.job_id for e in store.unfinished()] == ["after"]
    store.close()


def test_a_task_inbox_write_failing_halfway_leaves_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    rows: list[tuple[str, str, bytes]] = [("t1", "home/a", b"one"), ("t2", ["bad"], b"two")]  # type: ignore[list-item]
    with pytest.raises(sqlite3.Error):
        store.add_inbox_many(rows)
    assert store.inbox() == []  # the first row went with the second
    assert store.add_inbox_many([("t1", "home/a", b"one")]) == [1]
    store.delete_task("t1")
    assert store.inbox() == []
    assert store.accept(_entry("j")) is None
    store.close()


def test_any_exception_in_a_transaction_rolls_back_its_writes_and_totals(tmp_path: Path) -> None:
    store = _store(tmp_path)
    before = store.stats()

    def fails_halfway() -> None:
        with store.transaction():
            store.accept(_entry("j1"), AuditEntry(CLIENT, "job", "j1", "allowed", "here"))
            store.audit("admin", "pair_code", "", "allowed", "valid 300 s")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fails_halfway()
    assert store.unfinished() == []
    assert store.stats() == before
    assert store.accept(_entry("j1")) is None  # the job id is new: nothing was kept
    store.close()


def test_a_nested_transaction_is_a_savepoint_of_the_outer_one(tmp_path: Path) -> None:
    store = _store(tmp_path)

    def inner() -> None:
        with store.transaction():
            store.accept(_entry("dropped"))
            raise ValueError

    with store.transaction():
        store.accept(_entry("kept"))
        with pytest.raises(ValueError):
            inner()
        store.accept(_entry("kept-too"))
    assert sorted(e.job_id for e in store.unfinished()) == ["kept", "kept-too"]
    assert store.stats().waiting == 2
    store.close()


# -- the journal's bounds ----------------------------------------------------------------------


def test_answers_past_journal_bytes_go_oldest_first_and_waiting_jobs_stay(tmp_path: Path) -> None:
    bound = 256 * KiB
    store = _store(tmp_path, journal_bytes=bound)
    store.accept(_entry("waiting", os.urandom(64 * KiB)))  # never answered
    answer = os.urandom(4 * KiB)
    for i in range(400):  # about 1.7 MB of answers
        store.accept(_entry(f"job-{i}", os.urandom(2 * KiB)))
        store.finish(CLIENT, f"job-{i}", answer)
        assert store.stats().journal_bytes <= bound
    stats = store.stats()
    assert stats.evicted > 300
    assert stats.answers == 400 - stats.evicted
    assert [e.job_id for e in store.unfinished()] == ["waiting"]
    assert store.accept(_entry("job-399")) == ("done", answer)  # the newest are kept
    assert store.accept(_entry("job-0")) is None  # the oldest went: the id is new again
    store.close()
    on_disk = _on_disk(tmp_path / "db.sqlite3")
    assert on_disk["jobs"] <= bound, on_disk


def test_answers_over_journal_inline_bytes_are_not_kept_and_the_id_runs_again(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path, journal_inline_bytes=64 * KiB)
    small, large = b"small answer", os.urandom(MiB)
    store.accept(_entry("small"))
    store.finish(CLIENT, "small", small)
    store.accept(_entry("large", os.urandom(MiB)))
    assert store.stats().journal_bytes > MiB  # its stdin, until it is answered
    store.finish(CLIENT, "large", large)
    stats = store.stats()
    assert (stats.waiting, stats.answers, stats.unkept) == (0, 1, 1)
    assert stats.journal_bytes < 4 * KiB  # neither the stdin nor the megabyte answer
    assert store.accept(_entry("small")) == ("done", small)
    # Sent again: new, with the new request's stdin and topic.
    assert store.accept(_entry("large", b"stdin again", f"{TOPIC}/2")) is None
    [again] = store.unfinished()
    assert (again.request, again.response_topic) == (b"stdin again", f"{TOPIC}/2")
    store.close()


def test_a_large_request_waits_in_a_sealed_file_of_its_own(tmp_path: Path) -> None:
    sealer = Sealer(os.urandom(32))
    store = Store(tmp_path / "db.sqlite3", sealer)
    stdin = os.urandom(MiB)
    for job_id in ("answered", "refused", "waiting"):
        store.accept(_entry(job_id, stdin))
    spool = tmp_path / "requests"
    assert len(list(spool.iterdir())) == 3
    assert all(stdin not in f.read_bytes() for f in spool.iterdir())  # sealed
    assert store.stats().journal_bytes > 3 * MiB
    store.finish(CLIENT, "answered", b"small answer")
    store.forget(CLIENT, "refused")
    assert len(list(spool.iterdir())) == 1
    store.close()  # as if killed: the waiting job's request must come back
    (spool / ("0" * 40)).write_bytes(b"left by a crash before its row was committed")
    store = Store(tmp_path / "db.sqlite3", sealer)
    assert [(e.job_id, e.request) for e in store.unfinished()] == [("waiting", stdin)]
    assert len(list(spool.iterdir())) == 1  # the stray file was swept
    store.finish(CLIENT, "waiting", b"done")
    assert list(spool.iterdir()) == []
    assert store.stats().journal_bytes < 4 * KiB
    store.close()


def test_a_request_whose_file_did_not_survive_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path)
    store.accept(_entry("lost", os.urandom(MiB)))
    store.accept(_entry("kept"))
    for file in (tmp_path / "requests").iterdir():
        file.write_bytes(file.read_bytes()[:1000])  # a power cut: the file was cut short
    with caplog.at_level(logging.WARNING, logger="hearth_gateway.store"):
        assert [e.job_id for e in store.unfinished()] == ["kept"]
    assert "job lost of dev-1: its request is lost" in caplog.text
    assert store.accept(_entry("lost")) is None  # the id is new again
    store.close()


def test_expired_answers_go_and_the_file_gives_their_pages_back(tmp_path: Path) -> None:
    store = _store(tmp_path, journal_inline_bytes=2 * MiB, answer_retention_s=0.2)
    for i in range(40):
        store.accept(_entry(f"job-{i}"))
        store.finish(CLIENT, f"job-{i}", os.urandom(MiB))
    full = store.stats().file_bytes
    assert full > 40 * MiB
    time.sleep(0.3)
    assert store.expire() == (40, 0)
    stats = store.stats()
    assert stats.answers == 0
    assert stats.journal_bytes == 0
    assert (tmp_path / "db.sqlite3").stat().st_size < 16 * MiB  # free pages went back
    store.close()


# -- the audit table's bounds ------------------------------------------------------------------


def test_audit_rows_past_audit_bytes_go_oldest_first(tmp_path: Path) -> None:
    bound = 512 * KiB
    store = _store(tmp_path, audit_bytes=bound)
    for i in range(12_000):
        store.audit(CLIENT, "blob", f"{i:064x}", "refused", "hash mismatch on upload")
        assert store.stats().audit_bytes <= bound
    stats = store.stats()
    assert 2000 < stats.audit_rows < 4000
    store.close()
    conn = sqlite3.connect(tmp_path / "db.sqlite3")
    targets = [int(t, 16) for (t,) in conn.execute("SELECT target FROM audit ORDER BY id")]
    conn.close()
    assert targets == list(range(12_000 - stats.audit_rows, 12_000))  # the newest, in order
    assert _on_disk(tmp_path / "db.sqlite3")["audit"] <= bound


def test_audit_rows_older_than_audit_retention_go(tmp_path: Path) -> None:
    store = _store(tmp_path, audit_retention_s=0.3)
    for _ in range(50):
        store.audit("admin", "device_revoke", "cam-1", "allowed", "revoked by the owner")
    time.sleep(0.4)
    store.accept(_entry("j"), AuditEntry(CLIENT, "job", "job j", "allowed", "private: here"))
    assert store.expire() == (0, 50)
    assert store.stats().audit_rows == 1
    store.close()


# -- older databases ---------------------------------------------------------------------------


def test_a_database_from_before_the_bounds_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    sealer = Sealer(os.urandom(32))
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE jobs (client_id TEXT, job_id TEXT, state TEXT, request BLOB,
            response_topic TEXT, correlation BLOB, reply BLOB, accepted_at FLOAT,
            finished_at FLOAT, PRIMARY KEY (client_id, job_id));
        CREATE INDEX idx_jobs_state ON jobs (state);
        CREATE TABLE audit (id INTEGER PRIMARY KEY, at FLOAT, actor TEXT, action TEXT,
            target TEXT, decision TEXT, reason TEXT);
        """
    )
    reply = sealer.seal(b"old answer", b"jobs.reply/dev-1/old")
    conn.execute(
        "INSERT INTO jobs VALUES ('dev-1', 'old', 'done', NULL, '', x'', ?, 1, ?)",
        (reply, time.time()),
    )
    conn.execute("INSERT INTO audit VALUES (1, 1, 'dev-1', 'job', 'job old', 'allowed', '')")
    conn.commit()
    conn.close()
    store = Store(path, sealer)
    stats = store.stats()
    assert (stats.answers, stats.audit_rows) == (1, 1)
    assert stats.journal_bytes > len(reply)
    assert stats.audit_bytes > 0
    assert store.accept(_entry("old")) == ("done", b"old answer")
    # Its row has no digest (written before them): any content matches it, as before.
    assert store.accept(_entry("old", digest=b"d" * 32)) == ("done", b"old answer")
    store.accept(_entry("new"))
    store.finish(CLIENT, "new", b"new answer")
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental, from now on
    conn.close()


# -- one write per quick job (accept_later, finish(batch=True), flush) -------------------------


def _rows(store_path: Path) -> list[tuple[str, str, bool]]:
    """(job id, state, whether a request is stored) of every row, read from the file."""
    conn = sqlite3.connect(store_path)
    try:
        rows = conn.execute("SELECT job_id, state, request IS NOT NULL FROM jobs ORDER BY job_id")
        return [(str(j), str(s), bool(r)) for j, s, r in rows]
    finally:
        conn.close()


def test_a_job_answered_within_its_delay_is_written_once_answered(tmp_path: Path) -> None:
    store = _store(tmp_path)
    receipt = store.accept_later(_entry("quick"), AuditEntry(CLIENT, "job", "q", "allowed", ""), 60)
    assert not isinstance(receipt, tuple)
    assert store.accept_later(_entry("quick"), None, 60) == ("accepted", None)  # held: known
    store.flush()
    assert _rows(tmp_path / "db.sqlite3") == []  # not due, not answered: nothing written yet
    assert not receipt.durable  # so its request is not acknowledged yet
    store.finish(CLIENT, "quick", b"answer", batch=True)
    assert not receipt.durable
    store.flush()
    assert receipt.durable
    assert _rows(tmp_path / "db.sqlite3") == [("quick", "done", False)]  # one row, no request
    assert store.accept_later(_entry("quick"), None, 60) == ("done", b"answer")
    assert store.stats().audit_rows == 1
    store.close()


def test_a_held_row_past_its_delay_is_written_as_accepted_and_survives(tmp_path: Path) -> None:
    store = _store(tmp_path)
    receipt = store.accept_later(_entry("slow", b"stdin"), None, 0.0)
    assert not isinstance(receipt, tuple)
    store.flush()
    assert receipt.durable
    assert _rows(tmp_path / "db.sqlite3") == [("slow", "accepted", True)]
    store.close()
    reopened = _store_with_same_key(tmp_path, store)
    assert [(e.job_id, e.request) for e in reopened.unfinished()] == [("slow", b"stdin")]
    reopened.finish(CLIENT, "slow", b"answer", batch=True)
    reopened.flush()
    assert _rows(tmp_path / "db.sqlite3") == [("slow", "done", False)]
    reopened.close()


def test_a_job_sent_again_after_its_answer_went_out_and_before_the_commit_gets_the_answer(
    tmp_path: Path,
) -> None:
    """The daemon publishes an answer before the commit that writes it (grouped under load):
    a re-send in between must get that answer, not "still running" (which sends nothing)."""
    store = _store(tmp_path)
    # Answered within its delay: its row, held, has the answer.
    assert not isinstance(store.accept_later(_entry("quick"), None, 60), tuple)
    store.finish(CLIENT, "quick", b"quick answer", batch=True)
    assert store.accept_later(_entry("quick"), None, 60) == ("done", b"quick answer")
    # Accepted and written earlier: its answer waits in the batch for the next flush.
    assert not isinstance(store.accept_later(_entry("slow"), None, 0.0), tuple)
    store.flush()
    assert _rows(tmp_path / "db.sqlite3") == [("quick", "done", False), ("slow", "accepted", True)]
    store.finish(CLIENT, "slow", b"slow answer", batch=True)
    assert store.accept_later(_entry("slow"), None, 60) == ("done", b"slow answer")
    store.flush()
    assert _rows(tmp_path / "db.sqlite3") == [("quick", "done", False), ("slow", "done", False)]
    assert store.accept_later(_entry("slow"), None, 60) == ("done", b"slow answer")
    store.close()


def _store_with_same_key(tmp_path: Path, store: Store) -> Store:
    return Store(tmp_path / "db.sqlite3", store._sealer, LimitsPolicy())


def test_a_large_request_answered_within_its_delay_is_never_written(tmp_path: Path) -> None:
    store = _store(tmp_path, journal_inline_bytes=64 * KiB)
    receipt = store.accept_later(_entry("frame", os.urandom(MiB)), None, 60)
    assert not isinstance(receipt, tuple)
    store.finish(CLIENT, "frame", os.urandom(MiB), batch=True)  # too large to keep
    assert receipt.durable  # nothing about it is left to write
    store.flush()
    assert _rows(tmp_path / "db.sqlite3") == []
    spool = tmp_path / "requests"
    assert not spool.exists() or list(spool.iterdir()) == []  # no spooled request either
    assert store.stats().unkept == 1
    assert isinstance(store.accept_later(_entry("frame"), None, 60), Receipt)  # runs again
    store.close()


def test_closing_writes_what_is_held(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.accept_later(_entry("running"), None, 60)
    store.accept_later(_entry("answered"), None, 60)
    store.finish(CLIENT, "answered", b"answer", batch=True)
    store.close()
    assert _rows(tmp_path / "db.sqlite3") == [
        ("answered", "done", False),
        ("running", "accepted", True),
    ]


# -- a job id re-used for other content (the digest) ------------------------------------------

A, B = b"a" * 32, b"b" * 32  # two jobs' content digests


def test_a_journaled_job_id_with_other_content_is_a_conflict(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.accept(_entry("j", digest=A)) is None
    assert store.accept(_entry("j", digest=B)) == (CONFLICT, None)  # waiting
    assert store.accept(_entry("j", digest=A)) == ("accepted", None)
    store.finish(CLIENT, "j", b"answer")
    assert store.accept(_entry("j", digest=B)) == (CONFLICT, None)  # answered
    assert store.accept(_entry("j", digest=A)) == ("done", b"answer")
    store.close()
    reopened = _store_with_same_key(tmp_path, store)  # the digest is in the row, not in memory
    assert reopened.accept(_entry("j", digest=B)) == (CONFLICT, None)
    assert reopened.accept(_entry("j", digest=A)) == ("done", b"answer")
    reopened.close()


def test_held_and_late_written_rows_keep_their_digest(tmp_path: Path) -> None:
    store = _store(tmp_path)
    quick = store.accept_later(_entry("quick", digest=A), None, 60)
    slow = store.accept_later(_entry("slow", digest=A), None, 0.0)
    assert isinstance(quick, Receipt)
    assert isinstance(slow, Receipt)
    # Held in memory, not written yet: still a conflict.
    assert store.accept_later(_entry("quick", digest=B), None, 60) == (CONFLICT, None)
    assert store.accept_later(_entry("quick", digest=A), None, 60) == ("accepted", None)
    store.finish(CLIENT, "quick", b"answer", batch=True)
    store.flush()  # quick: one row, answered; slow: past its delay, written as accepted
    assert (quick.durable, slow.durable) == (True, True)
    for job_id in ("quick", "slow"):
        assert store.accept_later(_entry(job_id, digest=B), None, 60) == (CONFLICT, None)
    assert store.accept_later(_entry("quick", digest=A), None, 60) == ("done", b"answer")
    store.finish(CLIENT, "slow", b"late answer", batch=True)
    store.flush()
    assert store.accept_later(_entry("slow", digest=B), None, 60) == (CONFLICT, None)
    assert store.accept_later(_entry("slow", digest=A), None, 60) == ("done", b"late answer")
    store.close()
