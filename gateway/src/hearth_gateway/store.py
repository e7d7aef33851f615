"""Gateway state in SQLite (WAL): the job journal with stored answers, and the blob index
(with each blob's data label).

Durability does not rest on the broker: a job is journaled when accepted, its answer is stored
before it is published, and a job id seen again is answered from here instead of running twice.
Accepted jobs that were never answered (the gateway died) are run again on start: jobs have no
side effects outside their sandbox, so a re-run is safe, and the device gets its answer.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import sqlite_utils

from hearth.protocol import DataClass
from hearth_gateway.crypto import Sealer

__all__ = ["AuditEntry", "DeviceRecord", "JournalEntry", "Store"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One certificate issued to a paired device."""

    serial: str  # hex
    device_id: str
    fingerprint: str
    key_fingerprint: str
    paired_at: float
    revoked_at: float | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    client_id: str
    job_id: str
    request: bytes
    response_topic: str
    correlation: bytes


class AuditEntry(NamedTuple):
    """One row of the audit table, less its time."""

    actor: str  # device or task that asked
    action: str
    target: str
    decision: str  # allowed | refused
    reason: str


class Store:
    """One SQLite connection behind a lock: writes are short and few per job. Statements that
    must stand or fall together run in ``transaction()``."""

    def __init__(self, path: Path, sealer: Sealer) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Payloads, answers and task state are sealed before they reach SQLite; ids, states,
        # counters and times stay in the clear so the gateway can query them.
        self._sealer = sealer
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db = sqlite_utils.Database(self._conn)
        # Reentrant: a transaction holds it while the methods called inside take it again.
        self._lock = threading.RLock()
        self._depth = 0  # open transaction levels (savepoints past the first)
        self._closed = False
        # WAL + synchronous=NORMAL: commits survive a process crash (SIGKILL), and a power loss
        # can only drop the last transactions, never corrupt the file.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        if "jobs" not in self._db.table_names():
            self._db.table("jobs").create(
                {
                    "client_id": str,
                    "job_id": str,
                    "state": str,  # accepted | done
                    "request": bytes,  # kept until answered, for a re-run after a crash
                    "response_topic": str,
                    "correlation": bytes,
                    "reply": bytes,
                    "accepted_at": float,
                    "finished_at": float,
                },
                pk=("client_id", "job_id"),
            )
            self._db.table("jobs").create_index(["state"])
        if "tasks" not in self._db.table_names():
            self._db.table("tasks").create(
                {
                    "task_id": str,
                    "owner": str,
                    "spec": bytes,  # the TaskInstall request, msgpack
                    "info": bytes,  # TaskInfo (state, counters), msgpack
                    "checkpoint": bytes,  # compressed memory + globals; empty until the first event
                    "kv": bytes,  # msgpack map
                },
                pk="task_id",
            )
        if "task_inbox" not in self._db.table_names():
            # Events received for a task and not yet covered by a checkpoint. Written before
            # the broker gets its PUBACK, deleted in the transaction that stores the checkpoint.
            self._db.table("task_inbox").create(
                {"id": int, "task_id": str, "topic": str, "payload": bytes, "received_at": float},
                pk="id",
            )
            self._db.table("task_inbox").create_index(["task_id", "id"])
        if "owners" not in self._db.table_names():
            self._db.table("owners").create({"client_id": str, "last_seen": float}, pk="client_id")
        if "audit" not in self._db.table_names():
            self._db.table("audit").create(
                {
                    "id": int,
                    "at": float,
                    "actor": str,  # device or task that asked
                    "action": str,
                    "target": str,
                    "decision": str,  # allowed | refused
                    "reason": str,
                },
                pk="id",
            )
        if "blobs" not in self._db.table_names():
            self._db.table("blobs").create(
                {"sha256": str, "size": int, "stored_at": float, "last_used": float},
                pk="sha256",
            )
        if "data_class" not in self._db.table("blobs").columns_dict:
            # Added with blob labels, for new and older databases alike: blobs stored before
            # uploads carried a label count as private, so none of them is ever forwarded.
            self._db.table("blobs").add_column("data_class", str, not_null_default="private")
        if "devices" not in self._db.table_names():
            # Paired devices, one row per certificate issued (pairing.py). A device id is
            # locked out once it has rows and none of them is unrevoked.
            self._db.table("devices").create(
                {
                    "serial": str,  # the certificate's serial, hex
                    "device_id": str,  # its CN
                    "fingerprint": str,  # sha256 of the certificate's DER, hex
                    "key_fingerprint": str,  # sha256 of its public key (SPKI): re-pairing
                    "paired_at": float,
                    "revoked_at": float,  # NULL while valid
                    "reason": str,
                },
                pk="serial",
            )
            self._db.table("devices").create_index(["device_id"])

    # -- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """What the store does inside commits together or not at all: any exception rolls it
        back and goes on up. A failed statement thus never leaves the connection inside a
        transaction (where every later BEGIN would fail until a restart). Holds the store's
        lock throughout; a nested one is a savepoint of the outer one.

        >>> with store.transaction():  # doctest: +SKIP
        ...     store.put_task(...)
        ...     store.drop_inbox(...)
        """
        with self._lock:
            depth = self._depth
            self._conn.execute(f"SAVEPOINT level{depth}" if depth else "BEGIN")
            self._depth = depth + 1
            try:
                yield
                self._conn.execute(f"RELEASE level{depth}" if depth else "COMMIT")
            except BaseException:
                self._rollback(depth)
                raise
            finally:
                self._depth = depth

    def _rollback(self, depth: int) -> None:
        if not self._conn.in_transaction:
            return  # SQLite rolled back already (it does on some I/O errors)
        try:
            if depth:
                self._conn.execute(f"ROLLBACK TO level{depth}")
                self._conn.execute(f"RELEASE level{depth}")
            else:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            # Keep the error that caused the rollback: it is the one worth reading.
            log.exception("rolling back a failed transaction failed too")

    # -- journal ---------------------------------------------------------------------------

    def accept(
        self, entry: JournalEntry, audit: AuditEntry | None = None
    ) -> tuple[str, bytes | None] | None:
        """Journal a new job (and its audit entry, in the same transaction: one commit per job
        instead of two). Returns None if it is new, else (state, stored reply or None) of the
        job already known under that id; then nothing is written."""
        with self.transaction():
            row = self._conn.execute(
                "SELECT state, reply FROM jobs WHERE client_id=? AND job_id=?",
                (entry.client_id, entry.job_id),
            ).fetchone()
            if row is not None:
                where = _where("jobs.reply", entry.client_id, entry.job_id)
                return str(row[0]), self._sealer.open(row[1], where) or None
            request = self._sealer.seal(
                entry.request, _where("jobs.request", entry.client_id, entry.job_id)
            )
            now = time.time()
            self._conn.execute(
                "INSERT INTO jobs (client_id, job_id, state, request, response_topic,"
                " correlation, accepted_at) VALUES (?, ?, 'accepted', ?, ?, ?, ?)",
                (
                    entry.client_id,
                    entry.job_id,
                    request,
                    entry.response_topic,
                    entry.correlation,
                    now,
                ),
            )
            if audit is not None:
                self._conn.execute(
                    "INSERT INTO audit (at, actor, action, target, decision, reason)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (now, *audit),
                )
            return None

    def finish(self, client_id: str, job_id: str, reply: bytes) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE jobs SET state='done', reply=?, request=NULL, finished_at=?"
                " WHERE client_id=? AND job_id=?",
                (
                    self._sealer.seal(reply, _where("jobs.reply", client_id, job_id)),
                    time.time(),
                    client_id,
                    job_id,
                ),
            )

    def forget(self, client_id: str, job_id: str) -> None:
        """Drop a journal entry whose job was refused or failed through no fault of its own,
        so that the same job id sent again runs."""
        with self._lock:
            self._conn.execute(
                "DELETE FROM jobs WHERE client_id=? AND job_id=? AND state='accepted'",
                (client_id, job_id),
            )

    def unfinished(self) -> list[JournalEntry]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT client_id, job_id, request, response_topic, correlation FROM jobs"
                " WHERE state='accepted' ORDER BY accepted_at"
            ).fetchall()
        return [
            JournalEntry(
                r[0], r[1], self._sealer.open(r[2], _where("jobs.request", r[0], r[1])), r[3], r[4]
            )
            for r in rows
        ]

    def expire_answers(self, older_than_s: float) -> int:
        with self._lock:
            cursor = self._conn.execute(
                "DELETE FROM jobs WHERE state='done' AND finished_at < ?",
                (time.time() - older_than_s,),
            )
            return cursor.rowcount

    # -- blob index ------------------------------------------------------------------------

    def add_blob(self, sha256: str, size: int, data_class: DataClass = "private") -> None:
        """Record a stored blob. A blob already recorded keeps its label: the first complete
        upload decides, so a public upload never turns a private blob public."""
        now = time.time()
        with self._lock:
            self._conn.execute(
                "INSERT INTO blobs (sha256, size, stored_at, last_used, data_class)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO UPDATE SET"
                " size=excluded.size, stored_at=excluded.stored_at, last_used=excluded.last_used",
                (sha256, size, now, now, data_class),
            )

    def public_blobs(self) -> set[str]:
        """The blobs labelled public (every other stored blob is private)."""
        with self._lock:
            rows = self._conn.execute("SELECT sha256 FROM blobs WHERE data_class='public'")
            return {str(r[0]) for r in rows}

    def remove_blob(self, sha256: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM blobs WHERE sha256=?", (sha256,))

    def blob_totals(self) -> tuple[int, int]:
        """(count, bytes) of stored blobs."""
        with self._lock:
            count, size = self._conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM blobs"
            ).fetchone()
        return int(count), int(size)

    # -- persistent tasks ------------------------------------------------------------------

    def tasks(self) -> list[tuple[str, str, bytes, bytes, bytes, bytes]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT task_id, owner, spec, info, checkpoint, kv FROM tasks"
            ).fetchall()
        seal = self._sealer
        return [
            (
                r[0],
                r[1],
                seal.open(r[2], _where("tasks.spec", r[0])),
                r[3],
                seal.open(r[4], _where("tasks.checkpoint", r[0])),
                seal.open(r[5], _where("tasks.kv", r[0])),
            )
            for r in rows
        ]

    def put_task(
        self,
        task_id: str,
        owner: str,
        spec: bytes,
        info: bytes,
        checkpoint: bytes,
        kv: bytes,
        done_inbox: list[int] | tuple[int, ...] = (),
    ) -> None:
        """Store a task's state and drop the inbox events it covers, in one transaction."""
        with self.transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO tasks (task_id, owner, spec, info, checkpoint, kv)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    task_id,
                    owner,
                    self._sealer.seal(spec, _where("tasks.spec", task_id)),
                    info,
                    self._sealer.seal(checkpoint, _where("tasks.checkpoint", task_id)),
                    self._sealer.seal(kv, _where("tasks.kv", task_id)),
                ),
            )
            if done_inbox:
                self._conn.executemany(
                    "DELETE FROM task_inbox WHERE id=?", [(i,) for i in done_inbox]
                )

    def delete_task(self, task_id: str) -> None:
        with self.transaction():
            self._conn.execute("DELETE FROM tasks WHERE task_id=?", (task_id,))
            self._conn.execute("DELETE FROM task_inbox WHERE task_id=?", (task_id,))

    def add_inbox_many(self, rows: list[tuple[str, str, bytes]]) -> list[int]:
        """Several tasks' copies of one message, in one transaction (one commit)."""
        ids: list[int] = []
        now = time.time()
        with self.transaction():
            for task_id, topic, payload in rows:
                cursor = self._conn.execute(
                    "INSERT INTO task_inbox (task_id, topic, payload, received_at)"
                    " VALUES (?, ?, ?, ?)",
                    (
                        task_id,
                        topic,
                        self._sealer.seal(payload, _where("task_inbox", task_id)),
                        now,
                    ),
                )
                ids.append(int(cursor.lastrowid or 0))
        return ids

    def drop_inbox(self, ids: list[int]) -> None:
        with self.transaction():
            self._conn.executemany("DELETE FROM task_inbox WHERE id=?", [(i,) for i in ids])

    def inbox(self) -> list[tuple[int, str, str, bytes]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, task_id, topic, payload FROM task_inbox ORDER BY id"
            ).fetchall()
        return [
            (int(r[0]), r[1], r[2], self._sealer.open(r[3], _where("task_inbox", r[1])))
            for r in rows
        ]

    def owners(self) -> dict[str, float]:
        with self._lock:
            rows = self._conn.execute("SELECT client_id, last_seen FROM owners").fetchall()
        return {str(r[0]): float(r[1]) for r in rows}

    def put_owners(self, seen: dict[str, float]) -> None:
        with self.transaction():
            self._conn.executemany(
                "INSERT OR REPLACE INTO owners (client_id, last_seen) VALUES (?, ?)",
                list(seen.items()),
            )

    def audit(self, actor: str, action: str, target: str, decision: str, reason: str) -> None:
        """One audit row, committed now (``accept`` can carry a job's own)."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO audit (at, actor, action, target, decision, reason)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), actor, action, target, decision, reason),
            )

    # -- paired devices --------------------------------------------------------------------

    def add_device(self, device: DeviceRecord, supersede: bool = False) -> None:
        """Record a new certificate; ``supersede``: revoke the device's earlier ones (a device
        that paired again with the same key)."""
        with self.transaction():
            if supersede:
                self._conn.execute(
                    "UPDATE devices SET revoked_at=?, reason='superseded'"
                    " WHERE device_id=? AND revoked_at IS NULL",
                    (device.paired_at, device.device_id),
                )
            self._conn.execute(
                "INSERT INTO devices (serial, device_id, fingerprint, key_fingerprint,"
                " paired_at, revoked_at, reason) VALUES (?, ?, ?, ?, ?, NULL, '')",
                (
                    device.serial,
                    device.device_id,
                    device.fingerprint,
                    device.key_fingerprint,
                    device.paired_at,
                ),
            )

    def revoke_device(self, device_id: str, reason: str) -> list[str]:
        """Revoke every valid certificate of ``device_id``; returns their serials."""
        with self.transaction():
            rows = self._conn.execute(
                "SELECT serial FROM devices WHERE device_id=? AND revoked_at IS NULL",
                (device_id,),
            ).fetchall()
            self._conn.execute(
                "UPDATE devices SET revoked_at=?, reason=?"
                " WHERE device_id=? AND revoked_at IS NULL",
                (time.time(), reason, device_id),
            )
        return [str(r[0]) for r in rows]

    def devices(self) -> list[DeviceRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT serial, device_id, fingerprint, key_fingerprint, paired_at, revoked_at,"
                " reason FROM devices ORDER BY paired_at"
            ).fetchall()
        return [
            DeviceRecord(
                str(r[0]),
                str(r[1]),
                str(r[2]),
                str(r[3]),
                float(r[4]),
                None if r[5] is None else float(r[5]),
                str(r[6] or ""),
            )
            for r in rows
        ]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._conn.close()


def _where(column: str, *key: str) -> bytes:
    """Associated data for a sealed value: which column of which row it belongs to."""
    return "/".join((column, *key)).encode()
