"""The demo's Bastion: the real ``bastion serve`` app, configured the way a user would.

`DemoGateway` writes a configuration directory (``bastion.yaml``, a key file
holding the hash of the agent's virtual key, a secrets file holding the
provider key) and serves `bastion.gateway.build_app` of that configuration on
127.0.0.1. It is the same app as ``bastion serve --config bastion.yaml``, run in
this process only so the demo starts in a fraction of a second::

    gateway = DemoGateway(
        model_base_url="http://127.0.0.1:8000/v1",   # the model the agent used directly
        mcp_url="http://127.0.0.1:8001/mcp",         # the MCP server it used directly
        agent_key=agent_key,                         # a bst_ virtual key
    ).start()
    # the agent now uses gateway.model_base_url and gateway.mcp_url instead
    ...
    for record in gateway.audit_records():
        print(record["effect"], record["target"], record["rule_ids"], record["reasons"])
    gateway.stop()

The generated ``bastion.yaml`` reads::

    policy: {paths: [<the shipped rules/>], watch: false}
    identity: {key_file: keys.yaml}
    secrets_file: secrets.yaml
    providers:
      demo: {base_url: <model>, models: [naive-demo-model]}
    mcp:
      github: {url: <GitHub MCP server>}       # /mcp names its tools github__*
    audit: {sinks: [{path: audit.jsonl}]}
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bastion.audit import RecordFilter, open_log
from bastion.demo.model_server import MODEL_NAME
from bastion.demo.serving import BackgroundServer
from bastion.gateway import build_app, load_config
from bastion.identity import hash_secret
from bastion.identity.keys import parse_key_id

__all__ = ["AGENT_SUBJECT", "PROVIDER", "UPSTREAM", "DemoGateway", "shipped_rules"]

AGENT_SUBJECT = "demo-agent"
PROVIDER = "demo"
UPSTREAM = "github"


def shipped_rules() -> Path:
    """The standard rules library: ``bastion/_rules`` in a wheel, ``rules/`` in a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_rules", package.parent / "rules"):
        if candidate.is_dir() and any(candidate.glob("*.policy")):
            return candidate
    raise FileNotFoundError(
        f"the shipped rules are missing: neither {package / '_rules'} "
        f"nor {package.parent / 'rules'} holds .policy files"
    )


class DemoGateway:
    """``bastion serve`` in front of the demo's model and MCP server, with the shipped rules.

    The agent authenticates with `agent_key` (a ``bst_`` virtual key; only its
    hash is written); the gateway sends the model `provider_key` instead (a
    fresh random one unless given), which the agent never sees. Every decision
    goes to ``audit.jsonl`` in `directory` (a fresh temporary directory, removed
    by `stop`, unless given).
    """

    def __init__(
        self,
        *,
        model_base_url: str,
        mcp_url: str,
        agent_key: str,
        provider_key: str | None = None,
        rules: Path | None = None,
        directory: Path | None = None,
    ) -> None:
        key_id = parse_key_id(agent_key)
        if key_id is None:
            raise ValueError("the agent key must be a bst_<id>_<random> virtual key")
        self.provider_key = provider_key or "sk-demo-" + secrets.token_urlsafe(24)
        self._own_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="bastion-demo-"))
        self.config_path = self.directory / "bastion.yaml"
        self.audit_path = self.directory / "audit.jsonl"
        self._write(
            {
                "version": 1,
                "policy": {"paths": [str(rules or shipped_rules())], "watch": False},
                "identity": {"key_file": "keys.yaml"},
                "secrets_file": "secrets.yaml",
                "providers": {PROVIDER: {"base_url": model_base_url, "models": [MODEL_NAME]}},
                "mcp": {UPSTREAM: {"url": mcp_url}},
                "audit": {"sinks": [{"path": self.audit_path.name}]},
                # The demo needs no Prometheus endpoint, and so no prometheus extra.
                "metrics": False,
            },
            {
                "version": 1,
                "keys": [
                    {
                        "id": key_id,
                        "hash": hash_secret(agent_key),
                        "subject": AGENT_SUBJECT,
                        "providers": [PROVIDER],
                        "models": [MODEL_NAME],
                        "description": "the demo agent's virtual key",
                    }
                ],
            },
            {"providers": {PROVIDER: self.provider_key}},
        )
        self._server: BackgroundServer | None = None
        self._app: Any = None

    def _write(self, config: Any, keys: Any, provider_keys: Any) -> None:
        for name, document in (
            ("bastion.yaml", config),
            ("keys.yaml", keys),
            ("secrets.yaml", provider_keys),
        ):
            (self.directory / name).write_text(yaml.safe_dump(document, sort_keys=False))
        (self.directory / "secrets.yaml").chmod(0o600)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the demo gateway is not running")
        return self._server.url

    @property
    def model_base_url(self) -> str:
        """What the agent uses instead of the model's base URL."""
        return f"{self.url}/v1"

    @property
    def mcp_url(self) -> str:
        """What the agent uses instead of the MCP server's URL: every upstream as ``server__tool``."""
        return f"{self.url}/mcp"

    def start(self) -> DemoGateway:
        try:
            self._app = build_app(load_config(self.config_path))
            self._server = BackgroundServer(self._app, name="bastion").start()
        except BaseException:
            self.stop()
            raise
        return self

    def audit_records(self) -> list[dict[str, Any]]:
        """Every record of the audit file so far, read back with `bastion.audit`'s reader."""
        trail = self._app.state.gateway.trail if self._app is not None else None
        if trail is not None and not trail.flush():
            raise RuntimeError("the audit trail did not flush in time")
        if not self.audit_path.exists():
            return []
        return list(open_log(self.audit_path).query(RecordFilter()))

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
