"""The demo's background servers stop on request, even with a client still connected."""

from __future__ import annotations

import threading

import httpx

from bastion.demo.github_server import GitHubState, build_github_app
from bastion.demo.serving import BackgroundServer

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}


def test_stop_ends_the_server_while_a_client_holds_an_mcp_stream_open() -> None:
    server = BackgroundServer(build_github_app(GitHubState()), name="held-github").start()
    url = server.url + "/mcp"
    with httpx.Client(timeout=10) as client:
        accept = {"accept": "application/json, text/event-stream"}
        session = client.post(url, headers=accept, json=INITIALIZE).headers["mcp-session-id"]
        headers = {"mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}
        client.post(
            url,
            headers={**accept, **headers},
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
        )
        # the client's notification stream, left open as a client that is still running would
        with client.stream("GET", url, headers={"accept": "text/event-stream", **headers}) as sse:
            assert sse.status_code == 200
            server.stop()
            # stop() stops waiting after 10 s; the server's thread must have ended by then
            alive = [t for t in threading.enumerate() if t.name == "demo-held-github"]
            assert not [t for t in alive if t.is_alive()]
