"""``bastion demo``: run the prompt-injection demo and report what happened."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from bastion.demo.scenario import DemoServers, Run, RunResult

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bastion demo",
        description=(
            "Run an agent against a GitHub-like MCP server holding a poisoned issue, "
            "and show where a private secret ends up."
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the report"
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the servers up after the runs (until Ctrl-C) so you can poke at them",
    )
    parser.add_argument(
        "--stream", action="store_true", help="have the agent stream the model's answers"
    )
    return parser


def default_runs(stream: bool) -> list[Run]:
    """The runs `main` performs, in order."""
    from bastion.demo.scenario import run_with_bastion, run_without_bastion

    async def without_bastion(servers: DemoServers) -> RunResult:
        return await run_without_bastion(servers, stream=stream)

    async def with_bastion(servers: DemoServers) -> RunResult:
        return await run_with_bastion(servers, stream=stream)

    return [without_bastion, with_bastion]


async def _perform(runs: Sequence[Run], servers: DemoServers) -> list[RunResult]:
    return [await run(servers) for run in runs]


def _wait_for_interrupt(servers: DemoServers, out: TextIO) -> None:
    print("\nServers still running (Ctrl-C to stop):", file=out)
    for name, url in servers.endpoints.items():
        print(f"  {name}: {url}", file=out)
    out.flush()
    # Wake up now and then: the kernel may deliver SIGINT to a server thread, and a
    # main thread blocked in an untimed wait would then never run Python's handler.
    stop = threading.Event()
    with contextlib.suppress(KeyboardInterrupt):
        while not stop.wait(0.2):
            pass


def main(argv: list[str] | None = None, *, runs: Sequence[Run] | None = None) -> int:
    """Run the demo; exit status 0 only when every run behaved as described."""
    args = build_parser().parse_args(argv)
    try:
        from bastion.demo.scenario import (
            WITH_BASTION,
            WITHOUT_BASTION,
            check_runs,
            render_summary,
            runs_to_json,
            start_demo_servers,
        )
    except ImportError as exc:
        print(f"bastion demo: {exc}", file=sys.stderr)
        return 2
    # The default runs must both happen; runs given by a caller are checked as they are.
    expect = (WITHOUT_BASTION, WITH_BASTION) if runs is None else ()
    servers = start_demo_servers()
    try:
        try:
            results = asyncio.run(
                _perform(runs if runs is not None else default_runs(args.stream), servers)
            )
        except Exception as exc:
            # A demo that cannot finish has shown nothing: say why and fail.
            print(f"bastion demo: a run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(runs_to_json(results, expect=expect), indent=2))
        else:
            print(render_summary(results, expect=expect))
        sys.stdout.flush()
        if args.keep_running:
            _wait_for_interrupt(servers, sys.stderr if args.json else sys.stdout)
    finally:
        servers.stop()
    return 0 if not check_runs(results, expect=expect) else 1
