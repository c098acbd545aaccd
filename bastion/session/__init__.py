"""Session state: MCP taint, approvals, rate and budget limits, tool pins.

Everything stateful in Bastion goes through one :class:`SessionStore`:
:class:`MemoryStore` (one process, the default) or :class:`RedisStore` (several
processes or hosts; extra ``[redis]``, imported only when used). A store
failure - Redis unreachable, a timeout, malformed data, a full memory store -
raises :class:`bastion.errors.StoreError`; callers must then deny. No method
returns "no state" on error. Arguments with no canonical JSON form (NaN, non-JSON
values) raise :class:`ValueError` from the approval methods: deny those too.

A :class:`MemoryStore` may be shared by threads and event loops. A
:class:`RedisStore` belongs to the event loop that first uses it (redis-py's
asyncio pool); create one per loop. Run Redis with ``maxmemory-policy
noeviction`` so memory pressure fails writes (closed) instead of evicting state.

Quick start::

    state = SessionServices.open("redis://127.0.0.1:6379/0")   # or open() for memory
    key = SessionKey.from_request(identity, request_headers)

    await state.taint.mark_tainted(key, "web__fetch", page_text)
    context = (await state.taint.get_taint(key)).apply(context)

    if decision.effect is Effect.ASK:
        if not await state.approvals.consume(identity, call.name, call.arguments):
            approval = await state.approvals.create(identity, call.name, call.arguments, reason=...)
            ...refuse the call, citing approval.id...

    status = await state.limits.check_and_count(identity, "github__create_*", 10, 60)
    report = await state.pins.check("github", upstream_tools)   # report.drifted, .changed

Session keys (MCP taint)
    ``SessionKey.from_request(identity, headers, protocol_version=None,
    conversation_header="x-bastion-conversation")``. Handshake revisions
    (before 2026-07-28): the ``Mcp-Session-Id`` header. Stateless 2026-07-28
    revision (or no session id): the conversation header, else the identity
    alone (all such requests of one identity share one state - the safe
    direction for taint). The identity's tenant and subject are always part of
    the key, so sending another caller's session id reaches a different, empty
    state. All anonymous callers share the subject ``anonymous``: do not grant
    approvals to anonymous identities.

Taint: :class:`TaintTracker`
    ``mark_tainted(key, source_tool, text=None)``, ``get_taint(key) ->
    TaintState(tainted, sources, untrusted_texts)``, ``clear(key)``;
    ``TaintState.apply(context)`` merges it into a :class:`bastion.events.Context`.
    Taint lasts ``ttl`` (24 h) after the latest mark. Untrusted texts are
    capped at ``max_text_bytes`` (256 KiB) per session, newest kept.

Approvals: :class:`ApprovalService`
    ``create(identity, tool, args, reason=, ttl=, session=) -> Approval``,
    ``create_approval(...) -> id``, ``get(id)``, ``pending()``,
    ``approve(id, approver, authorize=None)``, ``deny(...)``,
    ``consume(identity, tool, args) -> bool`` (true exactly once, atomically, for
    the identical call; a changed argument does not match). Bound to sha256 of
    tenant + subject + tool + canonical JSON (:func:`canonical_json`: sorted
    keys, no whitespace, NFC). Ids are 192-bit random. Self-approval is refused
    by default. :func:`approval_routes` gives Starlette routes (GET pending, GET
    one, POST approve/deny) taking ``resolve_identity(request)`` and
    ``authorize(approver, approval)``.

Limits: :class:`RateLimiter`
    ``check_and_count(identity, bucket, limit, window, amount=1) ->
    LimitStatus(allowed, count, limit, remaining, reset_at)`` (atomic; refused
    calls are not counted), ``check(...)`` and ``add(...)`` for token budgets.
    Fixed windows aligned to the epoch.

Pins: :class:`ToolPins`
    ``check(server, tools) -> PinReport(first_seen, added, removed, changed)``
    (``changed``: tool -> fields), ``accept(server, tools)``, ``forget(server)``.
    Per server, global across identities: the upstream server is shared, and
    a rug pull affects everyone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.session.approvals import (
    Approval,
    ApprovalConflict,
    ApprovalNotFound,
    ApprovalService,
    ApprovalStatus,
    Authorize,
    approval_binding,
)
from bastion.session.endpoints import ResolveIdentity, approval_routes
from bastion.session.keys import SessionKey, canonical_json, digest
from bastion.session.limits import LimitStatus, RateLimiter
from bastion.session.memory import MemoryStore
from bastion.session.pins import PinReport, ToolPins, tool_fingerprint
from bastion.session.redis_store import RedisStore  # imports redis-py only when constructed
from bastion.session.store import SessionStore, WindowCount, open_store
from bastion.session.taint import TaintState, TaintTracker

__all__ = [
    "Approval",
    "ApprovalConflict",
    "ApprovalNotFound",
    "ApprovalService",
    "ApprovalStatus",
    "Authorize",
    "LimitStatus",
    "MemoryStore",
    "PinReport",
    "RateLimiter",
    "RedisStore",
    "ResolveIdentity",
    "SessionKey",
    "SessionServices",
    "SessionStore",
    "TaintState",
    "TaintTracker",
    "ToolPins",
    "WindowCount",
    "approval_binding",
    "approval_routes",
    "canonical_json",
    "digest",
    "open_store",
    "tool_fingerprint",
]


@dataclass(frozen=True, slots=True)
class SessionServices:
    """Every session service over one store, for adapters and the gateway."""

    store: SessionStore
    taint: TaintTracker
    approvals: ApprovalService
    limits: RateLimiter
    pins: ToolPins

    @classmethod
    def over(cls, store: SessionStore) -> SessionServices:
        """The services over ``store`` with their default settings."""
        return cls(
            store, TaintTracker(store), ApprovalService(store), RateLimiter(store), ToolPins(store)
        )

    @classmethod
    def open(cls, url: str | None = None, **options: Any) -> SessionServices:
        """The services over :func:`open_store` ``(url, **options)``."""
        return cls.over(open_store(url, **options))

    async def aclose(self) -> None:
        await self.store.aclose()
