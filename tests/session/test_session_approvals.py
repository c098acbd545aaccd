"""Approvals: bound to the exact call, passing exactly once, expiring."""

from __future__ import annotations

import asyncio

import pytest

from bastion.errors import AuthError
from bastion.events import Identity
from bastion.session import (
    Approval,
    ApprovalConflict,
    ApprovalNotFound,
    ApprovalService,
    ApprovalStatus,
)

from .conftest import Backend

AGENT = Identity(subject="agent-1", tenant="acme")
OTHER_AGENT = Identity(subject="agent-2", tenant="acme")
APPROVER = Identity(subject="boss", tenant="acme", groups=("approvers",))
TOOL = "email__send"
ARGS = {"to": "bob@example.com", "body": "hello", "cc": ["carol@example.com"]}


def service(backend: Backend, **options: float) -> ApprovalService:
    return ApprovalService(backend.store, clock=backend.clock, **options)  # type: ignore[arg-type]


async def approved(svc: ApprovalService) -> Approval:
    approval = await svc.create(AGENT, TOOL, ARGS, reason="sending mail needs approval")
    return await svc.approve(approval.id, APPROVER)


async def test_no_approval_means_no_pass(backend: Backend) -> None:
    assert await service(backend).consume(AGENT, TOOL, ARGS) is False


async def test_a_pending_approval_does_not_pass(backend: Backend) -> None:
    svc = service(backend)
    await svc.create(AGENT, TOOL, ARGS)
    assert await svc.consume(AGENT, TOOL, ARGS) is False


async def test_an_approved_call_passes_exactly_once(backend: Backend) -> None:
    svc = service(backend)
    approval = await approved(svc)
    assert await svc.consume(AGENT, TOOL, ARGS) is True
    assert await svc.consume(AGENT, TOOL, ARGS) is False
    record = await svc.get(approval.id)
    assert record is not None and record.status is ApprovalStatus.CONSUMED


async def test_a_changed_argument_does_not_consume_the_approval(backend: Backend) -> None:
    svc = service(backend)
    await approved(svc)
    assert await svc.consume(AGENT, TOOL, {**ARGS, "to": "mallory@evil.example"}) is False
    assert await svc.consume(AGENT, TOOL, {**ARGS, "cc": ["carol@example.com", "x@y.z"]}) is False
    assert await svc.consume(AGENT, "email__send_all", ARGS) is False
    assert await svc.consume(AGENT, TOOL, ARGS) is True


async def test_key_order_and_unicode_form_do_not_change_the_call(backend: Backend) -> None:
    svc = service(backend)
    approval = await svc.create(AGENT, TOOL, {"to": "Jos\u00e9", "body": "hi"})
    await svc.approve(approval.id, APPROVER)
    assert await svc.consume(AGENT, TOOL, {"body": "hi", "to": "Jose\u0301"}) is True


async def test_another_identity_cannot_consume_the_approval(backend: Backend) -> None:
    svc = service(backend)
    await approved(svc)
    assert await svc.consume(OTHER_AGENT, TOOL, ARGS) is False
    assert await svc.consume(Identity(subject="agent-1", tenant="globex"), TOOL, ARGS) is False
    assert await svc.consume(AGENT, TOOL, ARGS) is True


async def test_concurrent_consumes_let_exactly_one_through(backend: Backend) -> None:
    svc = service(backend)
    await approved(svc)
    results = await asyncio.gather(*(svc.consume(AGENT, TOOL, ARGS) for _ in range(10)))
    assert results.count(True) == 1


async def test_a_denied_approval_never_passes(backend: Backend) -> None:
    svc = service(backend)
    approval = await svc.create(AGENT, TOOL, ARGS)
    denied = await svc.deny(approval.id, APPROVER)
    assert denied.status is ApprovalStatus.DENIED and denied.decided_by == "boss"
    assert await svc.consume(AGENT, TOOL, ARGS) is False


async def test_a_decided_approval_cannot_be_decided_again(backend: Backend) -> None:
    svc = service(backend)
    approval = await approved(svc)
    with pytest.raises(ApprovalConflict):
        await svc.approve(approval.id, APPROVER)
    with pytest.raises(ApprovalConflict):
        await svc.deny(approval.id, APPROVER)


async def test_a_pending_approval_expires(backend: Backend) -> None:
    svc = service(backend)
    approval = await svc.create(AGENT, TOOL, ARGS, ttl=0.3)
    await backend.advance(0.45)
    assert await svc.get(approval.id) is None
    with pytest.raises(ApprovalNotFound):
        await svc.approve(approval.id, APPROVER)
    assert await svc.consume(AGENT, TOOL, ARGS) is False


async def test_an_unused_grant_expires(backend: Backend) -> None:
    svc = service(backend, grant_ttl=0.3)
    await approved(svc)
    await backend.advance(0.45)
    assert await svc.consume(AGENT, TOOL, ARGS) is False


async def test_an_identity_cannot_approve_its_own_call(backend: Backend) -> None:
    svc = service(backend)
    approval = await svc.create(AGENT, TOOL, ARGS)
    with pytest.raises(AuthError) as info:
        await svc.approve(approval.id, AGENT)
    assert info.value.status == 403
    assert (await svc.get(approval.id)).status is ApprovalStatus.PENDING  # type: ignore[union-attr]


async def test_the_authorize_callback_can_refuse_an_approver(backend: Backend) -> None:
    svc = service(backend)
    approval = await svc.create(AGENT, TOOL, ARGS)

    def only_approvers(approver: Identity, pending: Approval) -> bool:
        return "approvers" in approver.groups and pending.tool == TOOL

    with pytest.raises(AuthError):
        await svc.approve(approval.id, OTHER_AGENT, only_approvers)
    assert await svc.consume(AGENT, TOOL, ARGS) is False
    await svc.approve(approval.id, APPROVER, only_approvers)
    assert await svc.consume(AGENT, TOOL, ARGS) is True


async def test_an_async_authorize_callback_is_awaited(backend: Backend) -> None:
    svc = service(backend)
    approval = await svc.create(AGENT, TOOL, ARGS)

    async def nobody(approver: Identity, pending: Approval) -> bool:
        return False

    with pytest.raises(AuthError):
        await svc.deny(approval.id, APPROVER, nobody)


async def test_asking_again_for_the_same_call_reuses_the_pending_approval(backend: Backend) -> None:
    svc = service(backend)
    first = await svc.create(AGENT, TOOL, ARGS)
    again = await svc.create(AGENT, TOOL, dict(reversed(list(ARGS.items()))))
    other = await svc.create(AGENT, TOOL, {**ARGS, "body": "bye"})
    assert again.id == first.id
    assert other.id != first.id
    assert {a.id for a in await svc.pending()} == {first.id, other.id}


async def test_pending_lists_only_undecided_approvals(backend: Backend) -> None:
    svc = service(backend)
    kept = await svc.create(AGENT, TOOL, ARGS)
    decided = await svc.create(AGENT, TOOL, {**ARGS, "body": "x"})
    await svc.deny(decided.id, APPROVER)
    pending = await svc.pending()
    assert [a.id for a in pending] == [kept.id]
    assert pending[0].arguments == ARGS


async def test_after_a_denial_the_same_call_can_be_asked_again(backend: Backend) -> None:
    svc = service(backend)
    first = await svc.create(AGENT, TOOL, ARGS)
    await svc.deny(first.id, APPROVER)
    second = await svc.create(AGENT, TOOL, ARGS)
    assert second.id != first.id and second.status is ApprovalStatus.PENDING


async def test_approval_ids_are_long_random_tokens(backend: Backend) -> None:
    svc = service(backend)
    ids = {await svc.create_approval(AGENT, TOOL, {"n": n}) for n in range(5)}
    assert len(ids) == 5
    assert all(len(i) >= 32 for i in ids)


async def test_arguments_without_a_canonical_form_are_refused(backend: Backend) -> None:
    svc = service(backend)
    with pytest.raises(ValueError):
        await svc.create(AGENT, TOOL, {"n": float("inf")})


async def test_a_short_lived_approval_does_not_hide_a_long_lived_one(backend: Backend) -> None:
    svc = service(backend)
    long_lived = await svc.create(AGENT, TOOL, ARGS, ttl=60)
    await svc.create(AGENT, TOOL, {**ARGS, "body": "short"}, ttl=0.3)
    await backend.advance(0.45)
    assert [a.id for a in await svc.pending()] == [long_lived.id]
