"""``BastionTransport`` / ``AsyncBastionTransport``: guard an agent's own HTTP client.

Wrap any transport of **httpx** or **httpx2** (the current openai, anthropic
and mcp SDKs take httpx2 clients); the library is detected from the request
each call receives, so one class serves both::

    client = openai.OpenAI(http_client=httpx2.Client(
        transport=BastionTransport(httpx2.HTTPTransport(), policy=policy)))
    async with httpx2.AsyncClient(transport=AsyncBastionTransport(
            httpx2.AsyncHTTPTransport(), policy=policy)) as http: ...

Without a wrapped transport, the default HTTP transport of the request's
library is created on first use. The surface is the transport contract and
nothing more: ``handle_request`` / ``handle_async_request``, ``close`` /
``aclose`` (and the context-manager methods clients call).

Both classes drive the one :class:`~bastion.adapters.pipeline.Guard`
pipeline, which is async (session store, approvals, quarantine). The sync
transport runs it in the caller's own thread, on an event loop kept for that
thread, when no part of the guard belongs to one loop (``Guard.loop_bound``:
the in-memory store, a fixed identity, no quarantine). Otherwise - a
``bastion.session.RedisStore``, an identity resolver, a quarantine - it runs
the checks on a private event loop in a daemon thread, one per process,
started on first use, which those parts then belong to: the wrapped transport
and the caller's thread still do the I/O. Do not share such a Guard (or
RedisStore) between sync and async transports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import sys
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from types import ModuleType, TracebackType
from typing import Any, Protocol, TypeVar

import httpx

from bastion.adapters.pipeline import (
    Forward,
    Guard,
    Reply,
    ResponseGuard,
    Route,
    operation_name,
)
from bastion.events import RequestInfo

__all__ = ["AsyncBastionTransport", "BastionTransport"]

T = TypeVar("T")


def _library(request: Any) -> ModuleType:
    """httpx or httpx2, whichever built ``request``."""
    name = type(request).__module__.split(".", 1)[0]
    module = sys.modules.get(name)
    if module is None or not hasattr(module, "Response"):
        raise TypeError(f"unsupported request type {type(request)!r}: use httpx or httpx2")
    return module


def _reply(lib: ModuleType, reply: Reply) -> Any:
    return lib.Response(reply.status, headers=reply.headers, content=reply.body)


def _request_headers(request: Any) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in request.headers.multi_items()]


def _forwarded(
    lib: ModuleType, request: Any, headers: list[tuple[str, str]], outcome: Forward
) -> Any:
    """The request to send upstream: the agent's own when Bastion changed nothing in it."""
    body = outcome.body
    if body is request.content and _same_request(headers, outcome.headers, len(body)):
        return request
    return lib.Request(
        request.method,
        request.url,
        headers=outcome.headers,
        content=body,
        extensions=request.extensions,
    )


def _same_request(sent: list[tuple[str, str]], forward: list[tuple[str, str]], size: int) -> bool:
    # The guard forwards the agent's headers without hop-by-hop ones and with its own
    # content-length; with the same body and such a content-length, nothing differs.
    if ("content-length", str(size)) not in sent or len(sent) != len(forward):
        return False
    return all(
        name not in ("transfer-encoding", "content-encoding") for name, _ in sent
    ) and sorted(sent) == sorted(forward)


def _response_headers(response: Any) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in response.headers.multi_items()]


_STREAM_CLASSES: dict[tuple[str, bool], type] = {}


def _stream_class(lib: ModuleType, is_async: bool) -> type:
    """A guarded byte stream class deriving from ``lib``'s own stream base (clients check it)."""
    key = (lib.__name__, is_async)
    cls = _STREAM_CLASSES.get(key)
    if cls is None:
        base = lib.AsyncByteStream if is_async else lib.SyncByteStream
        impl = _AsyncGuardedStream if is_async else _SyncGuardedStream
        cls = type(impl.__name__, (impl, base), {})
        _STREAM_CLASSES[key] = cls
    return cls


class _AsyncGuardedStream:
    def __init__(self, upstream: Any, guard: ResponseGuard) -> None:
        self._upstream = upstream
        self._guard = guard

    async def __aiter__(self) -> AsyncIterator[bytes]:
        guard = self._guard
        direct, through = guard.feeds_sync, guard.pass_through
        try:
            async for chunk in self._upstream.stream:
                # Most chunks need no awaiting: plain calls are cheaper than a coroutine.
                out = through(chunk) if through is not None else None
                if out is None:
                    if direct:
                        out = guard.feed_sync(chunk)
                        if out is None:
                            out = await guard.settle()
                    else:
                        out = await guard.feed(chunk)
                if out:
                    yield out
                if guard.done:
                    return
            tail = await guard.close()
        except (httpx.TransportError, _transport_errors()) as exc:
            tail = guard.abort(exc)
        if tail:
            yield tail

    async def aclose(self) -> None:
        await self._upstream.aclose()


class _SyncGuardedStream:
    def __init__(self, upstream: Any, guard: ResponseGuard, runner: _Runner) -> None:
        self._upstream = upstream
        self._guard = guard
        self._runner = runner

    def __iter__(self) -> Iterator[bytes]:
        guard, run = self._guard, self._runner.run
        direct, through = guard.feeds_sync, guard.pass_through
        try:
            for chunk in self._upstream.stream:
                # Most chunks need no awaiting: no event loop for them.
                out = through(chunk) if through is not None else None
                if out is None:
                    if direct:
                        out = guard.feed_sync(chunk)
                        if out is None:
                            out = run(guard.settle())
                    else:
                        out = run(guard.feed(chunk))
                if out:
                    yield out
                if guard.done:
                    return
            tail = run(guard.close())
        except (httpx.TransportError, _transport_errors()) as exc:
            tail = guard.abort(exc)
        if tail:
            yield tail

    def close(self) -> None:
        self._upstream.close()


def _transport_errors() -> type[BaseException]:
    httpx2 = sys.modules.get("httpx2")
    if httpx2 is not None:
        error: type[BaseException] = httpx2.TransportError
        return error
    return httpx.TransportError


class _GuardedTransport:
    """What both transports share: the guard, and the transport they forward to."""

    # The wrapped library's transport to create when none was given.
    _default_transport = ""

    def __init__(
        self,
        transport: Any = None,
        *,
        policy: Any = None,
        identity: Any = None,
        routes: Any = None,
        guard: Guard | None = None,
        **options: Any,
    ) -> None:
        if guard is None:
            if policy is None:
                raise TypeError("a Bastion transport needs policy= (or guard=)")
            guard = Guard(policy, identity=identity, routes=routes, **options)
        self.guard = guard
        self._transport = transport

    def _inner(self, lib: ModuleType) -> Any:
        if self._transport is None:
            self._transport = getattr(lib, self._default_transport)()
        return self._transport


class AsyncBastionTransport(_GuardedTransport, httpx.AsyncBaseTransport):
    """An async transport that guards every request it forwards to ``transport``.

    Options are those of :class:`~bastion.adapters.pipeline.Guard`
    (``policy``, ``identity``, ``routes``, ``session``, ``on_decision``...), or
    ``guard=`` for an already configured one.
    """

    _default_transport = "AsyncHTTPTransport"

    async def handle_async_request(self, request: Any) -> Any:
        lib = _library(request)
        inner = self._inner(lib)
        guard = self.guard
        path = request.url.path
        route = guard.route(request.method, path)
        if route is None:
            if guard.unknown == "deny":
                return _reply(lib, guard.deny_unrouted(request.method, path))
            return await inner.handle_async_request(request)
        if not guard.tracing:
            return await self._guarded(lib, inner, route, request)
        # A streamed response's tool calls are decided as the caller reads it,
        # after this span ends; their decision spans join the caller's trace.
        with guard.tracer.request(**_span_of(route, request)):
            return await self._guarded(lib, inner, route, request)

    async def _guarded(self, lib: ModuleType, inner: Any, route: Route, request: Any) -> Any:
        guard = self.guard
        path = request.url.path
        body = await request.aread()
        headers = _request_headers(request)
        outcome = await guard.request(route, request.method, path, headers, body)
        if isinstance(outcome, Reply):
            return _reply(lib, outcome)
        response = await inner.handle_async_request(_forwarded(lib, request, headers, outcome))
        checked = await outcome.exchange.response(response.status_code, _response_headers(response))
        if checked.mode == "pass":
            return response
        if checked.mode == "buffer":
            try:
                async for chunk in response.stream:
                    checked.collect(chunk)
            finally:
                await response.aclose()
            return _reply(lib, await checked.complete())
        return lib.Response(
            checked.status,
            headers=checked.headers,
            stream=_stream_class(lib, True)(response, checked),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()

    async def __aenter__(self) -> AsyncBastionTransport:
        if self._transport is not None:
            await self._transport.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        if self._transport is not None:
            await self._transport.__aexit__(exc_type, exc_value, traceback)


def _span_of(route: Route, request: Any) -> dict[str, Any]:
    """The request span's attributes: the agent's side of the exchange (a client span)."""
    return {
        "protocol": route.protocol,
        "operation": operation_name(route.protocol),
        "request": RequestInfo(
            method=request.method, path=request.url.path, protocol=route.protocol
        ),
        "kind": "client",
    }


class _Runner(Protocol):
    def run(self, coro: Coroutine[Any, Any, T]) -> T: ...


class _ThreadLoop:
    """An event loop owned by one thread, closed when the thread ends (its local goes)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __del__(self) -> None:
        self.loop.close()


class _CallerLoops:
    """Runs the pipeline in the caller's thread, on that thread's own event loop.

    For guards no part of which belongs to one loop: no hop to another thread,
    which costs two thread wake-ups per request. A caller whose thread already
    runs a loop (sync client code inside async code) cannot start another one
    there, so its checks go to the shared background loop instead.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if asyncio.events._get_running_loop() is not None:
            return _BackgroundLoop.shared().run(coro)
        owned: _ThreadLoop | None = getattr(self._local, "owned", None)
        if owned is None:
            owned = self._local.owned = _ThreadLoop()
        loop = owned.loop
        # As a task would: in a copy of the caller's context (spans it opens are
        # children of the caller's), with this thread's loop as the running one.
        context = contextvars.copy_context()
        # The first step by hand: such a guard's checks seldom wait on anything,
        # and a step costs a fraction of a turn of the loop (two epoll calls, a task).
        # No task is current during it, so what needs one (asyncio.timeout) must
        # sit in parts that are loop-bound, as the Redis store and quarantine are.
        asyncio.events._set_running_loop(loop)
        try:
            waiting = context.run(coro.send, None)
        except StopIteration as done:
            result: T = done.value
            return result
        finally:
            asyncio.events._set_running_loop(None)
        # It waits on something after all: the loop finishes it.
        return loop.run_until_complete(loop.create_task(_resume(coro, waiting), context=context))


async def _resume(coro: Coroutine[Any, Any, T], waiting: Any) -> T:
    """Go on with a coroutine stepped by hand until it yielded ``waiting``, as its task would."""
    while True:
        if waiting is None:
            await asyncio.sleep(0)  # a bare yield: it only gave other tasks a turn
        elif asyncio.isfuture(waiting):
            # It waits on this future: wait on it here; the coroutine reads the outcome itself.
            waiting._asyncio_future_blocking = False
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await waiting
        else:
            coro.close()
            raise RuntimeError(
                f"a Bastion check yielded {waiting!r}, which is not an asyncio future"
            )
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            result: T = done.value
            return result


class _BackgroundLoop:
    """The private event loop the sync transport runs a loop-bound pipeline on."""

    _lock = threading.Lock()
    _shared: _BackgroundLoop | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="bastion-guard-loop", daemon=True
        )
        self.thread.start()

    @classmethod
    def shared(cls) -> _BackgroundLoop:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a sync Bastion transport cannot be used from its own loop")
        # The coroutine runs in the caller's context (contextvars), so spans it
        # opens are children of the caller's current span.
        context = contextvars.copy_context()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def finish(task: asyncio.Task[T]) -> None:
            if task.cancelled():
                done.cancel()
            elif (exc := task.exception()) is not None:
                done.set_exception(exc)
            else:
                done.set_result(task.result())

        def start() -> None:
            context.run(self.loop.create_task, coro).add_done_callback(finish)

        self.loop.call_soon_threadsafe(start)
        return done.result()


class BastionTransport(_GuardedTransport, httpx.BaseTransport):
    """A sync transport that guards every request it forwards to ``transport``.

    Same options as :class:`AsyncBastionTransport`; see the module docstring for
    how the async pipeline runs under it.
    """

    _default_transport = "HTTPTransport"

    def __init__(
        self,
        transport: Any = None,
        *,
        policy: Any = None,
        identity: Any = None,
        routes: Any = None,
        guard: Guard | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            transport, policy=policy, identity=identity, routes=routes, guard=guard, **options
        )
        self._runner: _Runner = (
            _BackgroundLoop.shared() if self.guard.loop_bound else _CallerLoops()
        )

    def handle_request(self, request: Any) -> Any:
        lib = _library(request)
        inner = self._inner(lib)
        guard = self.guard
        path = request.url.path
        route = guard.route(request.method, path)
        if route is None:
            if guard.unknown == "deny":
                return _reply(lib, guard.deny_unrouted(request.method, path))
            return inner.handle_request(request)
        if not guard.tracing:
            return self._guarded(lib, inner, route, request)
        with guard.tracer.request(**_span_of(route, request)):
            return self._guarded(lib, inner, route, request)

    def _guarded(self, lib: ModuleType, inner: Any, route: Route, request: Any) -> Any:
        guard, run = self.guard, self._runner.run
        path = request.url.path
        body = request.read()
        headers = _request_headers(request)
        outcome = run(guard.request(route, request.method, path, headers, body))
        if isinstance(outcome, Reply):
            return _reply(lib, outcome)
        response = inner.handle_request(_forwarded(lib, request, headers, outcome))
        # Built here, not on the loop: constructing it never audits (complete() does).
        checked = ResponseGuard(outcome.exchange, response.status_code, _response_headers(response))
        if checked.mode == "pass":
            return response
        if checked.mode == "buffer":
            try:
                if not checked.failed:
                    for chunk in response.stream:
                        checked.collect(chunk)
            finally:
                response.close()
            return _reply(lib, run(checked.complete()))
        return lib.Response(
            checked.status,
            headers=checked.headers,
            stream=_stream_class(lib, False)(response, checked, self._runner),
            extensions=response.extensions,
        )

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def __enter__(self) -> BastionTransport:
        if self._transport is not None:
            self._transport.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        if self._transport is not None:
            self._transport.__exit__(exc_type, exc_value, traceback)
