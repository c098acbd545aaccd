"""Human approvals for ``ask`` decisions, bound to the exact call they approve."""

from __future__ import annotations

import enum
import inspect
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from bastion.errors import AuthError, BastionError, StoreError
from bastion.events import Identity
from bastion.session.keys import canonical_json, digest
from bastion.session.store import SessionStore

__all__ = [
    "Approval",
    "ApprovalConflict",
    "ApprovalNotFound",
    "ApprovalService",
    "ApprovalStatus",
    "Authorize",
    "approval_binding",
]

_PENDING_INDEX = "approvals:pending"


class ApprovalStatus(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    CONSUMED = "consumed"


class ApprovalNotFound(BastionError):
    """No such approval, or it expired (HTTP 404)."""


class ApprovalConflict(BastionError):
    """The approval was already decided (HTTP 409)."""


@dataclass(frozen=True, slots=True)
class Approval:
    """One approval request and its state. ``arguments`` are shown to the approver."""

    id: str
    binding: str
    subject: str
    tenant: str | None
    tool: str
    arguments: Mapping[str, Any]
    reason: str
    status: ApprovalStatus
    created_at: float
    expires_at: float
    session: str | None = None
    decided_by: str | None = None
    decided_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view (for the approval API and audit)."""
        data = asdict(self)
        data["status"] = self.status.value
        data["arguments"] = dict(self.arguments)
        return data

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> Approval:
        try:
            raw = json.loads(data)
            return cls(
                id=str(raw["id"]),
                binding=str(raw["binding"]),
                subject=str(raw["subject"]),
                tenant=raw["tenant"],
                tool=str(raw["tool"]),
                arguments=dict(raw["arguments"]),
                reason=str(raw["reason"]),
                status=ApprovalStatus(raw["status"]),
                created_at=float(raw["created_at"]),
                expires_at=float(raw["expires_at"]),
                session=raw.get("session"),
                decided_by=raw.get("decided_by"),
                decided_at=raw.get("decided_at"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError("session store holds a malformed approval record") from exc


Authorize = Callable[[Identity, Approval], bool | Awaitable[bool]]


def approval_binding(identity: Identity, tool: str, arguments: Mapping[str, Any]) -> str:
    """The hash an approval is bound to: tenant, subject, tool and canonical arguments.

    Raises :class:`ValueError` for arguments that have no canonical JSON form.
    """
    return digest("approval", identity.tenant, identity.subject, tool, dict(arguments))


async def _authorized(authorize: Authorize | None, approver: Identity, approval: Approval) -> bool:
    if authorize is None:
        return True
    verdict = authorize(approver, approval)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return verdict is True


class ApprovalService:
    """Pending approvals, decisions and one-time grants, in a :class:`SessionStore`.

    Flow: the adapter meets ``ask`` and calls :meth:`consume`; when that is
    false it calls :meth:`create` and refuses the call with the approval id. An
    approver approves through :meth:`approve` (usually via the endpoint from
    :func:`bastion.session.endpoints.approval_routes`). The agent's retry of the
    identical call then passes :meth:`consume` exactly once.

    - A pending approval waits ``ttl`` seconds (default ``default_ttl``); once
      approved, the grant may be consumed for ``grant_ttl`` seconds.
    - The binding covers identity (tenant and subject), tool and the canonical
      JSON of the arguments (sorted keys, no whitespace, NFC strings): any
      changed argument is a different call and finds no grant.
    - While a call has a pending approval, :meth:`create` for the same binding
      returns that one instead of queueing duplicates.
    - Approvers may not approve their own calls unless ``allow_self_approval``.
    - Every decision is one compare-and-set on the record, and consuming is one
      atomic take of the grant, so concurrent approvers or retries across
      processes cannot decide twice or pass twice.
    """

    def __init__(
        self,
        store: SessionStore,
        *,
        default_ttl: float = 15 * 60,
        grant_ttl: float = 10 * 60,
        allow_self_approval: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._default_ttl = default_ttl
        self._grant_ttl = grant_ttl
        self._allow_self = allow_self_approval
        self._clock = clock

    @staticmethod
    def _record(approval_id: str) -> str:
        return f"approval:{approval_id}"

    @staticmethod
    def _pending_for(binding: str) -> str:
        return f"approval-pending:{binding}"

    @staticmethod
    def _grant(binding: str) -> str:
        return f"approval-grant:{binding}"

    async def create(
        self,
        identity: Identity,
        tool: str,
        arguments: Mapping[str, Any],
        *,
        reason: str = "",
        ttl: float | None = None,
        session: str | None = None,
    ) -> Approval:
        """A pending approval for this exact call (an existing pending one if any)."""
        ttl = self._default_ttl if ttl is None else ttl
        binding = approval_binding(identity, tool, arguments)
        now = self._clock()
        approval = Approval(
            id=secrets.token_urlsafe(24),
            binding=binding,
            subject=identity.subject,
            tenant=identity.tenant,
            tool=tool,
            arguments=json.loads(canonical_json(dict(arguments))),
            reason=reason,
            status=ApprovalStatus.PENDING,
            created_at=now,
            expires_at=now + ttl,
            session=session,
        )
        if not await self._store.add(self._pending_for(binding), approval.id.encode(), ttl):
            existing_id = await self._store.get(self._pending_for(binding))
            if existing_id is not None:
                existing = await self.get(existing_id.decode("ascii", errors="replace"))
                if existing is not None and existing.status is ApprovalStatus.PENDING:
                    return existing
            # The pointer outlived its record (or raced with a decision): replace it.
            await self._store.set(self._pending_for(binding), approval.id.encode(), ttl)
        await self._store.set(self._record(approval.id), approval.encode(), ttl)
        await self._store.set_add(_PENDING_INDEX, [approval.id.encode()], ttl)
        return approval

    async def create_approval(
        self,
        identity: Identity,
        tool: str,
        arguments: Mapping[str, Any],
        reason: str = "",
        ttl: float | None = None,
    ) -> str:
        """Like :meth:`create`, returning only the approval id."""
        return (await self.create(identity, tool, arguments, reason=reason, ttl=ttl)).id

    async def get(self, approval_id: str) -> Approval | None:
        """The approval, or None when unknown or expired."""
        data = await self._store.get(self._record(approval_id))
        if data is None:
            return None
        approval = Approval.decode(data)
        if approval.id != approval_id:
            raise StoreError("session store returned an approval under the wrong id")
        return approval

    async def pending(self, limit: int = 100) -> list[Approval]:
        """Pending approvals, oldest first (at most ``limit``)."""
        ids = await self._store.set_members(_PENDING_INDEX)
        found: list[Approval] = []
        gone: list[bytes] = []
        for raw in ids:
            approval = await self.get(raw.decode("ascii", errors="replace"))
            if approval is None or approval.status is not ApprovalStatus.PENDING:
                gone.append(raw)
            else:
                found.append(approval)
        if gone:
            await self._store.set_remove(_PENDING_INDEX, gone)
        found.sort(key=lambda a: (a.created_at, a.id))
        return found[:limit]

    async def _decide(
        self,
        approval_id: str,
        approver: Identity,
        status: ApprovalStatus,
        authorize: Authorize | None,
    ) -> Approval:
        raw = await self._store.get(self._record(approval_id))
        if raw is None:
            raise ApprovalNotFound(f"approval {approval_id!r} does not exist or expired")
        approval = Approval.decode(raw)
        if approval.status is not ApprovalStatus.PENDING:
            raise ApprovalConflict(f"approval {approval_id!r} is already {approval.status.value}")
        if (
            not self._allow_self
            and approver.subject == approval.subject
            and approver.tenant == approval.tenant
        ):
            raise AuthError(
                "an identity may not approve its own call", status=403, code="forbidden"
            )
        if not await _authorized(authorize, approver, approval):
            raise AuthError(
                f"{approver.subject} may not decide approval {approval_id!r}",
                status=403,
                code="forbidden",
            )
        decided = replace(
            approval, status=status, decided_by=approver.subject, decided_at=self._clock()
        )
        keep = self._grant_ttl if status is ApprovalStatus.APPROVED else None
        if not await self._store.compare_and_set(
            self._record(approval_id), raw, decided.encode(), keep
        ):
            raise ApprovalConflict(f"approval {approval_id!r} was decided concurrently")
        if status is ApprovalStatus.APPROVED:
            await self._store.set(
                self._grant(approval.binding), approval.id.encode(), self._grant_ttl
            )
        await self._store.delete(self._pending_for(approval.binding))
        await self._store.set_remove(_PENDING_INDEX, [approval.id.encode()])
        return decided

    async def approve(
        self, approval_id: str, approver: Identity, authorize: Authorize | None = None
    ) -> Approval:
        """Approve a pending approval.

        ``authorize(approver, approval)`` (sync or async) is checked first: the
        integrator puts the policy's approver rule there; anything but ``True``
        refuses with :class:`AuthError` (403). Raises :class:`ApprovalNotFound`,
        :class:`ApprovalConflict` when not pending.
        """
        return await self._decide(approval_id, approver, ApprovalStatus.APPROVED, authorize)

    async def deny(
        self, approval_id: str, approver: Identity, authorize: Authorize | None = None
    ) -> Approval:
        """Deny a pending approval (same checks as :meth:`approve`)."""
        return await self._decide(approval_id, approver, ApprovalStatus.DENIED, authorize)

    async def consume(self, identity: Identity, tool: str, arguments: Mapping[str, Any]) -> bool:
        """True exactly once for an approved call identical to the one approved."""
        binding = approval_binding(identity, tool, arguments)
        granted = await self._store.take(self._grant(binding))
        if granted is None:
            return False
        approval_id = granted.decode("ascii", errors="replace")
        raw = await self._store.get(self._record(approval_id))
        if raw is not None:
            approval = Approval.decode(raw)
            consumed = replace(approval, status=ApprovalStatus.CONSUMED)
            await self._store.compare_and_set(self._record(approval_id), raw, consumed.encode())
        return True
