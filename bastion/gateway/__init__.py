"""``bastion serve``: a Starlette gateway in front of LLM providers and MCP servers.

::

    from bastion.gateway import build_app, load_config

    app = build_app(load_config("bastion.yaml"))   # serve with any ASGI server

or from a shell: ``bastion serve --config bastion.yaml`` (:func:`main`). See
``examples/bastion.yaml`` for every configuration key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bastion.gateway.cli import main
from bastion.gateway.config import ConfigError, GatewayConfig, load_config, parse_config

if TYPE_CHECKING:
    from bastion.gateway.app import Gateway, build_app

__all__ = [
    "ConfigError",
    "Gateway",
    "GatewayConfig",
    "build_app",
    "load_config",
    "main",
    "parse_config",
]


def __getattr__(name: str) -> Any:
    # The app pulls in the adapters, identity and session packages; the CLI's
    # argument parsing and config errors should not wait for them.
    if name in ("build_app", "Gateway"):
        from bastion.gateway import app

        return getattr(app, name)
    raise AttributeError(name)
