"""Where audit records go: the sink protocol, a JSON Lines file and SQLite.

A sink receives batches of unsealed records from the trail's writer thread, chains
them after its own last hash (read back from storage when it opens, so the chain
survives restarts) and stores them. ``write`` stores the whole batch or raises,
leaving its chain head where it was.

Both shipped sinks keep a *head*: the hash and id of the last record, stored apart
from the records (a ``.head`` file next to the JSON Lines log, a one-row table in
SQLite). It lets ``verify`` notice a log cut short after its last record, and a
sink refuses to open (``AuditError``) on a log whose head record is missing.
Someone able to rewrite both the log and its head is not caught; anchor the head
elsewhere (ship it to another system) when that matters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from bastion.audit.record import GENESIS_HASH, seal_json
from bastion.errors import AuditError

__all__ = ["AuditSink", "JsonlSink", "SqliteSink", "jsonl_segments", "open_sink"]

log = logging.getLogger("bastion.audit")

SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


@runtime_checkable
class AuditSink(Protocol):
    """Anything that stores audit records.

    ``write`` is called from one writer thread at a time with unsealed records
    (dicts shaped like :class:`~bastion.audit.record.AuditRecord` without
    ``prev_hash``/``hash``); it must store all of them or raise. Sinks that want
    tamper evidence chain them with :func:`~bastion.audit.record.seal`.
    """

    def write(self, records: Sequence[Mapping[str, Any]]) -> None: ...

    def close(self) -> None: ...


def open_sink(path: str | os.PathLike[str], **options: Any) -> AuditSink:
    """A :class:`SqliteSink` for ``.db``/``.sqlite``/``.sqlite3`` paths, else a :class:`JsonlSink`."""
    if str(path).endswith(SQLITE_SUFFIXES):
        return SqliteSink(path, **options)
    return JsonlSink(path, **options)


# -- JSON Lines ---------------------------------------------------------------


def _segment_name(active: Path, number: int) -> Path:
    return active.with_name(f"{active.stem}.{number:06d}{active.suffix}")


def jsonl_segments(path: str | os.PathLike[str]) -> list[Path]:
    """The files of a rotated JSON Lines log in chain order: rotated segments, then the active file."""
    active = Path(path)
    pattern = re.compile(re.escape(active.stem) + r"\.(\d{6,})" + re.escape(active.suffix) + "$")
    numbered: list[tuple[int, Path]] = []
    if active.parent.is_dir():
        for entry in active.parent.iterdir():
            match = pattern.match(entry.name)
            if match:
                numbered.append((int(match.group(1)), entry))
    files = [p for _, p in sorted(numbered)]
    if active.exists():
        files.append(active)
    return files


def head_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar holding a JSON Lines log's head (last hash and id)."""
    active = Path(path)
    return active.with_name(active.name + ".head")


def read_head(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The head sidecar of a JSON Lines log, or None when there is none."""
    try:
        data = json.loads(head_path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuditError(f"unreadable audit head file {head_path(path)}: {exc}") from exc
    if not isinstance(data, dict):
        raise AuditError(f"unreadable audit head file {head_path(path)}")
    return data


def _last_line(path: Path) -> bytes | None:
    """The last complete line of ``path`` (without its newline), reading backwards."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        if end == 0:
            return None
        chunk = 8192
        buf = b""
        pos = end
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            stripped = buf.rstrip(b"\n")
            cut = stripped.rfind(b"\n")
            if cut >= 0:
                return stripped[cut + 1 :]
        stripped = buf.rstrip(b"\n")
        return stripped or None


def _hashes_in(path: Path) -> set[str]:
    found: set[str] = set()
    with path.open("rb") as f:
        for line in f:
            try:
                found.add(str(json.loads(line)["hash"]))
            except (ValueError, KeyError, TypeError):
                continue
    return found


class JsonlSink:
    """Append-only JSON Lines log with size-based rotation.

    ``path`` is the active file. When a batch would take it past ``max_bytes`` it
    is renamed to ``<stem>.<NNNNNN><suffix>`` (numbers only grow) and a new active
    file starts; the chain runs on across files, so verifying the whole set in
    order works. With ``max_files`` the oldest segments are deleted and the head
    file remembers the last pruned hash, so the remaining set still verifies.
    ``fsync`` makes each batch durable against power loss (not needed against a
    process crash). One process writes a given log: use a path per process.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_files: int | None = None,
        fsync: bool = False,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.fsync = fsync
        self._lock = threading.Lock()
        self._head_stale = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head = read_head(self.path)
        self._pruned: dict[str, Any] | None = head.get("pruned") if head else None
        self._drop_partial_line()
        self.head, self.head_id = self._recover_head(head)
        segments = jsonl_segments(self.path)
        numbers = [int(p.stem.rsplit(".", 1)[1]) for p in segments if p != self.path]
        self._next_segment = (max(numbers) + 1) if numbers else 1
        self._file = self.path.open("ab")
        self._size = self._file.tell()
        self._closed = False

    def _drop_partial_line(self) -> None:
        # A crash mid-write can leave a line without its newline: it was never a
        # record (the batch did not complete), so it is cut before appending.
        if not self.path.exists():
            return
        with self.path.open("rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            back = min(size, 1 << 20)
            f.seek(size - back)
            tail = f.read(back)
            cut = tail.rfind(b"\n")
            keep = size - back + cut + 1 if cut >= 0 else 0
            log.warning("audit log %s ends in a partial line; truncating it", self.path)
            f.truncate(keep)

    def _recover_head(self, head: Mapping[str, Any] | None) -> tuple[str, str | None]:
        last_hash, last_id = GENESIS_HASH, None
        if self._pruned:
            last_hash = str(self._pruned.get("hash", GENESIS_HASH))
        for segment in reversed(jsonl_segments(self.path)):
            line = _last_line(segment)
            if line is None:
                continue
            try:
                record = json.loads(line)
                last_hash, last_id = str(record["hash"]), record.get("id")
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditError(f"audit log {segment} ends in an unreadable record") from exc
            break
        if head is not None and head.get("hash") != last_hash:
            # The head may lag the log by one batch (a crash between the two
            # writes); it must never be ahead of it.
            known = set().union(*(_hashes_in(p) for p in jsonl_segments(self.path)))
            if head.get("hash") not in known:
                raise AuditError(
                    f"audit log {self.path} is missing its head record {head.get('id')}: "
                    "it was truncated or rewritten; run `bastion audit verify` and move the "
                    ".head file aside to start a new chain"
                )
        return last_hash, last_id

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            if self._closed:
                raise AuditError(f"audit sink {self.path} is closed")
            prev = self.head
            lines: list[bytes] = []
            for record in records:
                prev, text = seal_json(record, prev)
                lines.append(text.encode() + b"\n")
            data = b"".join(lines)
            if self._head_stale:
                # The previous batch is stored but its head is not: retrying here,
                # before new data, fails the sink without duplicating records.
                self._write_head()
            try:
                if self._size and self._size + len(data) > self.max_bytes:
                    self._rotate()
                start = self._size
                try:
                    self._file.write(data)
                    self._file.flush()
                    if self.fsync:
                        os.fsync(self._file.fileno())
                except OSError:
                    self._rollback(start)
                    raise
            except OSError as exc:
                raise AuditError(f"audit sink {self.path} failed: {exc}") from exc
            self._size = start + len(data)
            self.head = prev
            self.head_id = str(records[-1]["id"]) if records else self.head_id
            try:
                self._write_head()
            except AuditError:
                log.exception("audit head of %s is stale; the next write retries it", self.path)

    def _rollback(self, size: int) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        try:
            with self.path.open("rb+") as f:
                f.truncate(size)
        except OSError:
            log.exception("could not roll back a failed audit write in %s", self.path)
        self._file = self.path.open("ab")
        self._size = self._file.tell()

    def _rotate(self) -> None:
        self._file.close()
        target = _segment_name(self.path, self._next_segment)
        os.replace(self.path, target)
        self._next_segment += 1
        self._file = self.path.open("ab")
        self._size = 0
        if self.max_files is not None:
            self._prune()

    def _prune(self) -> None:
        assert self.max_files is not None
        rotated = [p for p in jsonl_segments(self.path) if p != self.path]
        excess = len(rotated) - max(self.max_files - 1, 0)
        for segment in rotated[: max(excess, 0)]:
            line = _last_line(segment)
            if line is not None:
                record = json.loads(line)
                self._pruned = {"segment": segment.name, "hash": record["hash"], "id": record["id"]}
                # The anchor is stored before the file goes, so a crash in
                # between leaves a verifiable set.
                self._write_head()
            segment.unlink()

    def _write_head(self) -> None:
        head: dict[str, Any] = {"hash": self.head, "id": self.head_id}
        if self._pruned:
            head["pruned"] = self._pruned
        target = head_path(self.path)
        tmp = target.with_name(target.name + ".tmp")
        try:
            tmp.write_text(json.dumps(head))
            os.replace(tmp, target)
        except OSError as exc:
            self._head_stale = True
            raise AuditError(f"audit head file {target} could not be written: {exc}") from exc
        self._head_stale = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._file.close()


# -- SQLite -------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    time TEXT NOT NULL,
    subject TEXT NOT NULL,
    tenant TEXT,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    effect TEXT NOT NULL,
    rule_ids TEXT NOT NULL,
    session_id TEXT,
    request_id TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records (time);
CREATE INDEX IF NOT EXISTS audit_records_subject ON audit_records (subject, time);
CREATE INDEX IF NOT EXISTS audit_records_target ON audit_records (target, time);
CREATE INDEX IF NOT EXISTS audit_records_effect ON audit_records (effect, time);
CREATE TABLE IF NOT EXISTS audit_head (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    hash TEXT NOT NULL,
    id TEXT,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

SQLITE_COLUMNS = ("id", "time", "subject", "tenant", "kind", "target", "effect", "rule_ids")


def sqlite_columns(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """The indexed columns of ``record``, as the SQLite sink stores them."""
    identity = record.get("identity") or {}
    return (
        record.get("id"),
        record.get("time"),
        identity.get("subject"),
        identity.get("tenant"),
        record.get("kind"),
        record.get("target"),
        record.get("effect"),
        json.dumps(record.get("rule_ids") or []),
    )


def connect_sqlite(path: str | os.PathLike[str], *, readonly: bool = False) -> sqlite3.Connection:
    """A connection to an audit database (WAL, busy timeout), creating the schema when writable."""
    if readonly:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
        return conn
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=10, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    conn.execute(
        "INSERT OR IGNORE INTO audit_meta (key, value) VALUES ('genesis', ?)", (GENESIS_HASH,)
    )
    return conn


class SqliteSink:
    """Audit records in SQLite (WAL), indexed by time, subject, target and effect.

    Each batch is one ``BEGIN IMMEDIATE`` transaction that reads the chain head
    inside it, so several processes may share one database and still form one
    valid chain. The full record is kept as JSON text (what the hash covers); the
    indexed columns are copies that ``verify`` checks against it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = connect_sqlite(self.path)
            self.head, self.head_id, _ = self._read_head()
        except sqlite3.Error as exc:
            raise AuditError(f"audit database {self.path} cannot be opened: {exc}") from exc
        self._closed = False

    def _read_head(self) -> tuple[str, str | None, int]:
        row = self._conn.execute("SELECT hash, id, count FROM audit_head WHERE one = 1").fetchone()
        last = self._conn.execute(
            "SELECT hash, id FROM audit_records ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:
            if last is not None:
                raise AuditError(f"audit database {self.path} has records but no head")
            return GENESIS_HASH, None, 0
        if (last is None and row[0] != GENESIS_HASH) or (last is not None and last[0] != row[0]):
            raise AuditError(
                f"audit database {self.path} is missing its head record {row[1]}: it was "
                "truncated or rewritten; run `bastion audit verify`"
            )
        return str(row[0]), row[1], int(row[2])

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        with self._lock:
            if self._closed:
                raise AuditError(f"audit sink {self.path} is closed")
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    prev, _, count = self._read_head()
                    rows = []
                    for record in records:
                        link = prev
                        prev, text = seal_json(record, link)
                        rows.append(
                            (
                                *sqlite_columns(record),
                                record.get("session_id"),
                                record.get("request_id"),
                                link,
                                prev,
                                text,
                            )
                        )
                    conn.executemany(
                        "INSERT INTO audit_records (id, time, subject, tenant, kind, target, "
                        "effect, rule_ids, session_id, request_id, prev_hash, hash, record) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    conn.execute(
                        "INSERT INTO audit_head (one, hash, id, count) VALUES (1, ?, ?, ?) "
                        "ON CONFLICT (one) DO UPDATE SET hash = excluded.hash, id = excluded.id, "
                        "count = excluded.count",
                        (prev, records[-1]["id"], count + len(rows)),
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise AuditError(f"audit sink {self.path} failed: {exc}") from exc
            self.head, self.head_id = prev, str(records[-1]["id"])

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()
