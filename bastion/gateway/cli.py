"""``bastion serve --config bastion.yaml [--host H] [--port P]``: run the gateway with uvicorn.

Exit codes: 0 after a clean shutdown, 2 for a configuration or policy that does
not load (the reason on stderr, never a traceback), 1 when the server cannot
start (address in use, missing extra).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

from bastion.gateway.config import ConfigError, load_config

__all__ = ["build_parser", "main"]

log = logging.getLogger("bastion.gateway")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bastion serve",
        description="Run the Bastion gateway in front of LLM providers and MCP servers.",
    )
    parser.add_argument(
        "--config", "-c", default="bastion.yaml", help="the gateway configuration (YAML)"
    )
    parser.add_argument("--host", help="listen address (overrides listen.host)")
    parser.add_argument(
        "--port", type=int, help="listen port, 0 for any free port (overrides listen.port)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (decisions are logged at info)",
    )
    parser.add_argument(
        "--check", action="store_true", help="validate the configuration and policy, then exit"
    )
    return parser


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError:
        raise ImportError(
            "bastion serve needs uvicorn: pip install 'bastion-guard[server]'"
        ) from None
    return uvicorn


def _graceful_server(uvicorn: Any) -> Any:
    class GatewayServer(uvicorn.Server):  # type: ignore[misc]
        """uvicorn's server, minus re-raising SIGTERM after the graceful shutdown.

        The lifespan has flushed the audit by then; exiting 0 tells a supervisor
        the shutdown was the clean one it asked for.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GatewayServer


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bastion serve`` (argv without the ``serve`` word)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2

    from bastion.gateway.app import build_app, describe
    from bastion.policy import PolicyError

    try:
        app = build_app(config)
    except PolicyError as exc:
        print(f"{args.config}: policy does not load:\n{exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for line in describe(app):
            print(line)
        return 0
    try:
        uvicorn = _uvicorn()
    except ImportError as exc:
        print(exc, file=sys.stderr)
        return 1
    host = args.host or config.listen.host
    port = config.listen.port if args.port is None else args.port
    try:
        sock = _bind(host, port)
    except OSError as exc:
        print(f"cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    for line in describe(app):
        print(line, flush=True)
    print(f"bastion gateway listening on http://{shown}:{bound_port}", flush=True)
    server = _graceful_server(uvicorn)(
        uvicorn.Config(
            app,
            log_level=args.log_level,
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
