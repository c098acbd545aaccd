"""Tool outputs classified inline in an LLM request leave the context ``classify()`` one by one would."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.adapters.openai import OpenAIChatCodec
from bastion.adapters.pipeline import Exchange, Forward, Guard
from bastion.events import Identity, RequestInfo
from bastion.policy import Policy

POLICY = """
default call allow
default result trusted
default model allow
untrusted result "web_*"
untrusted result "lookup" when args.q == "evil" and result.text contains "x"
untrusted result "lookup" when "doc" in context.taint_sources
"""

TOOLS = ("lookup", "web_get", "doc")


def body(outputs: list[tuple[str, str, str, bool]]) -> bytes:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for i, (tool, q, text, traced) in enumerate(outputs):
        call_id = f"c{i}"
        if traced:
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": tool, "arguments": json.dumps({"q": q})},
            }
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
    return json.dumps({"model": "gpt-test", "messages": messages}).encode()


outputs = st.lists(
    st.tuples(
        st.sampled_from(TOOLS),
        st.sampled_from(["a", "evil"]),
        st.sampled_from(["", "plain", "x marks"]),
        st.booleans(),
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(outputs)
async def test_inline_classification_leaves_the_context_classify_leaves(
    items: list[tuple[str, str, str, bool]],
) -> None:
    guard = Guard(Policy.from_source(POLICY), identity=Identity("agent"))
    route = guard.route("POST", "/v1/chat/completions")
    assert route is not None
    raw = body(items)
    outcome = await guard.request(route, "POST", "/v1/chat/completions", [], raw)
    assert isinstance(outcome, Forward)
    inline = outcome.exchange.context

    slow = Exchange(
        guard, route, RequestInfo(method="POST", path="/v1/chat/completions"), Identity("agent")
    )
    req = OpenAIChatCodec.parse_request(raw)
    slow.context = inline.__class__(session=None, user_texts=req.user_texts)
    for view in req.tool_results:
        await slow.classify(view.result, guard.spec_for(view.result.name), traced=view.traced)
    expected = slow.context
    assert (inline.tainted, inline.taint_sources, inline.trusted_texts, inline.untrusted_texts) == (
        expected.tainted,
        expected.taint_sources,
        expected.trusted_texts,
        expected.untrusted_texts,
    )
