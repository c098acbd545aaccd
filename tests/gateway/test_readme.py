"""Every code block of the README runs as written (against local servers)."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from servers.llm import Call, ScriptedLLM
from servers.serving import running

from bastion.cli import main as bastion_main

from .harness import REPO, Gateway, Upstreams

README = REPO / "README.md"
POLICY = 'default call allow\ndefault model allow\nforbid call "delete_repo" reason "never"\n'


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def blocks(title: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section(title), re.DOTALL)


def commands(title: str) -> list[list[str]]:
    """The `bastion ...` commands of a section's sh blocks, continuation lines joined."""
    out = []
    for block in blocks(title, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("bastion "):
                out.append(re.findall(r"'[^']*'|\S+", line)[1:])
    return [[arg.strip("'") for arg in cmd] for cmd in out]


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = bastion_main(argv)
    return code, out.getvalue()


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "agent.policy").write_text(POLICY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(client: openai.OpenAI) -> bool:
    message = (
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        .choices[0]
        .message
    )
    return not message.tool_calls and "delete_repo" in (message.content or "")


def test_embedding_snippets_are_each_under_ten_lines() -> None:
    found = blocks("Three ways to put Bastion in front of an agent", "(?:python|yaml)")
    assert len(found) == 3
    assert all(len(s.strip().splitlines()) < 10 for s in found)


def test_middleware_snippet_guards_the_app(in_tmp: Path) -> None:
    llm = ScriptedLLM()
    llm.reply("", Call("call_d", "delete_repo", {}))
    namespace: dict[str, Any] = {"app": llm.app}
    exec(blocks("Three ways to put Bastion in front of an agent", "python")[0], namespace)
    with running(namespace["app"]) as url:
        assert refused(openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0))


def test_transport_snippet_guards_the_client(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = ScriptedLLM()
    llm.reply("", Call("call_d", "delete_repo", {}))
    with running(llm.app) as url:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{url}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "k")
        namespace: dict[str, Any] = {}
        exec(blocks("Three ways to put Bastion in front of an agent", "python")[1], namespace)
        assert refused(namespace["client"])


@pytest.fixture
def served(
    upstreams: Upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Gateway, str]]:
    """The README's bastion.yaml and commands, with the upstream URLs made local."""
    yaml = blocks("Three ways to put Bastion in front of an agent", "yaml")[0]
    yaml = yaml.replace("https://api.openai.com/v1", f"{upstreams.llm_url}/v1")
    yaml = yaml.replace("https://api.githubcopilot.com/mcp/", upstreams.github_url)
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    (tmp_path / "bastion.yaml").write_text(yaml)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-readme-provider-key-0123456789")
    create, serve = commands("Three ways to put Bastion in front of an agent")
    assert create[:2] == ["keys", "create"] and serve[0] == "serve"
    code, out = run_cli(create)
    assert code == 0
    secret = re.search(r"bst_\S+", out)
    assert secret, out
    gateway = Gateway(tmp_path, tmp_path / "bastion.yaml")
    try:
        yield gateway, secret.group(0)
    finally:
        gateway.stop()


def test_serve_snippet_runs_a_gateway_that_swaps_the_key(
    served: tuple[Gateway, str], upstreams: Upstreams
) -> None:
    gateway, secret = served
    upstreams.llm.reply("hello from upstream")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)
    answer = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "hello from upstream"
    sent = upstreams.recorder.headers[-1]
    assert sent["authorization"] == "Bearer sk-readme-provider-key-0123456789"
    assert secret not in str(sent)


def test_identity_key_commands_run_as_written(in_tmp: Path) -> None:
    create, listing, revoke = commands("Identity")
    code, out = run_cli(create)
    assert code == 0 and "bst_" in out
    code, out = run_cli([*listing, "--json"])
    assert code == 0 and "ci-bot" in out
    key_id = re.search(r'"id":\s*"([^"]+)"', out)
    assert key_id
    code, _ = run_cli([arg if arg != "KEY_ID" else key_id.group(1) for arg in revoke])
    assert code == 0
    assert "revoked" in (in_tmp / "keys.yaml").read_text()


def test_audit_snippet_records_and_the_commands_read_it(in_tmp: Path) -> None:
    from bastion import Identity, Policy

    llm = ScriptedLLM()
    llm.reply("", Call("call_d", "delete_repo", {}))
    namespace: dict[str, Any] = {
        "app": llm.app,
        "policy": Policy.load("agent.policy"),
        "resolver": Identity("alice"),
    }
    exec(blocks("Audit", "python")[0], namespace)
    with running(namespace["app"]) as url:
        assert refused(openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0))
    namespace["audit"].close()
    for argv in commands("Audit"):
        if "-f" in argv:
            continue  # tail -f follows forever
        argv = [arg for arg in argv if arg != "RECORD_ID"]
        if argv[1] == "explain":
            code, out = run_cli(
                ["audit", "query", "audit.db", "--effect", "forbid", "--format", "json"]
            )
            record = re.search(r'"id":\s*"([^"]+)"', out)
            assert record, out
            argv.append(record.group(1))
        code, out = run_cli(argv)
        assert code == 0, (argv, out)
        if argv[1] == "query":
            assert "delete_repo" in out and "alice" in out


def test_python_api_snippet_decides_with_the_shipped_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    (snippet,) = blocks("Using it from Python", "python")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(snippet, {})
    assert out.getvalue().split()[0] in ("forbid", "ask", "allow", "Effect.FORBID", "Effect.ASK")


def test_first_policy_example_loads_and_checks(tmp_path: Path) -> None:
    (source,) = re.findall(r"```\n(# rules/my.policy.*?)```", section("A first policy"), re.DOTALL)
    (tmp_path / "my.policy").write_text(source)
    code, out = run_cli(["check", str(tmp_path / "my.policy")])
    assert code == 0, out
