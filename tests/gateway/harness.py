"""The gateway tests' harness: scripted upstreams in this process, ``bastion serve`` as a child.

The upstreams (a scripted OpenAI/Anthropic LLM that records the headers it
receives, a faulty LLM that is slow, drops streams or echoes credentials, and
two GitHub-like MCP servers, one answering JSON and one SSE) run on 127.0.0.1
in background threads for the whole session. ``start_gateway`` writes a
configuration directory and runs ``bastion serve`` as a real subprocess on a
free port, waiting for ``/healthz``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from servers.llm import ScriptedLLM

from bastion.demo.github_server import GitHubState, build_github_app
from bastion.demo.serving import BackgroundServer
from bastion.identity import hash_secret

REPO = Path(__file__).resolve().parents[2]
PROVIDER_KEY = "sk-provider-0123456789abcdefXYZ"
ANTHROPIC_KEY = "sk-ant-provider-9876543210zyxwvu"
ALICE = "bst_alice1_AAAAaaaaBBBBbbbbCCCCccccDDDDdddd"
BOB = "bst_bob111_EEEEeeeeFFFFffffGGGGggggHHHHhhhh"


class HeaderRecorder:
    """ASGI wrapper keeping every request's headers before the wrapped app answers."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.headers: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.headers.append(
                {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            )
        await self.app(scope, receive, send)


def faulty_app() -> Starlette:
    """An OpenAI-compatible upstream that misbehaves on purpose, one way per path prefix."""

    async def slow(request: Request) -> Response:
        await request.body()
        await asyncio.sleep(5)
        return JSONResponse({})

    async def drop(request: Request) -> Response:
        await request.body()

        async def chunks() -> Any:
            first = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "drop-1",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}],
            }
            yield f"data: {json.dumps(first)}\n\n".encode()
            await asyncio.sleep(0.05)
            raise RuntimeError("upstream crashed mid-stream")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def echo(request: Request) -> Response:
        await request.body()
        # A careless upstream that quotes the credential it was sent.
        leaked = request.headers.get("authorization", "")
        message = {"role": "assistant", "content": f"you sent {leaked}"}
        return JSONResponse(
            {
                "id": "c2",
                "object": "chat.completion",
                "created": 1,
                "model": "echo-1",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            },
            headers={"x-echo": leaked},
        )

    async def not_found(request: Request) -> Response:
        return JSONResponse({"error": "no"}, status_code=404)

    return Starlette(
        routes=[
            Route("/slow/v1/chat/completions", slow, methods=["POST"]),
            Route("/drop/v1/chat/completions", drop, methods=["POST"]),
            Route("/echo/v1/chat/completions", echo, methods=["POST"]),
            Route("/{rest:path}", not_found, methods=["GET"]),
        ]
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Upstreams:
    llm: ScriptedLLM
    recorder: HeaderRecorder
    llm_url: str
    faulty_url: str
    github: GitHubState
    docs: GitHubState
    github_url: str
    docs_url: str
    down_url: str
    servers: list[BackgroundServer] = field(default_factory=list)


@pytest.fixture(scope="session")
def upstreams() -> Iterator[Upstreams]:
    llm = ScriptedLLM()
    recorder = HeaderRecorder(llm.app)
    github, docs = GitHubState(), GitHubState()
    servers = [
        BackgroundServer(recorder, name="llm").start(),
        BackgroundServer(faulty_app(), name="faulty").start(),
        BackgroundServer(build_github_app(github), name="github").start(),
        BackgroundServer(build_github_app(docs, json_response=False), name="docs").start(),
    ]
    try:
        yield Upstreams(
            llm=llm,
            recorder=recorder,
            llm_url=servers[0].url,
            faulty_url=servers[1].url,
            github=github,
            docs=docs,
            github_url=servers[2].url + "/mcp",
            docs_url=servers[3].url + "/mcp",
            down_url=f"http://127.0.0.1:{closed_port()}",
            servers=servers,
        )
    finally:
        for server in servers:
            server.request_stop()
        for server in servers:
            server.stop()


POLICY = """\
default call deny
default result trusted
default model deny

allow model *
@id("secret-model")
forbid model "gpt-secret" unless identity.groups has "admin" reason "gpt-secret is for admins"

@id("read-only")
allow call ["github__list_*", "github__get_*", "docs__list_*", "down__*", "get_weather"]
@id("direct-read-only")
allow call "list_*" when tool.server == "github"
@id("no-create")
forbid call "github__create_*" reason "agents may not open issues"
@id("no-send")
forbid call "send_email" reason "mail goes out only by hand"
"""


def keys_yaml() -> str:
    return textwrap.dedent(
        f"""\
        version: 1
        keys:
          - id: alice1
            hash: "{hash_secret(ALICE)}"
            subject: alice
            groups: [eng]
            providers: ["*"]
            models: ["*"]
          - id: bob111
            hash: "{hash_secret(BOB)}"
            subject: bob
            providers: ["openai"]
            models: ["gpt-4o"]
        """
    )


def config_yaml(up: Upstreams, directory: Path) -> str:
    return textwrap.dedent(
        f"""\
        listen: {{host: 127.0.0.1, port: 0}}
        policy:
          paths: [policy]
          check_interval_seconds: 0.2
        identity:
          key_file: keys.yaml
          key_check_interval_seconds: 0.2
        secrets_file: secrets.yaml
        secrets_check_interval_seconds: 0.2
        providers:
          openai:
            base_url: {up.llm_url}/v1
            models: [gpt-4o, gpt-4o-mini, gpt-secret]
          anthropic:
            kind: anthropic
            base_url: {up.llm_url}
            models: [claude-sonnet-4]
          slow:
            base_url: {up.faulty_url}/slow/v1
            models: ["slow-*"]
            timeouts: {{read: 0.5}}
          drop:
            base_url: {up.faulty_url}/drop/v1
            models: ["drop-*"]
          echo:
            base_url: {up.faulty_url}/echo/v1
            models: ["echo-*"]
          down:
            base_url: {up.down_url}/v1
            models: ["down-*"]
        mcp:
          github: {{url: "{up.github_url}"}}
          docs: {{url: "{up.docs_url}"}}
          down: {{url: "{up.down_url}/mcp"}}
        audit:
          sinks: [{{path: audit.jsonl}}]
        approvals:
          approver_groups: [admin]
        """
    )


def secrets_yaml(openai_key: str = PROVIDER_KEY) -> str:
    keys = {
        "openai": openai_key,
        "anthropic": ANTHROPIC_KEY,
        "slow": openai_key,
        "drop": openai_key,
        "echo": openai_key,
        "down": openai_key,
    }
    return "providers:\n" + "".join(f"  {name}: {key}\n" for name, key in keys.items())


class Gateway:
    """A running ``bastion serve`` child process."""

    def __init__(self, directory: Path, config: Path) -> None:
        self.directory = directory
        self.stderr_path = directory / "stderr.log"
        self._stderr = self.stderr_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from bastion.cli import main; sys.exit(main())",
                "serve",
                "--config",
                str(config),
                "--port",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=directory,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.banner: list[str] = []
        self.url = self._wait_for_start()

    def _wait_for_start(self) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + 30
        url = None
        while url is None:
            line = self.process.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"bastion serve exited:\n{self.stderr()}")
            self.banner.append(line.rstrip())
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                url = match.group(1)
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    # The rest of the banner was printed before uvicorn started.
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"bastion serve did not answer /healthz:\n{self.stderr()}")

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def audit_lines(self) -> list[dict[str, Any]]:
        path = self.directory / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()
        return self.process.returncode


def write_gateway_dir(up: Upstreams, directory: Path, policy: str = POLICY) -> Path:
    (directory / "policy").mkdir(parents=True, exist_ok=True)
    (directory / "policy" / "main.policy").write_text(policy)
    (directory / "keys.yaml").write_text(keys_yaml())
    (directory / "secrets.yaml").write_text(secrets_yaml())
    config = directory / "bastion.yaml"
    config.write_text(config_yaml(up, directory))
    return config


@pytest.fixture(scope="module")
def start_gateway(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(policy: str = POLICY) -> Gateway:
        directory = tmp_path_factory.mktemp("gateway")
        config = write_gateway_dir(upstreams, directory, policy)
        gateway = Gateway(directory, config)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
