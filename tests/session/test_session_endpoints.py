"""The approval HTTP API, served by uvicorn on 127.0.0.1 and called over HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request

from bastion.errors import AuthError
from bastion.events import Identity
from bastion.session import (
    Approval,
    ApprovalService,
    MemoryStore,
    RedisStore,
    SessionStore,
    approval_routes,
)

from .conftest import free_port

AGENT = Identity(subject="agent-1")
TOKENS = {
    "boss-token": Identity(subject="boss", groups=("mail-approvers",)),
    "ops-token": Identity(subject="ops", groups=("infra-approvers",)),
}
ARGS = {"to": "bob@example.com"}


def resolve_identity(request: Request) -> Identity:
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    if token not in TOKENS:
        raise AuthError("approver token missing or unknown", headers={"WWW-Authenticate": "Bearer"})
    return TOKENS[token]


async def authorize(approver: Identity, approval: Approval) -> bool:
    if approval.tool.startswith("email__"):
        return "mail-approvers" in approver.groups
    return "infra-approvers" in approver.groups


@dataclass
class ApprovalApi:
    service: ApprovalService
    client: httpx.Client


def serve(store: SessionStore) -> Iterator[ApprovalApi]:
    service = ApprovalService(store)
    app = Starlette(
        routes=approval_routes(service, resolve_identity=resolve_identity, authorize=authorize)
    )
    # uvicorn serves this bound socket, so no other process can take the port meanwhile
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("approval API server did not start")
        time.sleep(0.01)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        yield ApprovalApi(service, client)
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def api() -> Iterator[ApprovalApi]:
    # The memory store is shared between the test's loop and the server's thread.
    yield from serve(MemoryStore())


def as_(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {who}-token"}


async def test_the_pending_list_shows_only_what_the_approver_may_decide(api: ApprovalApi) -> None:
    mail = await api.service.create(AGENT, "email__send", ARGS, reason="mail")
    infra = await api.service.create(AGENT, "k8s__delete_pod", {"pod": "web-1"})
    boss = api.client.get("/approvals", headers=as_("boss"))
    ops = api.client.get("/approvals", headers=as_("ops"))
    assert boss.status_code == 200
    assert [a["id"] for a in boss.json()["approvals"]] == [mail.id]
    assert boss.json()["approvals"][0]["arguments"] == ARGS
    assert [a["id"] for a in ops.json()["approvals"]] == [infra.id]


async def test_approving_over_http_lets_the_call_pass_once(api: ApprovalApi) -> None:
    approval = await api.service.create(AGENT, "email__send", ARGS)
    response = api.client.post(f"/approvals/{approval.id}/approve", headers=as_("boss"))
    assert response.status_code == 200
    assert response.json()["status"] == "approved" and response.json()["decided_by"] == "boss"
    assert await api.service.consume(AGENT, "email__send", ARGS) is True
    assert await api.service.consume(AGENT, "email__send", ARGS) is False


async def test_denying_over_http_keeps_the_call_blocked(api: ApprovalApi) -> None:
    approval = await api.service.create(AGENT, "email__send", ARGS)
    response = api.client.post(f"/approvals/{approval.id}/deny", headers=as_("boss"))
    assert response.json()["status"] == "denied"
    assert await api.service.consume(AGENT, "email__send", ARGS) is False


async def test_an_approver_the_policy_refuses_gets_403_and_nothing_is_decided(
    api: ApprovalApi,
) -> None:
    approval = await api.service.create(AGENT, "email__send", ARGS)
    assert (
        api.client.post(f"/approvals/{approval.id}/approve", headers=as_("ops")).status_code == 403
    )
    assert api.client.get(f"/approvals/{approval.id}", headers=as_("ops")).status_code == 403
    shown = api.client.get(f"/approvals/{approval.id}", headers=as_("boss"))
    assert shown.json()["status"] == "pending"


async def test_without_a_valid_approver_credential_the_api_answers_401(api: ApprovalApi) -> None:
    approval = await api.service.create(AGENT, "email__send", ARGS)
    response = api.client.post(f"/approvals/{approval.id}/approve")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert (
        api.client.get("/approvals", headers={"Authorization": "Bearer forged"}).status_code == 401
    )
    assert (await api.service.get(approval.id)).status == "pending"  # type: ignore[union-attr]


async def test_unknown_ids_get_404_and_second_decisions_409(api: ApprovalApi) -> None:
    assert api.client.post("/approvals/nope/approve", headers=as_("boss")).status_code == 404
    assert api.client.get("/approvals/nope", headers=as_("boss")).status_code == 404
    approval = await api.service.create(AGENT, "email__send", ARGS)
    assert (
        api.client.post(f"/approvals/{approval.id}/approve", headers=as_("boss")).status_code == 200
    )
    second = api.client.post(f"/approvals/{approval.id}/deny", headers=as_("boss"))
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "conflict"


def test_a_failing_store_answers_503() -> None:
    for api in serve(RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)):
        response = api.client.get("/approvals", headers=as_("boss"))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "store_unavailable"
        assert api.client.post("/approvals/x/approve", headers=as_("boss")).status_code == 503
