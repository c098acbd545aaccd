"""The offline prompt-injection demo behind ``bastion demo``.

`github_server` is a GitHub-like MCP server with a poisoned public issue and a
private secret, `model_server` a scripted model that obeys what it reads,
`agent` an ordinary tool-using agent, `gateway` the real ``bastion serve`` app
configured with the shipped rules, and `scenario` runs the agent without and
with Bastion and observes where the secret lands (read its docstring first).
"""
