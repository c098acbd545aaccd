"""Real demo servers on 127.0.0.1, shared per test module to keep the suite fast."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bastion.demo.github_server import GitHubState, build_github_app
from bastion.demo.model_server import ModelLog, build_model_app
from bastion.demo.scenario import DemoServers, start_demo_servers
from bastion.demo.serving import BackgroundServer


@pytest.fixture(scope="module")
def demo_servers() -> Iterator[DemoServers]:
    servers = start_demo_servers()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def servers(demo_servers: DemoServers) -> DemoServers:
    demo_servers.reset()
    return demo_servers


@pytest.fixture(scope="module")
def github_world() -> Iterator[tuple[GitHubState, str]]:
    state = GitHubState()
    with BackgroundServer(build_github_app(state), name="github") as server:
        yield state, f"{server.url}/mcp"


@pytest.fixture
def github(github_world: tuple[GitHubState, str]) -> tuple[GitHubState, str]:
    github_world[0].reset()
    return github_world


@pytest.fixture(scope="module")
def model_world() -> Iterator[tuple[ModelLog, str]]:
    log = ModelLog()
    with BackgroundServer(build_model_app(log=log), name="model") as server:
        yield log, f"{server.url}/v1"


@pytest.fixture
def model(model_world: tuple[ModelLog, str]) -> tuple[ModelLog, str]:
    model_world[0].clear()
    return model_world
