"""The audit trail: the ``on_decision`` hook and the writer thread behind it.

The hook only appends ``(event, time)`` to a bounded queue and, when the writer
is asleep, wakes it: a few hundred nanoseconds, no I/O, no lock shared with the
writer, callable from async code and plain threads alike. The writer thread
builds records (redaction, trace capture), hands them to every sink in batches
and feeds the metrics.

When a sink fails or the queue is full the trail is never silent:

* ``on_overflow="fail_closed"`` (default): the hook raises :class:`AuditError`
  (adapters deny the request) and ``healthy`` is False until the sink accepts
  writes again; records already accepted are kept and retried, never dropped
  while the process lives.
* ``on_overflow="drop"``: the record is dropped, counted in ``dropped`` (and in
  the metrics) and logged (at most once per ``log_interval`` seconds, with the
  count).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import random
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from bastion.audit.record import DENIAL_EFFECTS, ArgumentRedaction, build_record
from bastion.audit.sinks import AuditSink
from bastion.errors import AuditError
from bastion.events import AuditEvent

if TYPE_CHECKING:
    from bastion.audit.metrics import BastionMetrics

__all__ = ["AuditStats", "AuditTrail"]

log = logging.getLogger("bastion.audit")

_live_trails: weakref.WeakSet[AuditTrail] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    # SystemExit from a signal handler, or the end of the main module, still
    # flushes every open trail.
    for trail in list(_live_trails):
        trail.close()


@dataclass(frozen=True, slots=True)
class AuditStats:
    """Counters of one trail.

    ``accepted`` is approximate when many threads call the hook at once (the hook
    takes no lock); ``written`` is what the slowest sink stored; ``dropped`` is exact.
    """

    accepted: int
    written: int
    dropped: int
    queued: int
    healthy: bool


class _SinkState:
    __slots__ = ("backlog", "failing", "last_error", "sink", "written")

    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink
        self.backlog: list[dict[str, Any]] = []
        self.failing = False
        self.last_error: str | None = None
        self.written = 0


class AuditTrail:
    """Records every decision to its sinks without blocking the caller.

    Pass ``trail.on_decision`` to the adapters; call ``close()`` (or
    ``await aclose()``) on shutdown to flush. ``trace_sample_rate`` is the share
    of non-denial decisions whose ``Decision.trace`` is kept; denials
    (forbid, ask, hide, block) always keep it. ``metrics``, when given, is fed
    from the writer thread, off the request path.
    """

    def __init__(
        self,
        sinks: Iterable[AuditSink],
        *,
        redaction: ArgumentRedaction | None = None,
        trace_sample_rate: float = 0.0,
        on_overflow: Literal["fail_closed", "drop"] = "fail_closed",
        queue_size: int = 10_000,
        batch_size: int = 500,
        retry_interval: float = 1.0,
        log_interval: float = 10.0,
        metrics: BastionMetrics | None = None,
    ) -> None:
        if on_overflow not in ("fail_closed", "drop"):
            raise ValueError(f"on_overflow must be 'fail_closed' or 'drop', not {on_overflow!r}")
        if not 0.0 <= trace_sample_rate <= 1.0:
            raise ValueError("trace_sample_rate must be between 0 and 1")
        self._states = [_SinkState(sink) for sink in sinks]
        if not self._states:
            raise ValueError("an audit trail needs at least one sink")
        self._redactor = (redaction or ArgumentRedaction()).compile()
        self.trace_sample_rate = trace_sample_rate
        self.on_overflow = on_overflow
        self._fail_closed = on_overflow == "fail_closed"
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.retry_interval = retry_interval
        self.log_interval = log_interval
        self.metrics = metrics
        self._queue: collections.deque[tuple[AuditEvent, float]] = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._in_flight = 0
        self._accepted = 0
        self._dropped = 0
        self._drop_lock = threading.Lock()
        self._unlogged_drops = 0
        self._last_drop_log = 0.0
        self._failing = False
        self._sink_failing = False
        self._busy = False
        self._closed = False
        self._stopping = False
        if metrics is not None:
            metrics.track_audit_queue(self._queue.__len__)
        self._thread = threading.Thread(target=self._run, name="bastion-audit-writer", daemon=True)
        self._thread.start()
        _live_trails.add(self)

    # -- the request path ---------------------------------------------------

    def on_decision(self, event: AuditEvent) -> None:
        """Queue ``event`` for recording; raise :class:`AuditError` when fail-closed audit cannot take it."""
        queue = self._queue
        if self._failing or self._closed or len(queue) >= self.queue_size:
            self._overflow(event)
            return
        queue.append((event, time.time()))
        self._accepted += 1
        wake = self._wake
        if not wake.is_set():
            wake.set()

    def _overflow(self, event: AuditEvent) -> None:
        if self._closed:
            why = "the audit trail is closed"
        elif self._failing:
            why = "an audit sink is failing"
        else:
            why = f"the audit queue is full ({self.queue_size} records)"
        if self._fail_closed:
            raise AuditError(f"decision not recorded: {why}")
        self._count_drop(1, why)

    def _count_drop(self, n: int, why: str) -> None:
        # Called from callers' threads and the writer: only this slow path locks.
        with self._drop_lock:
            self._dropped += n
            self._unlogged_drops += n
            now = time.monotonic()
            count = 0
            if now - self._last_drop_log >= self.log_interval:
                self._last_drop_log = now
                count, self._unlogged_drops = self._unlogged_drops, 0
            total = self._dropped
        if self.metrics is not None:
            self.metrics.audit_dropped(n)
        if count:
            log.error("audit dropped %d record(s): %s (total dropped: %d)", count, why, total)

    @property
    def healthy(self) -> bool:
        """False while a decision would not be recorded (a sink failing, the queue full, closed)."""
        return not (self._sink_failing or self._closed or len(self._queue) >= self.queue_size)

    @property
    def dropped(self) -> int:
        return self._dropped

    def stats(self) -> AuditStats:
        return AuditStats(
            accepted=self._accepted,
            written=min((s.written for s in self._states), default=0),
            dropped=self._dropped,
            queued=len(self._queue) + self._in_flight,
            healthy=self.healthy,
        )

    # -- the writer ---------------------------------------------------------

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait(self.retry_interval if self._sink_failing else None)
            self._wake.clear()
            # busy is raised before the first pop so that flush() never sees an
            # empty queue while a batch is neither queued nor written.
            self._busy = True
            while queue:
                batch: list[tuple[AuditEvent, float]] = []
                while queue and len(batch) < self.batch_size:
                    batch.append(queue.popleft())
                self._in_flight = len(batch)
                self._record(batch)
                self._in_flight = 0
            if self._sink_failing:
                self._deliver()
            self._busy = False
            with self._idle:
                self._idle.notify_all()
            if self._stopping and not queue:
                return

    def _record(self, batch: list[tuple[AuditEvent, float]]) -> None:
        records: list[dict[str, Any]] = []
        rate = self.trace_sample_rate
        for event, epoch in batch:
            try:
                keep = event.decision.effect in DENIAL_EFFECTS or (
                    rate > 0.0 and (rate >= 1.0 or random.random() < rate)
                )
                records.append(build_record(event, epoch, self._redactor, keep_trace=keep))
            except Exception:
                # A malformed event must not take the writer down with it.
                log.exception("audit could not build a record for %r", event.target)
                self._count_drop(1, "the event could not be turned into a record")
                continue
            if self.metrics is not None:
                try:
                    self.metrics.observe(event)
                except Exception:
                    log.exception("metrics failed to observe an audit event")
        for state in self._states:
            state.backlog.extend(records)
        self._deliver()

    def _deliver(self) -> None:
        failing = False
        for state in self._states:
            while state.backlog:
                chunk = state.backlog[: self.batch_size]
                try:
                    state.sink.write(chunk)
                except Exception as exc:
                    self._sink_failed(state, exc)
                    break
                del state.backlog[: len(chunk)]
                state.written += len(chunk)
                if state.failing:
                    state.failing = False
                    log.warning("audit sink %r recovered", state.sink)
            failing = failing or state.failing
        self._sink_failing = failing
        self._failing = failing and self._fail_closed
        if self.metrics is not None:
            self.metrics.audit_healthy(not failing)

    def _sink_failed(self, state: _SinkState, exc: Exception) -> None:
        if not state.failing or state.last_error != str(exc):
            log.error("audit sink %r failed: %s", state.sink, exc)
        state.last_error = str(exc)
        state.failing = True
        if self._fail_closed:
            return
        self._count_drop(len(state.backlog), f"audit sink {state.sink!r} failed: {exc}")
        state.backlog.clear()

    # -- flushing and shutdown -----------------------------------------------

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every accepted record was handed to the sinks; False on timeout or failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._queue or self._busy or any(s.backlog for s in self._states):
                if not self._thread.is_alive():
                    return False
                self._wake.set()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    async def aflush(self, timeout: float | None = 10.0) -> bool:
        """:meth:`flush` without blocking the event loop."""
        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting decisions, write everything queued, close the sinks.

        Records a failing sink still could not take after ``timeout`` seconds
        are reported in the log (with their count), never discarded silently.
        """
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        lost = sum(len(s.backlog) for s in self._states) + len(self._queue)
        if lost:
            log.error("audit trail closed with %d record(s) not written", lost)
            self._count_drop(lost, "the audit trail closed before a failing sink recovered")
        for state in self._states:
            try:
                state.sink.close()
            except Exception:
                log.exception("audit sink %r failed to close", state.sink)
        _live_trails.discard(self)

    async def aclose(self, timeout: float = 10.0) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> AuditTrail:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
