"""Fixtures for quarantine tests: the naive model server (see naive_model.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from naive_model import NaiveModel, build_app


@pytest.fixture(scope="session")
def naive_model() -> Iterator[NaiveModel]:
    # uvicorn serves this bound socket, so no other process can take the port meanwhile
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    model = NaiveModel(port=sock.getsockname()[1])
    config = uvicorn.Config(
        build_app(model),
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
