"""The snippets of docs/embedding.md run as written, against the scripted upstream."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import openai
import pytest
from servers.llm import Call, ScriptedLLM
from servers.serving import running

DOC = Path(__file__).resolve().parents[2] / "docs" / "embedding.md"
POLICY = 'default call allow\ndefault model allow\nforbid call "delete_repo" reason "never"\n'


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)


@pytest.fixture
def policy_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "agent.policy").write_text(POLICY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_snippet_is_under_ten_lines() -> None:
    found = snippets()
    assert len(found) == 2
    assert all(len(s.strip().splitlines()) < 10 for s in found)


def test_middleware_snippet_guards_the_app(policy_dir: Path) -> None:
    llm = ScriptedLLM()
    llm.reply("", Call("call_d", "delete_repo", {}))
    namespace: dict[str, Any] = {"app": llm.app}
    exec(compile(snippets()[0], str(DOC), "exec"), namespace)
    with running(namespace["app"]) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        message = (
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
            .choices[0]
            .message
        )
    assert not message.tool_calls and "delete_repo" in (message.content or "")


def test_transport_snippet_guards_the_client(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = ScriptedLLM()
    llm.reply("", Call("call_d", "delete_repo", {}))
    with running(llm.app) as url:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{url}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "k")
        namespace: dict[str, Any] = {}
        exec(compile(snippets()[1], str(DOC), "exec"), namespace)
        client: openai.OpenAI = namespace["client"]
        message = (
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
            .choices[0]
            .message
        )
    assert not message.tool_calls and "delete_repo" in (message.content or "")
