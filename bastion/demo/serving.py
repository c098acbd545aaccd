"""Serve an ASGI app with uvicorn on 127.0.0.1 in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

from starlette.types import ASGIApp

try:
    import uvicorn
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the Bastion demo needs uvicorn: pip install 'bastion-guard[server]'"
    ) from exc

__all__ = ["BackgroundServer"]

_STARTUP_TIMEOUT = 10.0
_SHUTDOWN_GRACE = 1  # seconds (uvicorn takes an int)


class BackgroundServer:
    """An ASGI app served by uvicorn on a free port of 127.0.0.1.

    The socket is bound before uvicorn starts, so the port is known and
    reserved up front: no race with another process picking the same port.
    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(self, app: ASGIApp, *, name: str = "server", port: int = 0) -> None:
        self.name = name
        self._app = app
        self._port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError(f"{self.name} is not running")
        port: int = self._socket.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> BackgroundServer:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already running")
        # An explicit IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets whose
        # proto says TCP, and without it every keep-alive request waits ~40 ms for an ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self._socket = sock
        # A client holding a stream open (an MCP SSE stream) would otherwise keep uvicorn
        # waiting at shutdown until stop()'s join gives up: Ctrl-C took 10 s per server.
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=_SHUTDOWN_GRACE,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"demo-{self.name}", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start on 127.0.0.1")
            time.sleep(0.005)
        return self

    def request_stop(self) -> None:
        """Ask uvicorn to shut down without waiting (to stop several servers at once)."""
        if self._server is not None:
            self._server.should_exit = True

    def stop(self) -> None:
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=_STARTUP_TIMEOUT)
        if sock is not None:
            sock.close()
        self._socket = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        *_: Any,
    ) -> None:
        self.stop()
