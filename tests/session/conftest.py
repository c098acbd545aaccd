"""Fixtures: a real redis-server on a free port, and the store backends under test."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import IO

import pytest

from bastion.session import MemoryStore, RedisStore, SessionStore

REDIS_SERVER = os.environ.get("BASTION_REDIS_SERVER", "/usr/bin/redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server process started for the tests."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)


def start_redis() -> RedisServer:
    binary = REDIS_SERVER if os.path.exists(REDIS_SERVER) else shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            f"redis-server not found at {REDIS_SERVER} or on PATH: the Redis tests need a real "
            "server (run `make redis`, or set BASTION_REDIS_SERVER)"
        )
    # The free port is released before redis-server binds it; on a busy machine another
    # process may take it in between, so a port found taken is replaced, a few times.
    for _ in range(5):
        server = _spawn_redis(binary, free_port())
        if server is not None:
            return server
    pytest.fail("redis-server found its port taken five times in a row")


def _spawn_redis(binary: str, port: int) -> RedisServer | None:
    """A redis-server answering on ``port``; None when the port was taken meanwhile."""
    # redis-server logs to stdout; a file (not a pipe nobody drains) keeps why it stopped.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return _await_redis(process, port, log)


def _await_redis(process: subprocess.Popen[bytes], port: int, log: IO[bytes]) -> RedisServer | None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")[-2000:]
            if "already in use" in err:
                return None
            pytest.fail(f"redis-server exited at start (code {process.returncode}): {err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return RedisServer(port, process)
        except OSError:
            time.sleep(0.02)
    process.kill()
    pytest.fail(f"redis-server did not answer on 127.0.0.1:{port} within 10 s")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole run; tests keep apart by key prefix."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A redis-server a test may kill."""
    server = start_redis()
    yield server
    server.stop()


@dataclass
class FakeClock:
    """Unix time that moves only when told; starts on an hour boundary plus one second."""

    now: float = field(default_factory=lambda: math.floor(time.time() / 3600) * 3600 + 1.0)

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """A store under test, with a way to let time pass that it honours."""

    name: str
    store: SessionStore
    clock: FakeClock

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        if self.name == "redis":
            # Redis expires keys on its own clock.
            await asyncio.sleep(seconds)

    def advance_clock(self, seconds: float) -> None:
        """Move only Bastion's clock: enough for fixed windows, which it computes itself."""
        self.clock.now += seconds


def redis_store(server: RedisServer, prefix: str, clock: FakeClock | None = None) -> RedisStore:
    if clock is None:
        return RedisStore(server.url, prefix=prefix, timeout=1.0)
    return RedisStore(server.url, prefix=prefix, timeout=1.0, clock=clock)


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    clock = FakeClock()
    store: SessionStore
    if request.param == "memory":
        store = MemoryStore(clock=clock)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        store = redis_store(server, f"test-{uuid.uuid4().hex}:", clock)
    yield Backend(request.param, store, clock)
    await store.aclose()
