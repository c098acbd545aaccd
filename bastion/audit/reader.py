"""Reading audit logs back: query, tail, follow and verify, for JSON Lines and SQLite alike."""

from __future__ import annotations

import collections
import fnmatch
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bastion.audit.record import GENESIS_HASH, record_hash
from bastion.audit.sinks import (
    SQLITE_SUFFIXES,
    connect_sqlite,
    jsonl_segments,
    read_head,
    sqlite_columns,
)
from bastion.errors import AuditError

__all__ = [
    "AuditLog",
    "JsonlLog",
    "RawRecord",
    "RecordFilter",
    "SqliteLog",
    "VerifyResult",
    "open_log",
    "verify_log",
]


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One stored record as read, before any check: where it is, and its JSON (or why not)."""

    location: str
    data: dict[str, Any] | None
    error: str | None = None
    columns: tuple[Any, ...] | None = None


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Which records a query returns; every given field must hold. ``target`` is a glob."""

    subject: str | None = None
    target: str | None = None
    effect: str | None = None
    rule_id: str | None = None
    kind: str | None = None
    session_id: str | None = None
    since: str | None = None
    until: str | None = None

    def matches(self, record: Mapping[str, Any]) -> bool:
        identity = record.get("identity") or {}
        if self.subject is not None and identity.get("subject") != self.subject:
            return False
        if self.target is not None and not fnmatch.fnmatchcase(
            str(record.get("target", "")), self.target
        ):
            return False
        if self.effect is not None and record.get("effect") != self.effect:
            return False
        if self.kind is not None and record.get("kind") != self.kind:
            return False
        if self.session_id is not None and record.get("session_id") != self.session_id:
            return False
        if self.rule_id is not None and self.rule_id not in (record.get("rule_ids") or []):
            return False
        stamp = str(record.get("time", ""))
        if self.since is not None and stamp < self.since:
            return False
        return not (self.until is not None and stamp >= self.until)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of checking a log's hash chain.

    ``bad_record`` is the id of the first record found wrong (or its location when
    it has no readable id), ``reason`` says what is wrong with it; ``notes`` are
    facts that are not failures (no head to check truncation against, pruned
    segments).
    """

    ok: bool
    records: int
    head: str
    bad_record: str | None = None
    location: str | None = None
    reason: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


class AuditLog(Protocol):
    """A stored audit log, read-only."""

    path: Path

    def raw(self) -> Iterator[RawRecord]: ...

    def head(self) -> dict[str, Any] | None: ...

    def genesis(self) -> str: ...

    def query(self, where: RecordFilter, limit: int | None = None) -> Iterator[dict[str, Any]]: ...

    def get(self, record_id: str) -> dict[str, Any] | None: ...

    def tail(self, count: int) -> list[dict[str, Any]]: ...

    def follow(self, poll: float = 0.25) -> Iterator[dict[str, Any]]: ...


def open_log(path: str | os.PathLike[str]) -> AuditLog:
    """The log at ``path``: SQLite for ``.db``/``.sqlite``/``.sqlite3``, else JSON Lines (with its rotated segments)."""
    if str(path).endswith(SQLITE_SUFFIXES):
        return SqliteLog(path)
    return JsonlLog(path)


def _parse(line: bytes, location: str) -> RawRecord:
    try:
        data = json.loads(line)
    except ValueError as exc:
        return RawRecord(location, None, f"not valid JSON ({exc})")
    if not isinstance(data, dict):
        return RawRecord(location, None, "not a JSON object")
    return RawRecord(location, data)


def _lines(data: bytes) -> Iterator[dict[str, Any]]:
    for line in data.split(b"\n"):
        if line.strip():
            raw = _parse(line, "follow")
            if raw.data is not None:
                yield raw.data


class JsonlLog:
    """A JSON Lines audit log: the active file and its rotated segments, in chain order."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not jsonl_segments(self.path):
            raise AuditError(f"no audit log at {self.path}")

    def raw(self) -> Iterator[RawRecord]:
        for segment in jsonl_segments(self.path):
            with segment.open("rb") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield _parse(line, f"{segment.name}:{number}")

    def head(self) -> dict[str, Any] | None:
        return read_head(self.path)

    def genesis(self) -> str:
        head = self.head()
        pruned = head.get("pruned") if head else None
        return str(pruned["hash"]) if isinstance(pruned, dict) else GENESIS_HASH

    def _records(self) -> Iterator[dict[str, Any]]:
        for raw in self.raw():
            if raw.data is not None:
                yield raw.data

    def query(self, where: RecordFilter, limit: int | None = None) -> Iterator[dict[str, Any]]:
        found = 0
        for record in self._records():
            if where.matches(record):
                yield record
                found += 1
                if limit is not None and found >= limit:
                    return

    def get(self, record_id: str) -> dict[str, Any] | None:
        return next((r for r in self._records() if r.get("id") == record_id), None)

    def tail(self, count: int) -> list[dict[str, Any]]:
        return list(collections.deque(self._records(), maxlen=count)) if count > 0 else []

    def follow(self, poll: float = 0.25) -> Iterator[dict[str, Any]]:
        """Records appended from now on, across rotations (blocks; stop by closing the generator)."""
        f = self.path.open("rb")
        f.seek(0, os.SEEK_END)
        pending = b""
        try:
            while True:
                chunk = f.read()
                if chunk:
                    pending += chunk
                    complete, _, pending = pending.rpartition(b"\n")
                    yield from _lines(complete)
                    continue
                try:
                    rotated = os.stat(self.path).st_ino != os.fstat(f.fileno()).st_ino
                except FileNotFoundError:
                    rotated = False
                if rotated:
                    # The writer closed the old file before renaming it: whatever
                    # was appended since the last read is still to be read, and
                    # so is every segment rotated out after it.
                    pending += f.read()
                    old_inode = os.fstat(f.fileno()).st_ino
                    f.close()
                    yield from _lines(pending)
                    pending = b""
                    segments = jsonl_segments(self.path)
                    inodes = [s.stat().st_ino for s in segments]
                    after = inodes.index(old_inode) + 1 if old_inode in inodes else len(segments)
                    for segment in segments[after:]:
                        if segment == self.path:
                            break
                        yield from _lines(segment.read_bytes())
                    f = self.path.open("rb")
                    continue
                time.sleep(poll)
        finally:
            f.close()


class SqliteLog:
    """An SQLite audit database, opened read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise AuditError(f"no audit database at {self.path}")
        try:
            self._conn = connect_sqlite(self.path, readonly=True)
            self._conn.execute("SELECT 1 FROM audit_records LIMIT 1")
        except sqlite3.Error as exc:
            raise AuditError(f"{self.path} is not a Bastion audit database: {exc}") from exc

    def raw(self) -> Iterator[RawRecord]:
        columns = ", ".join(("seq", "id", "time", "subject", "tenant", "kind", "target", "effect"))
        rows = self._conn.execute(
            f"SELECT {columns}, rule_ids, prev_hash, hash, record FROM audit_records ORDER BY seq"
        )
        for row in rows:
            seq, *cols, record = row
            parsed = _parse(record.encode() if isinstance(record, str) else record, f"seq {seq}")
            yield RawRecord(parsed.location, parsed.data, parsed.error, tuple(cols))

    def head(self) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT hash, id, count FROM audit_head WHERE one = 1").fetchone()
        return None if row is None else {"hash": row[0], "id": row[1], "count": row[2]}

    def genesis(self) -> str:
        row = self._conn.execute("SELECT value FROM audit_meta WHERE key = 'genesis'").fetchone()
        return str(row[0]) if row else GENESIS_HASH

    def query(self, where: RecordFilter, limit: int | None = None) -> Iterator[dict[str, Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("subject", where.subject),
            ("effect", where.effect),
            ("kind", where.kind),
            ("session_id", where.session_id),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if where.target is not None:
            clauses.append("target GLOB ?")
            params.append(where.target)
        if where.rule_id is not None:
            clauses.append("EXISTS (SELECT 1 FROM json_each(rule_ids) WHERE value = ?)")
            params.append(where.rule_id)
        if where.since is not None:
            clauses.append("time >= ?")
            params.append(where.since)
        if where.until is not None:
            clauses.append("time < ?")
            params.append(where.until)
        sql = "SELECT record FROM audit_records"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        for (record,) in self._conn.execute(sql, params):
            data = json.loads(record)
            # The columns are copies; the record is what the chain covers.
            if where.matches(data):
                yield data

    def get(self, record_id: str) -> dict[str, Any] | None:
        row = self._conn.execute(
            "SELECT record FROM audit_records WHERE id = ?", (record_id,)
        ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def tail(self, count: int) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT record FROM audit_records ORDER BY seq DESC LIMIT ?", (count,)
        ).fetchall()
        return [json.loads(r[0]) for r in reversed(rows)]

    def follow(self, poll: float = 0.25) -> Iterator[dict[str, Any]]:
        """Records inserted from now on (blocks; stop by closing the generator)."""
        row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM audit_records").fetchone()
        last = int(row[0])
        while True:
            rows = self._conn.execute(
                "SELECT seq, record FROM audit_records WHERE seq > ? ORDER BY seq", (last,)
            ).fetchall()
            for seq, record in rows:
                last = seq
                yield json.loads(record)
            if not rows:
                time.sleep(poll)


# -- verification ---------------------------------------------------------------


def _ident(raw: RawRecord) -> str:
    if raw.data is not None and isinstance(raw.data.get("id"), str):
        return str(raw.data["id"])
    return raw.location


def _diagnose(log: AuditLog, index: int, expected: str) -> tuple[int, str]:
    """Why record ``index`` does not continue the chain from ``expected``: (bad index, reason)."""
    records = [r.data or {} for r in log.raw()]
    hashes = [str(r.get("hash")) for r in records]
    positions: dict[str, int] = {}
    for i, h in enumerate(hashes):
        positions.setdefault(h, i)
    here = records[index]
    prev = str(here.get("prev_hash"))
    if positions.get(hashes[index], index) < index:
        return index, "duplicate of an earlier record (copied into the log)"
    where = positions.get(prev)
    if where is not None and where > index:
        return index, (
            f"out of order: it follows record {records[where].get('id')}, which comes later "
            "in the log (records were reordered)"
        )
    nxt = records[index + 1] if index + 1 < len(records) else None
    if nxt is not None and nxt.get("prev_hash") == expected:
        return (
            index,
            "inserted: not part of the chain (the record after it continues from the one before it)",
        )
    if where is None:
        if index == 0:
            return (
                index,
                "the log does not start at the chain's beginning: earlier records were deleted",
            )
        return index, (
            "chain broken before this record: the record(s) it follows were deleted, "
            f"or the preceding record {records[index - 1].get('id')} was altered"
        )
    return where + 1, (
        f"inserted: not part of the chain (record {here.get('id')} continues from "
        f"record {records[where].get('id')}, before it)"
    )


def verify_log(log: AuditLog) -> VerifyResult:
    """Recompute every hash and link of ``log``; report the first record that is wrong."""
    expected = log.genesis()
    notes: list[str] = []
    if expected != GENESIS_HASH:
        notes.append("older segments were pruned; the chain is checked from the pruning anchor")
    last_id: str | None = None
    count = 0
    for index, raw in enumerate(log.raw()):
        count += 1
        if raw.data is None:
            return VerifyResult(
                False, count - 1, expected, raw.location, raw.location, f"unreadable: {raw.error}"
            )
        data = raw.data
        ident = _ident(raw)
        stored = data.get("hash")
        if not isinstance(stored, str) or record_hash(data) != stored:
            return VerifyResult(
                False, index, expected, ident, raw.location,
                "edited: its content does not match its hash",
            )  # fmt: skip
        if raw.columns is not None:
            *indexed, prev_col, hash_col = raw.columns
            if tuple(indexed) != sqlite_columns(data) or (prev_col, hash_col) != (
                data.get("prev_hash"),
                stored,
            ):
                return VerifyResult(
                    False, index, expected, ident, raw.location,
                    "edited: its indexed columns disagree with the hashed record",
                )  # fmt: skip
        if data.get("prev_hash") != expected:
            bad, reason = _diagnose(log, index, expected)
            bad_raw = list(log.raw())[bad]
            return VerifyResult(False, index, expected, _ident(bad_raw), bad_raw.location, reason)
        expected = stored
        last_id = ident
    head = log.head()
    if head is None:
        if count:
            notes.append("no head recorded: removal of the last records cannot be detected")
    elif head.get("hash") != expected:
        known = {str((r.data or {}).get("hash")) for r in log.raw()}
        if head.get("hash") in known:
            notes.append("the head lags the log (a crash between the two writes); not a failure")
        else:
            return VerifyResult(
                False, count, expected, str(head.get("id")), None,
                f"truncated: the head names record {head.get('id')} as the last, "
                f"but the log ends at {last_id or 'its beginning'}",
            )  # fmt: skip
    elif head.get("count") is not None and head.get("count") != count:
        return VerifyResult(
            False, count, expected, str(head.get("id")), None,
            f"the head counts {head.get('count')} records but the log holds {count}",
        )  # fmt: skip
    return VerifyResult(True, count, expected, notes=tuple(notes))
