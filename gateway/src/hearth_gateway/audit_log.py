"""Reading the audit table: ``hearth-gateway audit`` and the owner's page. Read-only: the daemon
is the only writer, and SQLite's WAL lets this read while it writes."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = ["AuditFilter", "AuditRow", "read_audit"]


class AuditRow(NamedTuple):
    at: float  # unix seconds
    actor: str
    action: str
    target: str
    decision: str
    reason: str


@dataclass(frozen=True, slots=True)
class AuditFilter:
    limit: int = 100  # the newest N matching rows
    since: float | None = None  # unix seconds
    # Actions: each matches itself and, as a prefix before "_", its family (task: task_*).
    kinds: list[str] = field(default_factory=list)
    actor: str = ""  # exactly this device or task
    decision: str = ""  # allowed | refused
    text: str = ""  # in the target or the reason


def read_audit(path: Path, wanted: AuditFilter) -> list[AuditRow]:
    """The newest ``wanted.limit`` rows that match, newest first; none without a database."""
    if not path.exists():
        return []
    where: list[str] = ["1"]
    params: list[float | str] = []
    if wanted.since is not None:
        where.append("at >= ?")
        params.append(wanted.since)
    if wanted.kinds:
        # task matches task and task_*: LIKE's _ is a wildcard, so escaped.
        kinds = " OR ".join("action = ? OR action LIKE ? ESCAPE '\\'" for _ in wanted.kinds)
        where.append(f"({kinds})")
        for kind in wanted.kinds:
            params += [kind, kind.replace("_", "\\_") + "\\_%"]
    if wanted.actor:
        where.append("actor = ?")
        params.append(wanted.actor)
    if wanted.decision:
        where.append("decision = ?")
        params.append(wanted.decision)
    if wanted.text:
        where.append("(instr(target, ?) > 0 OR instr(reason, ?) > 0)")
        params += [wanted.text, wanted.text]
    # The WHERE is built of fixed text only; the values are parameters.
    query = (
        "SELECT at, actor, action, target, decision, reason FROM audit"  # noqa: S608
        f" WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
    )
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0) as db:
        return [AuditRow(*row) for row in db.execute(query, (*params, wanted.limit))]
