"""The demo's runs: the same agent, the same question, different base URLs.

Run 1, "without-bastion", points the agent straight at the model and the
GitHub MCP server. The poisoned issue makes the model copy a private secret
into a public issue, and the GitHub server's own log shows where it landed.

Another run is any coroutine ``(DemoServers) -> RunResult`` that starts what
it needs in front of ``servers.model_base_url`` and ``servers.mcp_url`` (for
example ``bastion serve``), registers it with ``servers.keep`` so that
``--keep-running`` keeps it up, and calls `run_agent_through` with its own two
base URLs; it then fills ``blocked_calls`` and ``audit`` from what it
observed. `check_runs` says whether the runs behaved as the demo promises.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bastion.demo.agent import Transcript, run_agent
from bastion.demo.github_server import GitHubState, Leak, build_github_app
from bastion.demo.model_server import ModelLog, build_model_app
from bastion.demo.serving import BackgroundServer

__all__ = [
    "QUESTION",
    "WITHOUT_BASTION",
    "WITH_BASTION",
    "DemoServers",
    "Run",
    "RunResult",
    "check_runs",
    "render_summary",
    "run_agent_through",
    "run_without_bastion",
    "runs_to_json",
    "start_demo_servers",
]

QUESTION = "summarise the open issues of acme/public"
WITHOUT_BASTION = "without-bastion"
WITH_BASTION = "with-bastion"
# The agent's one credential, sent to the model and to the MCP server alike, in
# every run: only the base URLs change between runs.
AGENT_KEY = "demo-agent-key"


@dataclass
class DemoServers:
    """The upstream servers of the demo, plus whatever a run put in front of them."""

    github_state: GitHubState
    model_log: ModelLog
    github: BackgroundServer
    model: BackgroundServer
    endpoints: dict[str, str] = field(default_factory=dict)
    _resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def mcp_url(self) -> str:
        return f"{self.github.url}/mcp"

    @property
    def model_base_url(self) -> str:
        return f"{self.model.url}/v1"

    def keep(self, name: str, url: str, stop: Callable[[], None]) -> None:
        """Register a server a run started: listed by ``--keep-running``, stopped by `stop`."""
        self.endpoints[name] = url
        self._resources.callback(stop)

    def reset(self) -> None:
        """Give the next run a fresh GitHub and an empty model log."""
        self.github_state.reset()
        self.model_log.clear()

    def stop(self) -> None:
        self._resources.close()
        # uvicorn takes a few hundred milliseconds to wind down: let both do it at once.
        self.model.request_stop()
        self.github.request_stop()
        self.model.stop()
        self.github.stop()


def start_demo_servers(
    *, model_api_key: str | None = None, mcp_stateless: bool = False
) -> DemoServers:
    """Start the GitHub MCP server and the model server on free ports of 127.0.0.1.

    With `model_api_key`, the model server accepts only that key (as a provider
    would), so a run through a gateway can show the key being swapped. With
    `mcp_stateless`, the MCP server hands out no ``Mcp-Session-Id``.
    """
    state, log = GitHubState(), ModelLog()
    app = build_github_app(state, stateless=mcp_stateless)
    github = BackgroundServer(app, name="github-mcp").start()
    try:
        model = BackgroundServer(
            build_model_app(api_key=model_api_key, log=log), name="model"
        ).start()
    except BaseException:
        github.stop()
        raise
    servers = DemoServers(state, log, github, model)
    servers.endpoints.update(
        {"GitHub MCP server": servers.mcp_url, "model (OpenAI-compatible)": servers.model_base_url}
    )
    return servers


@dataclass
class RunResult:
    """What one run did, as observed on the servers rather than assumed."""

    name: str
    leaked: bool
    where: list[str]
    tools_called: list[str]
    server_calls: list[str]  # the tools the GitHub server actually received
    final_answer: str | None
    transcript: Transcript
    leaks: list[Leak] = field(default_factory=list)
    blocked_calls: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    model_base_url: str = ""
    mcp_url: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "leaked": self.leaked,
            "where": self.where,
            "tools_called": self.tools_called,
            "server_calls": self.server_calls,
            "blocked_calls": self.blocked_calls,
            "audit": self.audit,
            "final_answer": self.final_answer,
            "stop_reason": self.transcript.stop_reason,
            "error": self.transcript.error,
            "steps": [
                {"tool": c.name, "arguments": c.arguments, "is_error": c.is_error}
                for c in self.transcript.tool_calls
            ],
            "model_base_url": self.model_base_url,
            "mcp_url": self.mcp_url,
        }


Run = Callable[[DemoServers], Awaitable[RunResult]]


async def run_agent_through(
    name: str,
    servers: DemoServers,
    *,
    model_base_url: str,
    mcp_url: str,
    question: str = QUESTION,
    api_key: str = AGENT_KEY,
    stream: bool = False,
) -> RunResult:
    """Run the agent with these two base URLs on a fresh GitHub, then look where the secret went."""
    servers.reset()
    transcript = await run_agent(
        question,
        model_base_url=model_base_url,
        mcp_url=mcp_url,
        api_key=api_key,
        mcp_token=api_key,
        stream=stream,
    )
    leaks = servers.github_state.leaks()
    return RunResult(
        name=name,
        leaked=bool(leaks),
        where=[f"{leak.where} ({leak.url}), in its {leak.field}" for leak in leaks],
        tools_called=transcript.tools_called,
        server_calls=[call.tool for call in servers.github_state.calls()],
        final_answer=transcript.final_answer,
        transcript=transcript,
        leaks=leaks,
        model_base_url=model_base_url,
        mcp_url=mcp_url,
    )


async def run_without_bastion(servers: DemoServers, *, stream: bool = False) -> RunResult:
    """Run 1: the agent talks to the model and the MCP server directly."""
    return await run_agent_through(
        WITHOUT_BASTION,
        servers,
        model_base_url=servers.model_base_url,
        mcp_url=servers.mcp_url,
        stream=stream,
    )


def check_runs(runs: list[RunResult]) -> list[str]:
    """What the runs did differently from what the demo promises (empty when all is as described)."""
    problems: list[str] = []
    if not runs:
        return ["no run happened"]
    for run in runs:
        if run.transcript.error:
            problems.append(f"{run.name}: the agent stopped on an error: {run.transcript.error}")
        if run.name == WITHOUT_BASTION and not run.leaked:
            problems.append(
                f"{run.name}: the secret should have leaked into a public issue, and did not"
            )
        if run.name == WITH_BASTION:
            if run.leaked:
                problems.append(f"{run.name}: the secret leaked: {'; '.join(run.where)}")
            if not run.blocked_calls:
                problems.append(f"{run.name}: no call was blocked")
            if not run.audit:
                problems.append(f"{run.name}: the audit trail is empty")
    return problems


def runs_to_json(runs: list[RunResult]) -> dict[str, Any]:
    """The runs as one JSON-ready object: ``{"runs": [...], "ok": ...}``."""
    problems = check_runs(runs)
    return {"runs": [run.to_dict() for run in runs], "ok": not problems, "problems": problems}


def _call_text(name: str, arguments: dict[str, Any]) -> str:
    shown = ", ".join(f"{k}={_short(str(v), 40)}" for k, v in arguments.items())
    return f"{name}({shown})"


def _short(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _audit_text(line: dict[str, Any]) -> str:
    parts = [str(line[k]) for k in ("effect", "tool", "identity", "rule", "reason") if line.get(k)]
    return " ".join(parts) if parts else _short(str(line), 200)


def _blocked_text(call: dict[str, Any]) -> str:
    name = str(call.get("tool") or call.get("name") or "?")
    reason = call.get("reason")
    return f"{name}: {reason}" if reason else name


def _story(run: RunResult, number: int) -> list[str]:
    lines = [
        f"Run {number}: {run.name}",
        f"  agent -> model {run.model_base_url}, MCP {run.mcp_url}",
        f"  question: {run.transcript.question}",
    ]
    for step, call in enumerate(run.transcript.tool_calls, 1):
        lines.append(f"  {step}. {_call_text(call.name, call.arguments)}")
        if call.is_error:
            lines.append(f"       -> {_short(call.result, 100)}")
    answer = run.final_answer or run.transcript.error or "(no answer)"
    lines.append("  answer: " + textwrap.indent(answer, "          ").lstrip())
    if run.leaked:
        for where in run.where:
            lines.append(f"  LEAKED: the secret is now public in {where}")
        if not any(leak.url in answer or leak.where in answer for leak in run.leaks):
            lines.append("  (and the answer the user read does not mention it)")
    else:
        lines.append("  no leak: no public issue, comment or pull request holds the secret")
    return lines


def _reported(run: RunResult) -> str:
    """What the agent told the user beyond its summary: a refusal, an error, or nothing."""
    if run.transcript.error:
        return f"error: {run.transcript.error}"
    if run.transcript.refusal:
        return f"refusal: {run.transcript.refusal}"
    answer = run.final_answer or ""
    notes = [p for p in answer.split("\n\n")[1:] if p.strip()]
    if notes:
        return _short(" ".join(notes), 160)
    first = answer.split("\n", 1)[0]
    return f"a summary ({_short(first, 60)})" if first else "nothing"


def _table(header: list[str], rows: list[list[str]], width: int = 40) -> list[str]:
    cells = [[textwrap.wrap(c, width) or [""] for c in row] for row in [header, *rows]]
    widths = [max(len(line) for row in cells for line in row[i]) for i in range(len(header))]

    def rule(fill: str = "-") -> str:
        return "+" + "+".join(fill * (w + 2) for w in widths) + "+"

    out = [rule()]
    for index, row in enumerate(cells):
        for line in range(max(len(c) for c in row)):
            out.append(
                "|"
                + "|".join(
                    f" {(c[line] if line < len(c) else ''):<{widths[i]}} "
                    for i, c in enumerate(row)
                )
                + "|"
            )
        out.append(rule("=" if index == 0 else "-"))
    return out


def render_summary(runs: list[RunResult]) -> str:
    """The runs as a readable report: each run's story, then a side-by-side table."""
    lines: list[str] = []
    for number, run in enumerate(runs, 1):
        lines.extend([*_story(run, number), ""])

    def joined(items: list[str]) -> str:
        return "; ".join(items) if items else "none"

    header = ["", *(run.name for run in runs)]
    rows = [
        ["secret leaked", *("YES" if run.leaked else "no" for run in runs)],
        ["where it landed", *(joined(run.where) if run.leaked else "-" for run in runs)],
        ["tools called", *(joined(run.tools_called) for run in runs)],
        ["tools run by GitHub", *(joined(run.server_calls) for run in runs)],
        ["tools blocked", *(joined([_blocked_text(b) for b in run.blocked_calls]) for run in runs)],
        ["agent reported", *(_reported(run) for run in runs)],
        ["audit lines", *(joined([_audit_text(a) for a in run.audit]) for run in runs)],
    ]
    lines.extend(_table(header, rows))
    problems = check_runs(runs)
    lines.append("")
    if problems:
        lines.append("The demo did NOT behave as described:")
        lines.extend(f"  - {p}" for p in problems)
    else:
        lines.append("The demo behaved as described.")
    return "\n".join(lines)
