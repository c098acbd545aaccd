"""Fixtures for the end-to-end tests: real upstreams on 127.0.0.1, started once per run.

- ``llm``: the scripted OpenAI/Anthropic upstream, plain (for the transports) and
  behind a :class:`~e2e.harness.Front` (``BastionMiddleware`` with a per-test guard);
- ``naive``: the naive quarantine model (tests/quarantine/naive_model.py);
- ``mcp_servers``: a real MCP server (tests/e2e/mcp_servers.py) answering JSON
  and another answering SSE, each behind a Front;
- ``redis``: a real redis-server on a free port (tests/session/conftest.py's starter).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from servers.llm import ScriptedLLM
from servers.serving import running
from session.conftest import RedisServer, start_redis

from .harness import AuditLog, Front, load_naive_model, secret_text, structured_secret
from .mcp_servers import MCPServers, serve_tool_servers


@dataclass
class LLM:
    upstream: ScriptedLLM
    url: str  # the upstream itself, for the transports
    front: Front  # BastionMiddleware in front of it, guard chosen per test
    guarded_url: str

    def reset(self) -> None:
        self.upstream.requests.clear()
        self.upstream.reply("ok")


@pytest.fixture(scope="session")
def llm_servers() -> Iterator[LLM]:
    upstream = ScriptedLLM()
    front = Front(upstream.app)
    with running(upstream.app) as url, running(front) as guarded_url:
        yield LLM(upstream, url, front, guarded_url)


@pytest.fixture
def llm(llm_servers: LLM) -> LLM:
    llm_servers.reset()
    return llm_servers


@pytest.fixture(scope="session")
def mcp_servers() -> Iterator[MCPServers]:
    """The e2e tool server twice (JSON and SSE replies), each behind a Front."""
    with serve_tool_servers(secret_text(), structured_secret()) as servers:
        yield servers


@pytest.fixture(scope="session")
def naive() -> Iterator[Any]:
    """The naive model: ``naive.url(mode)`` with modes naive, slow, fail, envelope."""
    module = load_naive_model()
    # uvicorn serves this bound socket, so no other process can take the port meanwhile
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    model = module.NaiveModel(port=sock.getsockname()[1])
    config = uvicorn.Config(
        module.build_app(model),
        host="127.0.0.1",
        port=model.port,
        log_level="warning",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("naive model server did not start")
        time.sleep(0.02)
    yield model
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture(scope="session")
def redis() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server this test may kill."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def audit() -> AuditLog:
    return AuditLog()
