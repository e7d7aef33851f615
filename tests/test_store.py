"""The store against a real SQLite file: transactions that roll back whole."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from hearth_gateway.crypto import Sealer
from hearth_gateway.store import AuditEntry, DeviceRecord, JournalEntry, Store

CLIENT = "dev-1"
TOPIC = f"hearth/v1/reply/{CLIENT}"


def _store(tmp_path: Path) -> Store:
    return Store(tmp_path / "db.sqlite3", Sealer(os.urandom(32)))


def _entry(job_id: str, request: bytes = b"request", topic: str = TOPIC) -> JournalEntry:
    return JournalEntry(CLIENT, job_id, request, topic, b"corr-" + job_id.encode())


def _device(serial: str, device_id: str = "cam-1") -> DeviceRecord:
    return DeviceRecord(serial, device_id, "f" * 64, "k" * 64, time.time())


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


def test_any_exception_in_a_transaction_rolls_back_all_its_writes(tmp_path: Path) -> None:
    store = _store(tmp_path)

    def fails_halfway() -> None:
        with store.transaction():
            store.accept(_entry("j1"), AuditEntry(CLIENT, "job", "j1", "allowed", "here"))
            store.audit("admin", "pair_code", "", "allowed", "valid 300 s")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fails_halfway()
    assert store.unfinished() == []
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
    store.close()
