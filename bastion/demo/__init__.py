"""The offline prompt-injection demo behind ``bastion demo``.

`github_server` is a GitHub-like MCP server with a poisoned public issue and a
private secret, `model_server` a scripted model that obeys what it reads,
`agent` an ordinary tool-using agent, and `scenario` runs them and observes
where the secret lands.
"""
