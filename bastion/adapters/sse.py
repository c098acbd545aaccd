"""Incremental server-sent events: a parser that takes bytes as they arrive, and a writer.

The parser follows the WHATWG event-stream rules (``data``/``event``/``id``/
``retry`` fields, comments, a field with no colon, a leading BOM, CR, LF and
CRLF line endings, a CRLF split across two chunks) with two deliberate
differences that suit a proxy:

* A block that carries only ``id`` or ``retry`` (no ``data`` line) is still
  surfaced, with ``data=None``, so re-encoding it keeps the stream's meaning.
  Consumers interested in messages only skip events whose ``data`` is None.
* It is strict: invalid UTF-8 and an event larger than ``max_event_size``
  raise :class:`~bastion.errors.ProtocolError` instead of being repaired, and
  :meth:`SSEParser.close` reports a stream cut in the middle of an event.

Usage by a stream rewriter::

    parser = SSEParser(max_event_size=1 << 20)
    for chunk in upstream:
        for event in parser.feed(chunk):
            out.write(encode_event(event))
    parser.close()          # raises ProtocolError("truncated_stream") if cut mid-event
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bastion.errors import ProtocolError

__all__ = ["DEFAULT_MAX_EVENT_SIZE", "SSEEvent", "SSEParser", "encode_event"]

DEFAULT_MAX_EVENT_SIZE = 4 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")
_NEWLINES = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event (or, with ``emit_comments``, one comment line).

    ``data`` is the joined ``data`` lines, or None when the block had none.
    ``event`` is None for the default ``message`` type. ``comment`` is set only
    on comment items, which carry nothing else.
    """

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    @property
    def is_comment(self) -> bool:
        return self.comment is not None

    @property
    def type(self) -> str:
        """The event type as a browser would report it (``message`` by default)."""
        return self.event or "message"


class SSEParser:
    """Turns an event stream, fed in chunks split anywhere, into :class:`SSEEvent`s.

    Memory is bounded: the bytes of the event being assembled (its pending line
    plus its fields) may not exceed ``max_event_size``; past that ``feed``
    raises ``ProtocolError(code="sse_event_too_large", status=413)``.
    """

    __slots__ = (
        "_buf",
        "_data",
        "_emit_comments",
        "_event",
        "_id",
        "_max",
        "_pending_size",
        "_retry",
        "_skip_lf",
        "_started",
    )

    def __init__(
        self, *, max_event_size: int = DEFAULT_MAX_EVENT_SIZE, emit_comments: bool = False
    ) -> None:
        self._max = max_event_size
        self._emit_comments = emit_comments
        self._buf = b""
        self._skip_lf = False
        self._started = False
        self._data: list[str] | None = None
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._pending_size = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse ``chunk`` and return the events it completed, in order."""
        if not chunk:
            return []
        if not self._started:
            buf = self._buf + chunk
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._buf = buf
                return []
            self._started = True
            self._buf = b""
            chunk = buf[len(_BOM) :] if buf.startswith(_BOM) else buf
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._buf + chunk if self._buf else chunk
        events: list[SSEEvent] = []
        pos = 0
        end = len(buf)
        for match in _LINE_END.finditer(buf):
            start, stop = match.span()
            if stop == end and buf[start:stop] == b"\r":
                # A CR ending the chunk may be the first half of a CRLF.
                self._skip_lf = True
            self._line(buf[pos:start], events)
            pos = stop
        self._buf = buf[pos:]
        if len(self._buf) + self._pending_size > self._max:
            self._too_large()
        return events

    @property
    def at_boundary(self) -> bool:
        """True between events: nothing of a next event has been fed yet (a BOM was settled)."""
        return self._started and not self._buf and not self._skip_lf and not self._has_fields()

    def close(self, *, strict: bool = True) -> list[SSEEvent]:
        """End of stream. A partial event is dropped, as browsers do, unless ``strict``.

        With ``strict`` (the default) a stream cut inside an event raises
        ``ProtocolError(code="truncated_stream")``: an upstream that vanished
        mid-event must not look like one that finished.
        """
        truncated = bool(self._buf) or self._has_fields()
        if not self._started and self._buf and _BOM.startswith(self._buf):
            truncated = False
        self._buf = b""
        self._reset()
        if truncated and strict:
            raise ProtocolError(
                "event stream ended inside an event", status=502, code="truncated_stream"
            )
        return []

    def _has_fields(self) -> bool:
        return (
            self._data is not None
            or self._event is not None
            or self._id is not None
            or self._retry is not None
        )

    def _reset(self) -> None:
        self._data = None
        self._event = None
        self._id = None
        self._retry = None
        self._pending_size = 0

    def _too_large(self) -> None:
        raise ProtocolError(
            f"server-sent event larger than {self._max} bytes",
            status=413,
            code="sse_event_too_large",
        )

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        if not raw:
            if self._has_fields():
                data = None if self._data is None else "\n".join(self._data)
                events.append(
                    SSEEvent(data=data, event=self._event, id=self._id, retry=self._retry)
                )
            self._reset()
            return
        self._pending_size += len(raw) + 1
        if self._pending_size > self._max:
            self._too_large()
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("event stream is not valid UTF-8", code="invalid_utf8") from exc
        name, colon, value = line.partition(":")
        if colon and not name:
            if self._emit_comments:
                events.append(SSEEvent(comment=value[1:] if value.startswith(" ") else value))
            self._pending_size -= len(raw) + 1
            return
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        # Unknown field names are ignored, as the standard requires.


def encode_event(event: SSEEvent) -> bytes:
    """Serialise one event (or comment) so that :class:`SSEParser` reads it back unchanged.

    Raises ``ValueError`` for values no event stream can carry (a line break in
    ``event`` or ``id``, a NUL in ``id``, a negative ``retry``).
    """
    if event.comment is not None:
        return "".join(f": {line}\n" for line in _NEWLINES.split(event.comment)).encode("utf-8")
    parts: list[str] = []
    if event.event is not None:
        if _NEWLINES.search(event.event):
            raise ValueError("an SSE event name cannot contain a line break")
        parts.append(f"event: {event.event}\n")
    if event.id is not None:
        if _NEWLINES.search(event.id) or "\x00" in event.id:
            raise ValueError("an SSE id cannot contain a line break or NUL")
        parts.append(f"id: {event.id}\n")
    if event.retry is not None:
        if event.retry < 0:
            raise ValueError("an SSE retry must be a non-negative integer")
        parts.append(f"retry: {event.retry}\n")
    if event.data is not None:
        parts.extend(f"data: {line}\n" for line in _NEWLINES.split(event.data))
    if not parts:
        raise ValueError("an SSE event needs at least one field")
    parts.append("\n")
    return "".join(parts).encode("utf-8")
