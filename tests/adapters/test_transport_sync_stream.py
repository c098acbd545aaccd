"""The sync transport's checks: in the caller's thread for a guard tied to no event loop,
on the guard's background loop for one that is (then no loop hop per stream chunk either)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from codec_streams import chat_completion, serving, sse
from conftest import AuditLog

from bastion.adapters.pipeline import Guard
from bastion.adapters.transport import BastionTransport
from bastion.events import AuditEvent, Identity
from bastion.session import MemoryStore, SessionServices

TEXT = {"choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": None}]}
USER = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
RESPONSE_WITH_CALL = json.dumps(
    chat_completion(("c1", "delete_repo", '{"repo": "x"}'), model="gpt-test")
).encode()


def call_chunk(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    fragment = {
        "index": 0,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    return {"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}, "finish_reason": None}]}


def read_stream(url: str, guard: Guard) -> str:
    transport = BastionTransport(httpx.HTTPTransport(), guard=guard)
    with (
        httpx.Client(transport=transport) as http,
        http.stream("POST", f"{url}/v1/chat/completions", json=USER) as response,
    ):
        return b"".join(response.iter_raw()).decode()


class LoopBoundStore(MemoryStore):
    """A store that says it belongs to one event loop, as a RedisStore does."""

    loop_bound = True


@pytest.fixture(params=["caller", "background"])
def checks_on(request: pytest.FixtureRequest) -> str:
    """Where the checks should run: the caller's thread, or the guard's background loop."""
    return str(request.param)


def expected_thread(checks_on: str) -> str:
    return "bastion-guard-loop" if checks_on == "background" else threading.current_thread().name


def guard_options(checks_on: str, **options: Any) -> dict[str, Any]:
    if checks_on == "background":
        options["session"] = SessionServices.over(LoopBoundStore())
    return options


def recording_threads(audit: AuditLog) -> tuple[Callable[[AuditEvent], None], list[str]]:
    threads: list[str] = []

    def hook(event: AuditEvent) -> None:
        threads.append(threading.current_thread().name)
        audit(event)

    return hook, threads


def test_a_forbidden_call_in_a_sync_stream_is_decided_where_the_guard_runs(
    serve: Any, make_guard: Any, agent: str, audit: AuditLog, checks_on: str
) -> None:
    stream = sse(TEXT) * 50 + sse(call_chunk("c1", "delete_repo", '{"repo": "x"}'))
    stream += sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    stream += b"data: [DONE]\n\n"
    hook, threads = recording_threads(audit)
    with serve(serving("/v1/chat/completions", stream)) as url:
        text = read_stream(
            url, make_guard(**guard_options(checks_on, identity=Identity(agent), on_decision=hook))
        )
    assert text.count('"hello"') == 50
    assert "delete_repo" in text and "blocked by policy" in text and '"tool_calls"' not in text
    assert threads and set(threads) == {expected_thread(checks_on)}


def test_a_broken_sync_stream_ends_with_an_error_audited_where_the_guard_runs(
    serve: Any, make_guard: Any, agent: str, audit: AuditLog, checks_on: str
) -> None:
    stream = sse(TEXT) * 50 + b'data: {"choices": "\xff"}\n\n' + sse(TEXT)
    hook, threads = recording_threads(audit)
    with serve(serving("/v1/chat/completions", stream)) as url:
        text = read_stream(
            url, make_guard(**guard_options(checks_on, identity=Identity(agent), on_decision=hook))
        )
    assert text.count('"hello"') == 50
    error = json.loads(text.rsplit("data: ", 1)[1])
    assert error["error"]["code"] == "invalid_utf8"
    assert audit.errors() == ["invalid_utf8"]
    assert threads and set(threads) == {expected_thread(checks_on)}


def test_an_uninspectable_upstream_reply_is_refused_and_audited_where_the_guard_runs(
    serve: Any, make_guard: Any, agent: str, audit: AuditLog, checks_on: str
) -> None:
    hook, threads = recording_threads(audit)
    upstream = serving("/v1/chat/completions", b"plain words", media_type="text/plain")
    transport = BastionTransport(
        httpx.HTTPTransport(),
        guard=make_guard(**guard_options(checks_on, identity=Identity(agent), on_decision=hook)),
    )
    with serve(upstream) as url, httpx.Client(transport=transport) as http:
        reply = http.post(f"{url}/v1/chat/completions", json={**USER, "stream": False})
    assert reply.status_code == 502
    assert reply.json()["error"]["code"] == "invalid_content_type"
    assert audit.errors() == ["invalid_content_type"]
    assert threads and set(threads) == {expected_thread(checks_on)}


def test_a_rewritten_request_reaches_the_upstream_rewritten(
    serve: Any, make_guard: Any, agent: str
) -> None:
    # A tool output the policy redacts: the forwarded body must be Bastion's, not the agent's.
    body = {
        "model": "gpt-test",
        "messages": [
            {"role": "user", "content": "debug"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "d1",
                        "type": "function",
                        "function": {"name": "debug_dump", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "d1", "content": "internal state"},
        ],
    }
    app = serving("/v1/chat/completions", b'{"choices": []}', media_type="application/json")
    transport = BastionTransport(httpx.HTTPTransport(), guard=make_guard(identity=Identity(agent)))
    with serve(app) as url, httpx.Client(transport=transport) as http:
        http.post(f"{url}/v1/chat/completions", json=body)
        http.post(f"{url}/v1/chat/completions", json=USER)
    rewritten, untouched = app.state.received
    assert "internal state" not in json.dumps(rewritten)
    assert untouched == USER


def test_the_loop_of_a_callers_thread_is_closed_when_the_thread_ends(
    serve: Any, make_guard: Any, agent: str
) -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    def hook(event: AuditEvent) -> None:
        loops.append(asyncio.get_running_loop())

    app = serving("/v1/chat/completions", RESPONSE_WITH_CALL, media_type="application/json")
    transport = BastionTransport(
        httpx.HTTPTransport(), guard=make_guard(identity=Identity(agent), on_decision=hook)
    )
    replies: list[int] = []
    with serve(app) as url, httpx.Client(transport=transport) as http:

        def agent_thread() -> None:
            body = {**USER, "stream": False}
            replies.append(http.post(f"{url}/v1/chat/completions", json=body).status_code)

        worker = threading.Thread(target=agent_thread)
        worker.start()
        worker.join()
    gc.collect()
    assert replies == [200]
    assert loops and all(loop is loops[0] for loop in loops)
    assert loops[0].is_closed()


async def test_a_sync_client_inside_async_code_is_checked_on_the_background_loop(
    serve: Any, make_guard: Any, agent: str, audit: AuditLog
) -> None:
    # This thread already runs a loop, so the transport cannot start its own here.
    hook, threads = recording_threads(audit)
    app = serving("/v1/chat/completions", RESPONSE_WITH_CALL, media_type="application/json")
    transport = BastionTransport(
        httpx.HTTPTransport(), guard=make_guard(identity=Identity(agent), on_decision=hook)
    )
    with serve(app) as url, httpx.Client(transport=transport) as http:
        reply = http.post(f"{url}/v1/chat/completions", json={**USER, "stream": False})
    assert reply.status_code == 200
    assert "delete_repo" not in json.dumps(reply.json()["choices"][0]["message"].get("tool_calls"))
    assert [e.decision.effect.value for e in audit.events if e.target == "delete_repo"] == [
        "forbid"
    ]
    assert threads and set(threads) == {"bastion-guard-loop"}


async def _async_identity(headers: Any) -> Identity:
    return Identity("async-agent")


def test_a_guard_is_loop_bound_when_a_part_of_it_belongs_to_one_loop(policy: Any) -> None:
    from bastion.identity import IdentityResolver
    from bastion.quarantine import Quarantine, QuarantineConfig
    from bastion.session.redis_store import RedisStore

    assert not Guard(policy).loop_bound
    assert not Guard(policy, identity=Identity("a")).loop_bound
    assert not Guard(policy, identity=lambda headers: Identity("a")).loop_bound
    assert Guard(policy, identity=_async_identity).loop_bound
    assert Guard(policy, identity=IdentityResolver()).loop_bound
    assert Guard(policy, session=SessionServices.over(LoopBoundStore())).loop_bound
    redis = RedisStore("redis://127.0.0.1:1/0")
    assert Guard(policy, session=SessionServices.over(redis)).loop_bound
    quarantine = Quarantine(QuarantineConfig(base_url="http://127.0.0.1:1/v1", model="m"))
    assert Guard(policy, quarantine=quarantine).loop_bound


REQUEST_SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("request_seen", default="")
INSIDE: contextvars.ContextVar[str] = contextvars.ContextVar("inside", default="")


class WaitingStore(MemoryStore):
    """A store tied to no loop whose reads and writes really wait (a timer, then a bare yield)."""

    loop_bound = False

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.waits = 0

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        timer: asyncio.Future[None] = loop.create_future()
        loop.call_later(0.001, timer.set_result, None)
        await timer
        await asyncio.sleep(0)
        self.waits += 1
        if self.fail:
            from bastion.errors import StoreError

            raise StoreError("store went away")

    async def get(self, key: str) -> bytes | None:
        INSIDE.set("set inside the checks")  # as libraries do; must not reach the caller
        await self._wait()
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._wait()
        await super().set(key, value, ttl)


def test_checks_that_really_wait_finish_on_the_callers_loop(
    serve: Any, make_guard: Any, agent: str, audit: AuditLog
) -> None:
    store = WaitingStore()
    seen: list[tuple[str, str]] = []

    def hook(event: AuditEvent) -> None:
        seen.append((threading.current_thread().name, REQUEST_SEEN.get()))
        audit(event)

    guard = make_guard(
        identity=Identity(agent), on_decision=hook, session=SessionServices.over(store)
    )
    assert not guard.loop_bound
    app = serving("/v1/chat/completions", RESPONSE_WITH_CALL, media_type="application/json")
    transport = BastionTransport(httpx.HTTPTransport(), guard=guard)
    token = REQUEST_SEEN.set("the caller's value")
    try:
        with serve(app) as url, httpx.Client(transport=transport) as http:
            reply = http.post(f"{url}/v1/chat/completions", json={**USER, "stream": False})
    finally:
        REQUEST_SEEN.reset(token)
    assert store.waits >= 2  # the user texts were read and stored, each after a real wait
    assert reply.status_code == 200
    message = reply.json()["choices"][0]["message"]
    assert "tool_calls" not in message and "delete_repo" in message["content"]
    assert seen and set(seen) == {(threading.current_thread().name, "the caller's value")}
    assert INSIDE.get() == ""  # the checks ran in a copy of the caller's context


def test_a_store_failing_after_a_wait_denies_the_request(
    serve: Any, make_guard: Any, agent: str, audit: AuditLog
) -> None:
    store = WaitingStore(fail=True)
    guard = make_guard(identity=Identity(agent), session=SessionServices.over(store))
    app = serving("/v1/chat/completions", RESPONSE_WITH_CALL, media_type="application/json")
    transport = BastionTransport(httpx.HTTPTransport(), guard=guard)
    with serve(app) as url, httpx.Client(transport=transport) as http:
        reply = http.post(f"{url}/v1/chat/completions", json={**USER, "stream": False})
    assert store.waits == 1
    assert reply.status_code == 503
    assert app.state.received == []
    assert audit.errors() == ["store_unavailable"]


def test_one_sync_transport_serves_many_threads_at_once(
    serve: Any, make_guard: Any, agent: str, audit: AuditLog
) -> None:
    # Each caller thread checks on its own loop now: the guard's shared state
    # (catalog, caches, store, audit hook) meets real concurrency.
    app = serving("/v1/chat/completions", RESPONSE_WITH_CALL, media_type="application/json")
    transport = BastionTransport(httpx.HTTPTransport(), guard=make_guard(identity=Identity(agent)))
    replies: list[dict[str, Any]] = []
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    with serve(app) as url, httpx.Client(transport=transport) as http:

        def caller(n: int) -> None:
            start.wait()
            try:
                for i in range(15):
                    body = {
                        **USER,
                        "stream": False,
                        "messages": [{"role": "user", "content": f"{n}-{i}"}],
                    }
                    replies.append(http.post(f"{url}/v1/chat/completions", json=body).json())
            except BaseException as exc:  # reported below, with the thread's other failures
                failures.append(exc)

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    assert len(replies) == 120
    for reply in replies:
        message = reply["choices"][0]["message"]
        assert "tool_calls" not in message and "delete_repo" in message["content"]
    refused = [e for e in audit.events if e.target == "delete_repo"]
    assert len(refused) == 120 and {e.decision.effect.value for e in refused} == {"forbid"}
    assert len(app.state.received) == 120
